"""Differential check: a dependency graph behaves the same as an endpoint and as a handler.

Every case builds one dependency graph and runs it twice: as a FastAPI endpoint through
``TestClient`` (the truth: whatever the installed FastAPI does, in this run) and as an
event handler with the same dependencies, emitted from a request, published with no
request, or given to ``bus.handle``. Both runs must agree on what the function body was
handed, how often each dependency ran, the order yield dependencies were entered and
exited around the body, and whether the call failed. FastAPI's answers are never written
down here: its classification of wrapped, partial and marked callables changes between
releases, and the bus must follow the release it runs on.

One exception, for the cases about the handler's own kind of callable: on older FastAPI an
endpoint that is a partial, a wrapper or an instance of an async function is not awaited
(its body never runs and serialising the coroutine fails). The bus runs such a handler's
body anyway, because a body is never silently skipped; there the truth is the same graph
with a plain ``async def`` endpoint.

No ``from __future__ import annotations``: FastAPI reads the signatures built below.
"""

import asyncio
import dataclasses
import functools
import gc
import inspect
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.testing import capture
from tests.conftest import Hooks

# A callable the bus (or FastAPI) wrongly runs as sync returns a coroutine nobody awaits.
# The comparison below reports that (the body or dependency did not run); the warning
# itself, raised as an error by the suite's filter, would only hide which case differed.
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")

HAS_SCOPE = "scope" in inspect.signature(Depends).parameters
"""Whether the installed FastAPI has ``Depends(..., scope=...)``."""

IS_COROUTINE_MARKER = vars(asyncio.coroutines).get("_is_coroutine")
"""asyncio's legacy marker for functions that return a coroutine (gone in some Pythons)."""

Impl = Callable[..., object]
"""What a function-like callable does when called, whatever its shape: keyword arguments only."""


class BodyFailed(Exception):
    """Raised by the endpoint's (or handler's) body in the failure cases."""


class DependencyFailed(Exception):
    """Raised by a dependency in the failure cases."""


def describe(value: object) -> str:
    """A comparable description: objects made in two runs differ by identity, not by this."""
    if inspect.iscoroutine(value):
        value.close()  # nobody awaited it; closing keeps it from warning
        return f"<unawaited coroutine {value.__qualname__}>"
    if inspect.isgenerator(value) or inspect.isasyncgen(value):
        return f"<{type(value).__name__} {value.__qualname__}>"
    if value is None or isinstance(value, str | int):
        return repr(value)
    attrs = ", ".join(f"{k}={describe(v)}" for k, v in sorted(vars(value).items()))
    return f"{type(value).__name__}({attrs})"


@dataclass
class Observation:
    """What one run of a graph showed."""

    values: dict[str, str] | None
    """What the body was handed, described; None if the body did not run."""
    calls: dict[str, int]
    """How many times each dependency was called (or entered, for yield dependencies)."""
    order: list[str]
    """Calls, enters, exits and the body, in the order they happened."""
    outcome: str
    """``"ok"`` or ``"failed"``."""
    detail: str = field(default="", compare=False)
    """What failed, for the reader of a failing comparison (it differs by nature: FastAPI
    turns some failures into errors of its own)."""


@dataclass
class Recorder:
    """The log every callable of one case writes to."""

    order: list[str] = field(default_factory=list)
    values: dict[str, str] | None = None

    def reset(self) -> None:
        self.order.clear()
        self.values = None

    def made(self, name: str, kwargs: dict[str, Any]) -> str:
        """Log a call of *name*; its value names it and describes what it was given."""
        self.order.append(f"call {name}")
        return self.value(name, kwargs)

    @staticmethod
    def value(name: str, kwargs: dict[str, Any]) -> str:
        args = ", ".join(f"{k}={describe(v)}" for k, v in sorted(kwargs.items()))
        return f"{name}({args})"

    def observe(self, outcome: str, detail: str = "") -> Observation:
        counted = Counter(
            line.split(" ", 1)[1] for line in self.order if line.startswith(("call ", "enter "))
        )
        calls = dict(sorted(counted.items()))
        return Observation(self.values, calls, list(self.order), outcome, detail)


# --- function-like shapes: the same behaviour (an Impl) behind every kind of callable


def _sync(impl: Impl, signature: inspect.Signature) -> Callable[..., Any]:
    def sync_call(**kwargs: Any) -> object:
        return impl(**kwargs)

    sync_call.__signature__ = signature  # type: ignore[attr-defined]
    return sync_call


def _async(impl: Impl, signature: inspect.Signature) -> Callable[..., Any]:
    async def async_call(**kwargs: Any) -> object:
        return impl(**kwargs)

    async_call.__signature__ = signature  # type: ignore[attr-defined]
    return async_call


def _wrapped(func: Callable[..., Any]) -> Callable[..., Any]:
    """A sync decorator's wrapper, made with `functools.wraps` (it copies the signature too)."""

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        return func(**kwargs)

    return wrapper


def _marked(impl: Impl, signature: inspect.Signature) -> Callable[..., Any]:
    """A sync def returning a coroutine, marked as a coroutine function the legacy way."""
    coroutine_function = _async(impl, signature)

    def marked(**kwargs: Any) -> Any:
        return coroutine_function(**kwargs)

    marked.__signature__ = signature  # type: ignore[attr-defined]
    marked._is_coroutine = IS_COROUTINE_MARKER  # type: ignore[attr-defined]
    return marked


class SyncInstance:
    """A callable instance with ``def __call__``."""

    def __init__(self, impl: Impl, signature: inspect.Signature) -> None:
        self.impl = impl
        self.__signature__ = signature

    def __call__(self, **kwargs: Any) -> object:
        return self.impl(**kwargs)


class AsyncInstance:
    """A callable instance with ``async def __call__``."""

    def __init__(self, impl: Impl, signature: inspect.Signature) -> None:
        self.impl = impl
        self.__signature__ = signature

    async def __call__(self, **kwargs: Any) -> object:
        return self.impl(**kwargs)


def _class(impl: Impl, signature: inspect.Signature) -> Callable[..., Any]:
    class Made:
        __signature__ = signature

        def __init__(self, **kwargs: Any) -> None:
            self.value = impl(**kwargs)

    return Made


FUNCTION_SHAPES: dict[str, Callable[[Impl, inspect.Signature], Callable[..., Any]]] = {
    "def": _sync,
    "async-def": _async,
    "partial-of-def": lambda impl, sig: functools.partial(_sync(impl, sig)),
    "partial-of-async-def": lambda impl, sig: functools.partial(_async(impl, sig)),
    "instance-def-call": SyncInstance,
    "instance-async-call": AsyncInstance,
    "partial-of-instance-def-call": lambda impl, sig: functools.partial(SyncInstance(impl, sig)),
    "partial-of-instance-async-call": lambda impl, sig: functools.partial(AsyncInstance(impl, sig)),
    "wraps-def-of-def": lambda impl, sig: _wrapped(_sync(impl, sig)),
    "wraps-def-of-async-def": lambda impl, sig: _wrapped(_async(impl, sig)),
    "is-coroutine-marker": _marked,
}
"""Shapes of endpoints and handlers, and of dependencies that return a value."""

VALUE_SHAPES = {**FUNCTION_SHAPES, "class": _class}


# --- yield shapes: the same enter/exit behaviour behind every kind of yield dependency


@dataclass
class Yielder:
    """What a yield dependency does: log its enter and exit, maybe swallow or fail."""

    rec: Recorder
    name: str
    swallow: bool = False
    """Catch the body's exception and do not re-raise it."""
    fail_at_exit: bool = False
    """Raise after a clean exit."""

    def enter(self, kwargs: dict[str, Any]) -> str:
        self.rec.order.append(f"enter {self.name}")
        return self.rec.value(self.name, kwargs)

    def caught(self, exc: Exception) -> bool:
        """Log the exception thrown in at the yield; whether to swallow it."""
        self.rec.order.append(f"exit {self.name} after {type(exc).__name__}")
        return self.swallow

    def exited(self) -> None:
        self.rec.order.append(f"exit {self.name}")
        if self.fail_at_exit:
            raise DependencyFailed(f"{self.name} failed at exit")


def _generate(y: Yielder, kwargs: dict[str, Any]) -> Iterator[str]:
    value = y.enter(kwargs)
    try:
        yield value
    except Exception as exc:
        if not y.caught(exc):
            raise
    else:
        y.exited()


def _generator(y: Yielder, signature: inspect.Signature) -> Callable[..., Any]:
    def generator(**kwargs: Any) -> Iterator[str]:
        yield from _generate(y, kwargs)

    generator.__signature__ = signature  # type: ignore[attr-defined]
    return generator


def _async_generator(y: Yielder, signature: inspect.Signature) -> Callable[..., Any]:
    async def async_generator(**kwargs: Any) -> AsyncIterator[str]:
        value = y.enter(kwargs)
        try:
            yield value
        except Exception as exc:
            if not y.caught(exc):
                raise
        else:
            y.exited()

    async_generator.__signature__ = signature  # type: ignore[attr-defined]
    return async_generator


class GeneratorInstance:
    """A callable instance whose ``__call__`` is a generator."""

    def __init__(self, y: Yielder, signature: inspect.Signature) -> None:
        self.y = y
        self.__signature__ = signature

    def __call__(self, **kwargs: Any) -> Iterator[str]:
        yield from _generate(self.y, kwargs)


class AsyncGeneratorInstance:
    """A callable instance whose ``__call__`` is an async generator (written out in full:
    ``async for`` over another one would not pass the body's exception into it)."""

    def __init__(self, y: Yielder, signature: inspect.Signature) -> None:
        self.y = y
        self.__signature__ = signature

    async def __call__(self, **kwargs: Any) -> AsyncIterator[str]:
        value = self.y.enter(kwargs)
        try:
            yield value
        except Exception as exc:
            if not self.y.caught(exc):
                raise
        else:
            self.y.exited()


YIELD_SHAPES: dict[str, Callable[[Yielder, inspect.Signature], Callable[..., Any]]] = {
    "generator": _generator,
    "async-generator": _async_generator,
    "partial-of-generator": lambda y, sig: functools.partial(_generator(y, sig)),
    "partial-of-async-generator": lambda y, sig: functools.partial(_async_generator(y, sig)),
    "instance-generator-call": GeneratorInstance,
    "instance-async-generator-call": AsyncGeneratorInstance,
    "wraps-def-of-generator": lambda y, sig: _wrapped(_generator(y, sig)),
    "wraps-def-of-async-generator": lambda y, sig: _wrapped(_async_generator(y, sig)),
}


# --- graphs


Scope = Literal["function", "request"] | None


def _param(name: str, default: object) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Any)


def _depends(call: Callable[..., Any], scope: Scope = None, use_cache: bool = True) -> Any:
    if scope is None:
        return Depends(call, use_cache=use_cache)
    return Depends(call, use_cache=use_cache, scope=scope)


@dataclass
class Graph:
    """Makes one case's dependencies, all writing to the case's recorder."""

    rec: Recorder

    def make(
        self,
        kind: str,
        name: str,
        *needs: inspect.Parameter,
        fail: bool = False,
        swallow: bool = False,
        fail_at_exit: bool = False,
    ) -> Callable[..., Any]:
        """A dependency of shape *kind* asking for *needs*; its value describes what it got."""
        signature = inspect.Signature(needs)
        if kind in YIELD_SHAPES:
            return YIELD_SHAPES[kind](Yielder(self.rec, name, swallow, fail_at_exit), signature)

        def impl(**kwargs: Any) -> object:
            value = self.rec.made(name, kwargs)
            if fail:
                raise DependencyFailed(name)
            return value

        return VALUE_SHAPES[kind](impl, signature)


Build = Callable[[Graph], list[inspect.Parameter]]


@dataclass(frozen=True)
class Case:
    """A graph (the parameters of the endpoint and of the handler) and how to run it."""

    build: Build
    shape: str = "async-def"
    """Shape of the endpoint and of the handler (a key of FUNCTION_SHAPES)."""
    body_raises: bool = False
    needs_scope: bool = False
    about_handler_kind: bool = False
    """The case is about the kind of callable the endpoint and handler are (`handler-*`)."""


def _no_dependencies(g: Graph) -> list[inspect.Parameter]:
    return []


def _kind_with_sub_dependency(kind: str) -> Build:
    """A dependency of *kind* with a sub-dependency the body asks for too (cached: one call)."""

    def build(g: Graph) -> list[inspect.Parameter]:
        leaf = g.make("def", "leaf")
        dep = g.make(kind, kind, _param("leaf", Depends(leaf)))
        return [_param("dep", Depends(dep)), _param("leaf", Depends(leaf))]

    return build


def _diamond(g: Graph) -> list[inspect.Parameter]:
    leaf = g.make("def", "leaf")
    left = g.make("async-def", "left", _param("leaf", Depends(leaf)))
    right = g.make("def", "right", _param("leaf", Depends(leaf)))
    return [
        _param("left", Depends(left)),
        _param("right", Depends(right)),
        _param("leaf", Depends(leaf)),
    ]


def _use_cache_false(kind: str) -> Build:
    """The same dependency asked for twice with the cache, once without."""

    def build(g: Graph) -> list[inspect.Parameter]:
        dep = g.make(kind, kind)
        return [
            _param("first", Depends(dep)),
            _param("fresh", _depends(dep, use_cache=False)),
            _param("cached", Depends(dep)),
        ]

    return build


def _scoped(*deps: tuple[str, Scope]) -> Build:
    """Yield dependencies of the given kinds and scopes, in this order."""

    def build(g: Graph) -> list[inspect.Parameter]:
        return [
            _param(f"d{i}", _depends(g.make(kind, f"{kind}@{scope}"), scope))
            for i, (kind, scope) in enumerate(deps)
        ]

    return build


def _one_generator_two_scopes(g: Graph) -> list[inspect.Parameter]:
    dep = g.make("generator", "generator")
    return [_param("default", Depends(dep)), _param("function", _depends(dep, "function"))]


def _function_scope_needs_request_scope(g: Graph) -> list[inspect.Parameter]:
    outer = g.make("generator", "request-scoped")
    inner = g.make("async-generator", "function-scoped", _param("outer", Depends(outer)))
    return [_param("inner", _depends(inner, "function"))]


def _yield_case(
    kind: str, *, swallow: bool = False, fail_at_exit: bool = False, scope: Scope = None
) -> Build:
    def build(g: Graph) -> list[inspect.Parameter]:
        dep = g.make(kind, kind, swallow=swallow, fail_at_exit=fail_at_exit)
        return [_param("dep", _depends(dep, scope))]

    return build


def _failing_dependency(kind: str) -> Build:
    """A yield dependency is entered, then *kind* raises; the one after it never runs."""

    def build(g: Graph) -> list[inspect.Parameter]:
        return [
            _param("entered", Depends(g.make("async-generator", "entered"))),
            _param("failing", Depends(g.make(kind, f"failing-{kind}", fail=True))),
            _param("after", Depends(g.make("def", "after"))),
        ]

    return build


def _handler_graph(g: Graph) -> list[inspect.Parameter]:
    return [
        _param("session", Depends(g.make("generator", "session"))),
        _param("value", Depends(g.make("async-def", "value"))),
    ]


CASES: dict[str, Case] = {
    **{f"dep-{kind}": Case(_kind_with_sub_dependency(kind)) for kind in VALUE_SHAPES},
    **{f"dep-{kind}": Case(_kind_with_sub_dependency(kind)) for kind in YIELD_SHAPES},
    "cache-diamond": Case(_diamond),
    **{
        f"cache-use-cache-false-{kind}": Case(_use_cache_false(kind))
        for kind in ("def", "async-def", "partial-of-async-def", "generator", "async-generator")
    },
    "scope-function-generator": Case(_scoped(("generator", "function")), needs_scope=True),
    "scope-function-async-generator": Case(
        _scoped(("async-generator", "function")), needs_scope=True
    ),
    "scope-explicit-request": Case(_scoped(("async-generator", "request")), needs_scope=True),
    "scope-default-then-function": Case(
        _scoped(("generator", None), ("async-generator", "function")), needs_scope=True
    ),
    "scope-function-then-default": Case(
        _scoped(("generator", "function"), ("async-generator", None)), needs_scope=True
    ),
    "scope-one-generator-both-scopes": Case(_one_generator_two_scopes, needs_scope=True),
    "scope-function-needs-request": Case(_function_scope_needs_request_scope, needs_scope=True),
    "fail-body": Case(_no_dependencies, body_raises=True),
    **{
        f"fail-body-{kind}-reraises": Case(_yield_case(kind), body_raises=True)
        for kind in ("generator", "async-generator")
    },
    **{
        f"fail-body-{kind}-swallows": Case(_yield_case(kind, swallow=True), body_raises=True)
        for kind in ("generator", "async-generator")
    },
    **{
        f"fail-body-{kind}-swallows-scope-function": Case(
            _yield_case(kind, swallow=True, scope="function"), body_raises=True, needs_scope=True
        )
        for kind in ("generator", "async-generator")
    },
    **{f"fail-dependency-{kind}": Case(_failing_dependency(kind)) for kind in ("def", "async-def")},
    **{
        f"fail-{kind}-at-exit": Case(_yield_case(kind, fail_at_exit=True))
        for kind in ("generator", "async-generator")
    },
    **{
        f"handler-{shape}": Case(_handler_graph, shape=shape, about_handler_kind=True)
        for shape in FUNCTION_SHAPES
    },
    **{
        f"handler-{shape}-no-dependencies": Case(
            _no_dependencies, shape=shape, about_handler_kind=True
        )
        for shape in FUNCTION_SHAPES
    },
}


def _marks(name: str, case: Case) -> list[pytest.MarkDecorator]:
    marks = []
    if case.needs_scope:
        marks.append(pytest.mark.skipif(not HAS_SCOPE, reason="this FastAPI has no scope="))
    if "is-coroutine-marker" in name:
        reason = "this Python has no asyncio.coroutines._is_coroutine"
        marks.append(pytest.mark.skipif(IS_COROUTINE_MARKER is None, reason=reason))
    return marks


# --- the two sides


def _body(rec: Recorder, raises: bool) -> Impl:
    def body(**values: Any) -> None:
        rec.values = {name: describe(value) for name, value in sorted(values.items())}
        rec.order.append("body")
        if raises:
            raise BodyFailed("the body raised")

    return body


def _observe_endpoint(
    case: Case, params: Sequence[inspect.Parameter], rec: Recorder
) -> Observation:
    """The truth: the graph as an endpoint of a plain FastAPI app, failures raised to here."""
    app = FastAPI()
    endpoint = FUNCTION_SHAPES[case.shape](_body(rec, case.body_raises), inspect.Signature(params))
    app.add_api_route("/", endpoint, methods=["POST"])
    rec.reset()
    with TestClient(app) as client:
        try:
            status = client.post("/").status_code
        except Exception as exc:
            return rec.observe("failed", f"{type(exc).__name__}: {exc}")
    return rec.observe("failed" if status >= 500 else "ok", f"HTTP {status}")


def _endpoint_not_awaited(observed: Observation) -> bool:
    """Whether FastAPI ran the endpoint as sync and failed on the coroutine it returned.

    Older FastAPI classifies the endpoint itself with ``asyncio.iscoroutinefunction``, so a
    partial, wrapper or instance of an async function is called in the threadpool: its body
    never runs, and serialising the returned coroutine fails.
    """
    return (
        observed.outcome == "failed"
        and observed.values is None
        and "body" not in observed.order
        and "'coroutine' object" in observed.detail
    )


def _emit_in_request(app: FastAPI, bus: EventBus) -> None:
    @app.post("/emit")
    async def emit(request_bus: EventBus = Depends(get_bus)) -> None:
        request_bus.emit("probe")

    with TestClient(app) as client:
        assert client.post("/emit").status_code == 200


def _publish(app: FastAPI, bus: EventBus) -> None:
    asyncio.run(bus.publish("probe"))


def _handle(app: FastAPI, bus: EventBus) -> None:
    asyncio.run(bus.handle(Event(name="probe")))


WAYS: dict[str, Callable[[FastAPI, EventBus], None]] = {
    "emit": _emit_in_request,
    "publish": _publish,
    "handle": _handle,
}
"""How the handler is run: emitted in a request, published with no request, or handled."""


def _observe_handler(
    way: str, app: FastAPI, bus: EventBus, hooks: Hooks, rec: Recorder
) -> Observation:
    rec.reset()
    with capture(bus, raise_failures=False) as seen:
        WAYS[way](app, bus)
    assert len(seen.handled) == 1, f"the handler was called {len(seen.handled)} times"
    error = seen.handled[0].error
    detail = "" if error is None else f"{type(error).__name__}: {error}"
    captured = error is not None
    reported = len(hooks.failures) == 1
    if captured == reported:
        return rec.observe("failed" if captured else "ok", detail)
    return rec.observe(f"capture says error={captured}, on_error called={reported}", detail)


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize(
    "case", [pytest.param(case, id=name, marks=_marks(name, case)) for name, case in CASES.items()]
)
def test_handler_resolves_like_the_endpoint(
    case: Case, way: str, app: FastAPI, bus: EventBus, hooks: Hooks
) -> None:
    rec = Recorder()
    params = case.build(Graph(rec))  # one graph: the endpoint and the handler share every call
    endpoint = _observe_endpoint(case, params, rec)
    if case.about_handler_kind and _endpoint_not_awaited(endpoint):
        # Older FastAPI did not await this endpoint's coroutine, so its body never ran. The
        # bus runs a handler's body anyway (a body is never silently skipped): the truth is
        # the same graph as a plain `async def` endpoint, body run once and a success.
        # The failed request's frames still hold the unawaited coroutine: collect them now,
        # while this module's filter for its warning applies, not in some later test.
        gc.collect()
        endpoint = _observe_endpoint(dataclasses.replace(case, shape="async-def"), params, rec)
        assert endpoint.outcome == "ok", endpoint.detail
        assert endpoint.order.count("body") == 1, endpoint.order
    handler = FUNCTION_SHAPES[case.shape](_body(rec, case.body_raises), inspect.Signature(params))
    bus.on("probe")(handler)
    assert _observe_handler(way, app, bus, hooks, rec) == endpoint
