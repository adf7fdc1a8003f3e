"""Property-based fuzzing of bad input: event names, payloads, patterns, handler signatures.

Every input is either rejected where it is passed, with the library's own exception
(`InvalidEventError` at ``emit``/``publish``, `ConfigurationError` at decoration), or
accepted; an accepted event reaches its handlers exactly once, as JSON data that survives
the wire, and no hook reports a failure or a discard.

The bugs this file found (events the wire could not encode, FastAPI's errors escaping
``bus.on``, a second ``Request`` parameter) have regression tests at the end of the file.

No ``from __future__ import annotations``: handlers are built inside tests, and FastAPI
reads their annotations at runtime.
"""

import asyncio
import contextlib
import dataclasses
import enum
import fnmatch
import inspect
import itertools
import json
import math
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Annotated, Any, ClassVar

import hypothesis
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, Query, Request
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from fastapi_eventbus import (
    ConfigurationError,
    DiscardedEvents,
    Event,
    EventBus,
    EventBusError,
    HandlerFailure,
    InvalidEventError,
    get_bus,
)
from fastapi_eventbus._patterns import example_name
from fastapi_eventbus.testing import RecordingForwarder
from fastapi_eventbus.wire import decode_message, pubsub_data, sqs_body

UNMATCHED = "it matches no handler and no forwarder"
"""The reason ``on_discard`` is given for an event nothing handles or forwards."""

FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
"""Library calls only: cheap examples."""
FUZZ_REQUESTS = settings(FUZZ, max_examples=75)
"""One app and one TestClient per example."""

MAX_INT_DIGITS = 5000
"""Past Python's 4300-digit str conversion limit: such integers must be refused at the call."""


# -- the bus under test ------------------------------------------------------------------


@dataclasses.dataclass
class Harness:
    """A bus with a catch-all handler, recording what it handled and what its hooks saw."""

    bus: EventBus
    handled: list[Event] = dataclasses.field(default_factory=list)
    failures: list[HandlerFailure] = dataclasses.field(default_factory=list)
    discards: list[DiscardedEvents] = dataclasses.field(default_factory=list)

    def assert_quiet(self, unmatched: Sequence[Event] = ()) -> None:
        """No failure, and no discard but one for each event nothing matched (*unmatched*):
        ``on_discard`` hears of each of those, by id."""
        assert self.failures == []
        assert [report.ids for report in self.discards] == [[event.id] for event in unmatched]
        assert {report.reason for report in self.discards} <= {UNMATCHED}


def harness(*, catch_all: bool = True) -> Harness:
    failures: list[HandlerFailure] = []
    discards: list[DiscardedEvents] = []
    bus = EventBus(disabled=False, on_error=failures.append, on_discard=discards.append)
    h = Harness(bus, failures=failures, discards=discards)
    if catch_all:

        @bus.on("*")
        def catch_all_handler(event: Event) -> None:
            h.handled.append(event)

    return h


def emit_in_one_request(
    h: Harness, calls: list[tuple[object, ...]], *, async_endpoint: bool
) -> list[Event | InvalidEventError]:
    """``bus.emit(*args)`` for every call in one request; the event or the rejection of each."""
    app = FastAPI()
    h.bus.install(app)
    outcomes: list[Event | InvalidEventError] = []

    def emit_all(bus: EventBus) -> None:
        emit: Callable[..., Event] = bus.emit
        for args in calls:
            try:
                outcomes.append(emit(*args))
            except InvalidEventError as exc:
                outcomes.append(exc)

    if async_endpoint:

        @app.post("/")
        async def async_endpoint_(bus: EventBus = Depends(get_bus)) -> None:
            emit_all(bus)

    else:

        @app.post("/")
        def sync_endpoint(bus: EventBus = Depends(get_bus)) -> None:
            emit_all(bus)

    with TestClient(app) as client:
        assert client.post("/").status_code == 200
    return outcomes


# -- oracles: the documented rules ---------------------------------------------------------

_UNCONVERTIBLE = object()


def valid_name(name: object) -> bool:
    """``check_name``'s documented rule: a non-empty str of at most 256 characters, without
    surrounding whitespace, control characters (C0, DEL, C1) or line separators (U+2028,
    U+2029), that UTF-8 can encode (no lone surrogates: no broker could carry it)."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 256
        and name.strip() == name
        and not any(c < " " or "\x7f" <= c <= "\x9f" or c in "\u2028\u2029" for c in name)
        and utf8(name)
    )


def utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_data(payload: object) -> object:
    """The documented conversion (pydantic's ``to_jsonable_python``), or ``_UNCONVERTIBLE``
    when its result is not JSON a broker can carry (it raised, it holds NaN or an infinity,
    an int too long to write, or text UTF-8 cannot encode) or lost a value (two keys of a
    dict became one JSON key)."""
    try:
        data = to_jsonable_python(payload)
        json.dumps(data, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except Exception:
        return _UNCONVERTIBLE
    return _UNCONVERTIBLE if merges_keys(payload) else data


def merges_keys(value: object) -> bool:
    """Whether a dict in *value* (no cycles: it converted) has two keys JSON writes alike."""
    if isinstance(value, dict):
        keys = [next(iter(to_jsonable_python({key: None}))) for key in value]
        return len(set(keys)) < len(keys) or any(merges_keys(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(merges_keys(item) for item in value)
    if isinstance(value, Box):
        return merges_keys(value.value)
    if isinstance(value, Pair):
        return merges_keys(value.left) or merges_keys(value.right)
    return False


def event_model(event_name: object) -> type[BaseModel]:
    """A typed event model class whose ``__event_name__`` is *event_name*, whatever it is."""

    class Dynamic(BaseModel):
        __event_name__: ClassVar[object] = event_name
        id: int = 1

    return Dynamic


def expected_outcome(args: tuple[object, ...]) -> tuple[str, object] | None:
    """The ``(name, payload)`` an ``emit(*args)`` must produce, or None if it must raise."""
    first = args[0]
    if isinstance(first, BaseModel):
        name = getattr(type(first), "__event_name__", None)
        if len(args) > 1 or not valid_name(name):
            return None
        assert isinstance(name, str)
        return name, first.model_dump(mode="json")
    if isinstance(first, type) or not valid_name(first):
        return None
    assert isinstance(first, str)
    payload = json_data(args[1]) if len(args) > 1 else None
    return None if payload is _UNCONVERTIBLE else (first, payload)


def assert_survives_the_wire(event: Event) -> None:
    decoded = decode_message({"Body": sqs_body(event)})
    assert (decoded.id, decoded.name, decoded.payload) == (event.id, event.name, event.payload)
    assert decoded.time == event.time


# -- strategies ----------------------------------------------------------------------------

WILDCARD_TEXT = st.text(alphabet="ab.*?[]!-^\\/ \n", max_size=6)
"""Names and patterns drawn from wildcard syntax, so that they interact."""

NAME_TEXT = st.one_of(
    st.text(),
    st.text(st.characters(categories=["Cs", "Zs", "Cc", "Lo"]), max_size=4),
    WILDCARD_TEXT,
    st.sampled_from(["x", "*", "order.placed", " x", "x ", "\t", "\u3000x", "a\nb", "\x00"]),
)


class BodyModel(BaseModel):
    id: int


class StrName(str):
    """A str subclass: a str to the bus."""


NAME_OBJECTS: st.SearchStrategy[object] = st.one_of(
    NAME_TEXT,
    NAME_TEXT.map(StrName),
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.binary(max_size=4),
    st.lists(st.text(max_size=2), max_size=2),
    st.sampled_from([object(), Event, Event(name="x"), BaseModel, BodyModel(id=1)]),
    st.one_of(NAME_TEXT, st.integers(), st.none()).map(event_model),  # a class, not an instance
    st.one_of(NAME_TEXT, st.integers(), st.none()).map(lambda n: event_model(n)()),
)


class Colour(enum.Enum):
    RED = "red"
    NAN = math.nan


class Box(BaseModel):
    value: Any = None


@dataclasses.dataclass
class Pair:
    left: Any
    right: Any


def nested(depth: int, as_dict: bool) -> object:
    value: object = 0
    for _ in range(depth):
        value = {"k": value} if as_dict else [value]
    return value


def cyclic(as_dict: bool) -> object:
    if as_dict:
        cycle: dict[str, object] = {}
        cycle["self"] = cycle
        return cycle
    loop: list[object] = []
    loop.append(loop)
    return loop


SURROGATE_TEXT = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
HUGE_TEXT = st.tuples(st.text(min_size=1, max_size=3), st.integers(1, 100_000)).map(
    lambda pair: pair[0] * pair[1]
)
HUGE_INTS = st.tuples(st.integers(0, MAX_INT_DIGITS), st.sampled_from([1, -1])).map(
    lambda pair: pair[1] * 10 ** pair[0]
)

HASHABLE: st.SearchStrategy[object] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    SURROGATE_TEXT,
    st.binary(max_size=4),
    st.uuids(),
    st.datetimes(),
    st.dates(),
    st.decimals(allow_nan=False),  # a signalling NaN cannot be hashed
    st.sampled_from(Colour),
    st.tuples(st.integers(), st.text(max_size=2)),
    st.frozensets(st.integers(), max_size=2),
)

SCALARS: st.SearchStrategy[object] = st.one_of(
    HASHABLE,
    HUGE_INTS,
    HUGE_TEXT,
    st.decimals(),
    st.times(),
    st.timedeltas(),
    st.fractions(),
    st.complex_numbers(),
    st.builds(object),
    st.builds(bytearray, st.binary(max_size=4)),
    st.sampled_from([range(2), memoryview(b"m"), Ellipsis, print]),
)


def containers(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(HASHABLE, children, max_size=4),
        st.dictionaries(st.text(max_size=4), children, max_size=4),
        st.sets(HASHABLE, max_size=4),
        st.builds(Box, value=children),
        st.builds(Pair, children, children),
    )


PAYLOADS: st.SearchStrategy[object] = st.one_of(
    st.recursive(SCALARS, containers, max_leaves=12),
    st.builds(nested, st.integers(1, 400), st.booleans()),
    st.builds(cyclic, st.booleans()),
)

EMIT_ARGS: st.SearchStrategy[tuple[object, ...]] = st.one_of(
    st.tuples(NAME_OBJECTS),
    st.tuples(NAME_OBJECTS, PAYLOADS),
    st.tuples(st.just("x"), PAYLOADS),
)


# -- 1. names ------------------------------------------------------------------------------


@pytest.mark.anyio
@FUZZ
@given(name=NAME_OBJECTS)
async def test_publish_any_name_is_rejected_or_handled_once(name: object) -> None:
    h = harness()
    expected = expected_outcome((name,))
    publish: Callable[..., Any] = h.bus.publish
    hypothesis.event("rejected" if expected is None else "accepted")
    if expected is None:
        with pytest.raises(InvalidEventError):
            await publish(name)
        assert h.handled == []
    else:
        accepted = await publish(name)
        assert (accepted.name, accepted.payload) == expected
        assert h.handled == [accepted]  # "*" matches every accepted name, "/" and "\n" included
        assert_survives_the_wire(accepted)
    h.assert_quiet()


@FUZZ_REQUESTS
@given(calls=st.lists(EMIT_ARGS, max_size=6), async_endpoint=st.booleans())
def test_emit_in_a_request_rejects_at_the_call_or_handles_every_event_in_order(
    calls: list[tuple[object, ...]], async_endpoint: bool
) -> None:
    expected = [expected_outcome(args) for args in calls]
    h = harness()
    outcomes = emit_in_one_request(h, calls, async_endpoint=async_endpoint)
    assert [isinstance(o, InvalidEventError) for o in outcomes] == [e is None for e in expected]
    accepted = [o for o in outcomes if isinstance(o, Event)]
    assert [(e.name, e.payload) for e in accepted] == [e for e in expected if e is not None]
    assert [e.id for e in h.handled] == [e.id for e in accepted]
    assert len({e.id for e in accepted}) == len(accepted)
    h.assert_quiet()


# -- 2. payloads ---------------------------------------------------------------------------


@pytest.mark.anyio
@FUZZ
@given(payload=PAYLOADS)
async def test_payload_is_rejected_or_handled_as_its_json_conversion(payload: object) -> None:
    h = harness()
    expected = json_data(payload)
    hypothesis.event("rejected" if expected is _UNCONVERTIBLE else "accepted")
    if expected is _UNCONVERTIBLE:
        with pytest.raises(InvalidEventError, match="payload of event 'x'"):
            await h.bus.publish("x", payload)
        assert h.handled == []
    else:
        accepted = await h.bus.publish("x", payload)
        assert h.handled == [accepted]
        received = h.handled[0].payload
        json.dumps(received, allow_nan=False)
        assert received == expected
        assert_survives_the_wire(accepted)
    h.assert_quiet()


@FUZZ_REQUESTS
@given(payloads=st.lists(PAYLOADS, min_size=1, max_size=8))
def test_every_accepted_emit_of_a_request_is_handled_in_order(payloads: list[object]) -> None:
    expected = [json_data(p) for p in payloads]
    h = harness()
    outcomes = emit_in_one_request(h, [("x", p) for p in payloads], async_endpoint=True)
    accepted = [o for o in outcomes if isinstance(o, Event)]
    assert len(accepted) == sum(e is not _UNCONVERTIBLE for e in expected)
    assert [e.id for e in h.handled] == [e.id for e in accepted]
    assert [e.payload for e in h.handled] == [e for e in expected if e is not _UNCONVERTIBLE]
    for event in h.handled:
        assert_survives_the_wire(event)
    h.assert_quiet()


# -- 3. patterns ---------------------------------------------------------------------------

GLOB_TEXT = st.text(alphabet="ab.*?[]!-^\\", min_size=1, max_size=5)
"""Pattern-like text from a small alphabet, so that names and patterns often match."""
VALID_PATTERNS: st.SearchStrategy[object] = st.one_of(
    GLOB_TEXT,
    WILDCARD_TEXT.filter(bool),
    st.text(min_size=1, max_size=6),
    st.sampled_from(["*", "?", "[", "[]", "[!]", "[]]", "[z-a]", "\\*", "*.*", "[*]", " "]),
    GLOB_TEXT.map(event_model),  # a typed model: its __event_name__, literally
)
PATTERN_OBJECTS: st.SearchStrategy[object] = st.one_of(
    VALID_PATTERNS,
    st.just(""),
    st.none(),
    st.integers(),
    st.binary(max_size=3),
    st.lists(st.text(max_size=2), max_size=2),
    st.sampled_from([BaseModel, Event, object]),
    st.one_of(NAME_TEXT, st.integers(), st.none()).map(event_model),
)
PATTERN_NAMES = (
    st.one_of(GLOB_TEXT, WILDCARD_TEXT, st.text(max_size=6)).map(str.strip).filter(valid_name)
)


def matches(pattern: object, name: str) -> bool:
    """handlers.md: `fnmatch.fnmatchcase`; a typed model matches its `__event_name__` exactly."""
    if isinstance(pattern, str):
        return fnmatch.fnmatchcase(name, pattern)
    return name == getattr(pattern, "__event_name__", None)


def valid_pattern(pattern: object) -> bool:
    if isinstance(pattern, type) and issubclass(pattern, BaseModel):
        return valid_name(getattr(pattern, "__event_name__", None))
    # A pattern whose every match emit would refuse (" user.*") can never match: refused too.
    return isinstance(pattern, str) and bool(pattern) and valid_name(example_name(pattern))


@FUZZ
@given(
    patterns=st.one_of(
        st.lists(VALID_PATTERNS, min_size=1, max_size=3), st.lists(PATTERN_OBJECTS, max_size=3)
    ),
    data=st.data(),
)
def test_handler_runs_iff_one_of_its_patterns_matches(
    patterns: list[object], data: st.DataObject
) -> None:
    # Sync, drawing before any event loop runs: a draw can raise Hypothesis's StopTest (a
    # BaseException), which must not escape from inside anyio's test-runner task.
    literal = [p for p in patterns if isinstance(p, str) and valid_name(p)]  # "a*" names "a*"
    names_strategy = (
        st.one_of(PATTERN_NAMES, st.sampled_from(literal)) if literal else PATTERN_NAMES
    )
    names = data.draw(st.lists(names_strategy, max_size=6), label="names")
    asyncio.run(_check_pattern_matching(patterns, names))


async def _check_pattern_matching(patterns: list[object], names: list[str]) -> None:
    h = harness(catch_all=False)
    calls: list[str] = []

    async def on_match(event: Event) -> None:
        calls.append(event.name)

    on: Callable[..., Callable[[Any], Any]] = h.bus.on
    if not patterns or not all(valid_pattern(p) for p in patterns):
        # A bad __event_name__ fails check_name (InvalidEventError); the rest ConfigurationError.
        with pytest.raises((ConfigurationError, InvalidEventError)):
            on(*patterns)(on_match)
    else:
        on(*patterns)(on_match)
    published = [await h.bus.publish(name) for name in names]
    registered = bool(patterns) and all(valid_pattern(p) for p in patterns)
    hypothesis.event(("matched" if calls else "registered") if registered else "rejected")
    assert calls == [n for n in names if registered and any(matches(p, n) for p in patterns)]
    h.assert_quiet(
        [e for e in published if not (registered and any(matches(p, e.name) for p in patterns))]
    )


# -- 4. handler signatures -----------------------------------------------------------------


class TypedX(BaseModel):
    __event_name__: ClassVar[str] = "x"
    id: int


class TypedY(BaseModel):
    __event_name__: ClassVar[str] = "y"
    id: int


class ClassDependency:
    def __init__(self) -> None:
        self.kind = "class"


def dependency_with_query(limit: int) -> int:
    return limit


class Dependencies:
    """Dependencies of every kind, logging when the ``yield`` ones are entered and exited."""

    def __init__(self) -> None:
        self.log: list[str] = []
        log = self.log

        def sync_dep() -> str:
            return "sync"

        async def async_dep() -> str:
            return "async"

        def gen_dep() -> Iterator[str]:
            log.append("enter gen")
            yield "gen"
            log.append("exit gen")

        async def agen_dep() -> AsyncIterator[str]:
            log.append("enter agen")
            yield "agen"
            log.append("exit agen")

        self.sync, self.async_, self.gen, self.agen = sync_dep, async_dep, gen_dep, agen_dep


MODEL_NAMES = {"model_x": "x", "model_y": "y"}
"""The typed event models of the ``model_*`` kinds, by their ``__event_name__``."""
EVENT_KINDS = {"event_bare", "event_any", "event_annotated", "event_meta", "model_x", "model_y"}
REJECTED_KINDS = {"query", "query_default", "body", "depends_query"}
KINDS = sorted(
    EVENT_KINDS
    | REJECTED_KINDS
    | {
        "sync_default",
        "async_annotated",
        "gen_annotated",
        "agen_bare",
        "class_annotated",
        "event_depends",
        "bus",
        "request",
        "event_named_request",
        "background",
    }
)


def parameter(
    kind: str, name: str, deps: Dependencies, inspect_kind: inspect._ParameterKind
) -> tuple[inspect.Parameter, Callable[[object, Event], bool]]:
    """The parameter of *kind*, and a check of the value the handler must receive for it."""
    empty = inspect.Parameter.empty
    table: dict[str, tuple[object, object, Callable[[object, Event], bool]]] = {
        "event_bare": (empty, empty, lambda v, e: v is e),
        "event_any": (Any, empty, lambda v, e: v is e),
        "event_annotated": (Event, empty, lambda v, e: v is e),
        "event_meta": (Annotated[Event, "meta"], empty, lambda v, e: v is e),
        "model_x": (TypedX, empty, lambda v, e: v == TypedX(id=7)),
        "model_y": (TypedY, empty, lambda v, e: v == TypedY(id=7)),
        "sync_default": (str, Depends(deps.sync), lambda v, e: v == "sync"),
        "async_annotated": (Annotated[str, Depends(deps.async_)], empty, lambda v, e: v == "async"),
        "gen_annotated": (Annotated[str, Depends(deps.gen)], empty, lambda v, e: v == "gen"),
        "agen_bare": (empty, Depends(deps.agen), lambda v, e: v == "agen"),
        "class_annotated": (
            Annotated[ClassDependency, Depends()],
            empty,
            lambda v, e: isinstance(v, ClassDependency),
        ),
        "event_depends": (Annotated[Event, Depends(deps.sync)], empty, lambda v, e: v == "sync"),
        "bus": (EventBus, Depends(get_bus), lambda v, e: isinstance(v, EventBus)),
        "request": (Request, empty, lambda v, e: isinstance(v, Request)),
        "event_named_request": (Request, empty, lambda v, e: isinstance(v, Request)),
        "background": (BackgroundTasks, empty, lambda v, e: isinstance(v, BackgroundTasks)),
        "query": (int, empty, lambda v, e: False),
        "query_default": (int, 3, lambda v, e: False),
        "body": (BodyModel, empty, lambda v, e: False),
        "depends_query": (int, Depends(dependency_with_query), lambda v, e: False),
    }
    annotation, default, check = table[kind]
    return inspect.Parameter(name, inspect_kind, default=default, annotation=annotation), check


@dataclasses.dataclass
class Signature:
    kinds: list[tuple[str, inspect._ParameterKind]]
    var_positional: bool
    var_keyword: bool
    is_async: bool
    patterns: tuple[str, ...]


RARELY = st.sampled_from([False] * 7 + [True])


def one_request_and_one_background_tasks(kinds: list[str]) -> bool:
    """At most one `Request` and one `BackgroundTasks` parameter: FastAPI fills one of each."""
    requests = sum(kind in ("request", "event_named_request") for kind in kinds)
    return requests <= 1 and kinds.count("background") <= 1


SIGNATURES = st.builds(
    Signature,
    kinds=st.lists(
        st.tuples(
            st.sampled_from(KINDS),
            st.sampled_from(
                [
                    *[inspect.Parameter.POSITIONAL_OR_KEYWORD] * 4,
                    *[inspect.Parameter.KEYWORD_ONLY] * 3,
                    inspect.Parameter.POSITIONAL_ONLY,
                ]
            ),
        ),
        max_size=4,
    ),
    var_positional=RARELY,
    var_keyword=RARELY,
    is_async=st.booleans(),
    patterns=st.sampled_from([("x",), ("x",), ("x",), ("*",), ("*",), ("y", "x"), ("y",), ()]),
)

_handler_numbers = itertools.count()


def python_order(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """*params* in an order Python allows: by kind, and no positional parameter without a
    default after one with a default (such a parameter becomes keyword-only)."""
    params = sorted(params, key=lambda p: p.kind)
    seen_default = False
    for i, p in enumerate(params):
        if p.kind > p.POSITIONAL_OR_KEYWORD:
            break
        if p.default is not p.empty:
            seen_default = True
        elif seen_default:
            params[i] = p.replace(kind=p.KEYWORD_ONLY)
    return sorted(params, key=lambda p: p.kind)


def build_handler(
    sig: Signature, deps: Dependencies, calls: list[dict[str, Any]]
) -> tuple[Callable[..., Any], dict[str, Callable[[object, Event], bool]], list[str]]:
    """A handler with *sig*'s signature; its value checks, and its effective kinds in order."""
    params: list[inspect.Parameter] = []
    checks: dict[str, Callable[[object, Event], bool]] = {}
    kinds: list[str] = []
    for i, (kind, inspect_kind) in enumerate(sig.kinds):
        name = "event" if kind in ("event_bare", "event_any", "event_named_request") else f"p{i}"
        if name == "event" and any(p.name == "event" for p in params):
            name, kind = f"p{i}", "request" if kind == "event_named_request" else "event_annotated"
        param, checks[name] = parameter(kind, name, deps, inspect_kind)
        params.append(param)
        kinds.append(kind)
    if sig.var_positional:
        params.append(inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL))
    if sig.var_keyword:
        params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    params = python_order(params)

    def record(**values: Any) -> None:
        deps.log.append("call")
        calls.append(values)

    async def async_handler(**values: Any) -> None:
        record(**values)

    def sync_handler(**values: Any) -> None:
        record(**values)

    handler: Callable[..., Any] = async_handler if sig.is_async else sync_handler
    handler.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    handler.__name__ = handler.__qualname__ = f"fuzz_handler_{next(_handler_numbers)}"
    return handler, checks, kinds


def registration_must_fail(sig: Signature, handler: Callable[..., Any], kinds: list[str]) -> bool:
    """handlers.md, "The event parameter" and "What a handler cannot take"; and `EventBus.on`:
    a typed handler's patterns must match its model's name, and without patterns it needs one."""
    params = inspect.signature(handler).parameters.values()
    by_keyword = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)
    event_params = [k for k in kinds if k in EVENT_KINDS]
    models = [MODEL_NAMES[k] for k in kinds if k in MODEL_NAMES]
    if not by_keyword or len(event_params) > 1 or any(k in REJECTED_KINDS for k in kinds):
        return True
    if not one_request_and_one_background_tasks(kinds):  # FastAPI would fill only one
        return True
    if not sig.patterns:
        return not models
    return bool(models) and not any(matches(p, models[0]) for p in sig.patterns)


@pytest.mark.anyio
@FUZZ
@given(sig=SIGNATURES)
async def test_handler_signature_is_rejected_at_decoration_or_resolved_on_publish(
    sig: Signature,
) -> None:
    h = harness(catch_all=False)
    deps = Dependencies()
    calls: list[dict[str, Any]] = []
    handler, checks, kinds = build_handler(sig, deps, calls)
    on: Callable[..., Callable[[Any], Any]] = h.bus.on
    if registration_must_fail(sig, handler, kinds):
        with pytest.raises(ConfigurationError, match=handler.__qualname__):
            on(*sig.patterns)(handler)
    else:
        assert on(*sig.patterns)(handler) is handler
    published = await h.bus.publish("x", {"id": 7})
    patterns = sig.patterns or tuple(MODEL_NAMES[k] for k in kinds if k in MODEL_NAMES)
    if registration_must_fail(sig, handler, kinds) or not any(matches(p, "x") for p in patterns):
        hypothesis.event(
            "rejected" if registration_must_fail(sig, handler, kinds) else "not matched"
        )
        assert calls == []
        assert deps.log == []
        h.assert_quiet([published])
    else:
        hypothesis.event("called")
        assert len(calls) == 1
        assert set(calls[0]) == set(checks)
        assert all(check(calls[0][name], published) for name, check in checks.items())
        call = deps.log.index("call")
        assert all(entry.startswith("enter") for entry in deps.log[:call])
        assert sorted(e.split()[1] for e in deps.log[:call]) == sorted(
            e.split()[1] for e in deps.log[call + 1 :]
        )
        h.assert_quiet()


# -- regressions: what this file found -----------------------------------------------------

UNENCODABLE = [
    pytest.param(("x", 10**5000), id="int-over-4300-digits"),
    pytest.param(("x", {"text": "\ud800"}), id="lone-surrogate-in-payload"),
    pytest.param(("\ud800",), id="lone-surrogate-in-name"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("args", UNENCODABLE)
async def test_unencodable_input_is_rejected_at_the_call_site(args: tuple[object, ...]) -> None:
    h = harness()
    publish: Callable[..., Any] = h.bus.publish
    try:
        event = await publish(*args)
    except InvalidEventError:
        return
    # Accepted: then it must be sendable, by SQS (UTF-8 body) and Pub/Sub alike.
    sqs_body(event).encode()
    pubsub_data(event)


@pytest.mark.anyio
@pytest.mark.parametrize("args", UNENCODABLE)
async def test_size_limited_forwarder_rejects_with_invalid_event_error(
    args: tuple[object, ...],
) -> None:
    h = harness()
    forwarder = RecordingForwarder()
    forwarder.max_message_bytes = 262_144  # what SQSForwarder sets by default
    h.bus.forward("*", forwarder)
    publish: Callable[..., Any] = h.bus.publish
    with contextlib.suppress(EventBusError):  # an InvalidEventError is right; nothing else
        await publish(*args)


def _dep() -> int:
    return 1


def annotated_and_default_depends(d: Annotated[int, Depends(_dep)] = Depends(_dep)) -> None:
    """FastAPI asserts: `Depends` in `Annotated` and as the default."""


def query_and_default_depends(d: Annotated[int, Query()] = Depends(_dep)) -> None:
    """FastAPI asserts: a FastAPI annotation in `Annotated` and `Depends` as the default."""


def depends_on_a_builtin(d: int = Depends()) -> None:
    """``Depends()`` on ``int``: FastAPI cannot read the signature of a builtin class."""


@pytest.mark.parametrize(
    "handler",
    [
        pytest.param(annotated_and_default_depends, id="Annotated-Depends-and-default-Depends"),
        pytest.param(query_and_default_depends, id="Annotated-Query-and-default-Depends"),
        pytest.param(depends_on_a_builtin, id="Depends-on-int"),
        pytest.param(dict, id="builtin-without-signature"),
    ],
)
def test_unusable_handler_raises_configuration_error(handler: Callable[..., Any]) -> None:
    bus = EventBus(disabled=False)
    with pytest.raises(ConfigurationError, match=handler.__qualname__):
        bus.on("x")(handler)


def handler_with_two_requests(event: Event, first: Request, second: Request) -> None:
    """FastAPI keeps one ``request_param_name``: *first* is never given."""


def handler_with_two_background_tasks(
    event: Event, first: BackgroundTasks, second: BackgroundTasks
) -> None:
    """FastAPI keeps one ``background_tasks_param_name``: *first* is never given."""


@pytest.mark.anyio
@pytest.mark.parametrize("handler", [handler_with_two_requests, handler_with_two_background_tasks])
async def test_second_request_or_background_tasks_parameter_is_rejected_at_decoration(
    handler: Callable[..., None],
) -> None:
    h = harness(catch_all=False)
    try:
        h.bus.on("x")(handler)
    except ConfigurationError:
        return
    await h.bus.publish("x")
    h.assert_quiet()  # fails: on_error got "missing 1 required positional argument: 'first'"
