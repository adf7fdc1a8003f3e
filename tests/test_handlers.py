"""Handlers get FastAPI's dependency injection: every kind of dependency, overrides, errors.

No ``from __future__ import annotations`` here: handlers and dependencies are defined
inside test functions, and FastAPI resolves string annotations against module globals.
"""

import contextvars
import functools
import inspect
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, ClassVar

import pytest
from fastapi import BackgroundTasks, Body, Depends, FastAPI, Header, Query, Request, Response
from fastapi.testclient import TestClient
from pydantic import BaseModel

import fastapi_eventbus._di
from fastapi_eventbus import ConfigurationError, Event, EventBus, get_bus
from fastapi_eventbus.testing import capture


class CatCreated(BaseModel):
    __event_name__: ClassVar[str] = "cat.created"
    id: int


class CatAdopted(BaseModel):
    __event_name__: ClassVar[str] = "cat.adopted"
    id: int


def emits(app: FastAPI, *names: str) -> TestClient:
    """Add ``POST /`` emitting *names* and return a client for it."""

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        for name in names:
            bus.emit(name, {"id": 1})

    return TestClient(app)


def test_sub_dependencies_annotated_sync_async_and_classes(app: FastAPI, bus: EventBus) -> None:
    seen: list[Any] = []

    def settings() -> dict[str, str]:
        return {"dsn": "sqlite://"}

    async def engine(cfg: dict[str, str] = Depends(settings)) -> str:
        return f"engine({cfg['dsn']})"

    class Repo:
        def __init__(self, engine: Annotated[str, Depends(engine)]) -> None:
            self.engine = engine

    @bus.on("cat.*")
    async def handler(event: Event, repo: Annotated[Repo, Depends()]) -> None:
        seen.append((event.name, repo.engine))

    emits(app, "cat.created").post("/")
    assert seen == [("cat.created", "engine(sqlite://)")]


def test_yield_dependencies_wrap_each_handler_call(app: FastAPI, bus: EventBus) -> None:
    log: list[str] = []

    async def session() -> AsyncIterator[str]:
        log.append("async enter")
        yield "session"
        log.append("async exit")

    def lock() -> Iterator[str]:
        log.append("sync enter")
        yield "lock"
        log.append("sync exit")

    @bus.on("*")
    async def first(event: Event, s: str = Depends(session), lk: str = Depends(lock)) -> None:
        log.append(f"first {event.name} {s} {lk}")

    @bus.on("*")
    def second(s: Annotated[str, Depends(session)]) -> None:
        log.append("second")

    emits(app, "a", "b").post("/")
    one_call = ["async enter", "sync enter", "first {} session lock", "sync exit", "async exit"]
    second_call = ["async enter", "second", "async exit"]
    expected = [line.format(name) for name in "ab" for line in one_call + second_call]
    assert log == expected


def test_yield_dependency_sees_the_handler_exception(app: FastAPI, bus: EventBus) -> None:
    outcome: list[str] = []

    async def transaction() -> AsyncIterator[None]:
        try:
            yield
            outcome.append("commit")
        except ValueError:
            outcome.append("rollback")
            raise

    @bus.on("boom")
    async def handler(tx: None = Depends(transaction)) -> None:
        raise ValueError("boom")

    emits(app, "boom").post("/")
    assert outcome == ["rollback"]


def test_dependency_cache_is_per_handler_call(app: FastAPI, bus: EventBus) -> None:
    made: list[int] = []

    def counter() -> int:
        made.append(1)
        return len(made)

    def uses_counter(n: int = Depends(counter)) -> int:
        return n

    @bus.on("x")
    def cached(a: int = Depends(counter), b: int = Depends(uses_counter)) -> None:
        assert a == b

    @bus.on("x")
    def uncached(
        a: int = Depends(counter), b: Annotated[int, Depends(counter, use_cache=False)] = 0
    ) -> None:
        assert a != b

    with capture(bus) as seen:
        emits(app, "x").post("/")
    assert seen.failures == []
    assert len(made) == 3  # one for `cached`, two for `uncached`: no cache shared across calls


def test_dependency_overrides_are_read_at_call_time(app: FastAPI, bus: EventBus) -> None:
    seen: list[str] = []

    def real_mailer() -> str:
        return "smtp"

    @bus.on("x")
    def handler(mailer: str = Depends(real_mailer)) -> None:
        seen.append(mailer)

    client = emits(app, "x")
    client.post("/")
    app.dependency_overrides[real_mailer] = lambda: "fake"
    client.post("/")
    app.dependency_overrides.clear()
    client.post("/")
    assert seen == ["smtp", "fake", "smtp"]


@pytest.mark.anyio
async def test_overrides_apply_to_publish_too(app: FastAPI, bus: EventBus) -> None:
    seen: list[str] = []

    def dep() -> str:
        return "real"

    @bus.on("x")
    async def handler(value: str = Depends(dep)) -> None:
        seen.append(value)

    app.dependency_overrides[dep] = lambda: "override"
    await bus.publish("x")
    assert seen == ["override"]


def test_request_and_background_tasks_in_handlers(app: FastAPI, bus: EventBus) -> None:
    log: list[str] = []

    async def later(what: str) -> None:
        log.append(f"background {what}")

    @bus.on("x")
    async def handler(request: Request, tasks: BackgroundTasks) -> None:
        log.append(f"handler saw {request.method} {request.url.path}")
        tasks.add_task(later, "task")

    @app.put("/cats/{cat_id}")
    async def endpoint(cat_id: int, bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("x")

    TestClient(app).put("/cats/3")
    assert log == ["handler saw PUT /cats/3", "background task"]


def test_event_parameter_forms(app: FastAPI, bus: EventBus) -> None:
    seen: list[Any] = []

    @bus.on("cat.created")
    def by_name(event) -> None:  # type: ignore[no-untyped-def]
        seen.append(("by_name", event.name))

    @bus.on("cat.created")
    def by_annotation(e: Annotated[Event, "metadata"]) -> None:
        seen.append(("by_annotation", e.name))

    @bus.on(CatCreated)
    def typed(cat: CatCreated) -> None:
        seen.append(("typed", cat))

    @bus.on("cat.created")
    def no_event() -> None:
        seen.append(("no_event",))

    emits(app, "cat.created").post("/")
    assert seen == [
        ("by_name", "cat.created"),
        ("by_annotation", "cat.created"),
        ("typed", CatCreated(id=1)),
        ("no_event",),
    ]


def test_event_parameter_forms_of_async_handlers(app: FastAPI, bus: EventBus) -> None:
    """Async handlers without dependencies are called directly: the event by position when
    it is the first parameter of the callable itself, else by keyword (keyword-only, or
    behind a ``functools.wraps`` wrapper taking ``**kwargs``)."""
    seen: list[Any] = []

    def logged(func: Any) -> Any:
        @functools.wraps(func)
        async def wrapper(**kwargs: Any) -> None:
            seen.append(("wrapper", sorted(kwargs)))
            await func(**kwargs)

        return wrapper

    @bus.on("cat.created")
    async def positional(event: Event) -> None:
        seen.append(("positional", event.name))

    @bus.on("cat.created")
    async def keyword_only(*, e: Event) -> None:
        seen.append(("keyword_only", e.name))

    @bus.on(CatCreated)
    async def typed(cat: CatCreated) -> None:
        seen.append(("typed", cat))

    class Counter:
        async def __call__(self, event: Event) -> None:
            seen.append(("instance", event.name))

    async def tagged(tag: str, event: Event) -> None:
        seen.append((tag, event.name))

    @bus.on("cat.created")
    @logged
    async def decorated(event: Event) -> None:
        seen.append(("decorated", event.name))

    def passed_on(func: Any) -> Any:
        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> None:
            seen.append(("passed on", len(args), sorted(kwargs)))
            await func(*args, **kwargs)

        return wrapper

    @bus.on("cat.created")
    @passed_on
    async def decorated_again(event: Event) -> None:
        seen.append(("decorated again", event.name))

    def signed(func: Any, wraps: bool) -> Any:  # FastAPI-style: the signature set by hand
        async def wrapper(**kwargs: Any) -> None:
            seen.append(("signed", wraps))
            await func(**kwargs)

        wrapper = functools.wraps(func)(wrapper) if wraps else wrapper
        wrapper.__signature__ = inspect.signature(func)  # type: ignore[attr-defined]
        return wrapper

    async def signed_handler(event: Event) -> None:
        seen.append(("signed handler", event.name))

    bus.on("cat.created")(signed(signed_handler, wraps=False))
    bus.on("cat.created")(signed(signed_handler, wraps=True))

    bus.on("cat.created")(Counter())
    bus.on("cat.created")(functools.partial(tagged, "partial"))
    emits(app, "cat.created").post("/")
    assert seen == [
        ("positional", "cat.created"),
        ("keyword_only", "cat.created"),
        ("typed", CatCreated(id=1)),
        ("wrapper", ["event"]),
        ("decorated", "cat.created"),
        ("passed on", 0, ["event"]),
        ("decorated again", "cat.created"),
        ("signed", False),
        ("signed handler", "cat.created"),
        ("signed", True),
        ("signed handler", "cat.created"),
        ("instance", "cat.created"),
        ("partial", "cat.created"),
    ]


def test_dependants_are_built_once_at_registration(
    app: FastAPI, bus: EventBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[object] = []
    real = fastapi_eventbus._di.get_dependant  # type: ignore[attr-defined]

    def counting(**kwargs: Any) -> Any:
        built.append(kwargs["call"])
        return real(**kwargs)

    monkeypatch.setattr(fastapi_eventbus._di, "get_dependant", counting)

    def dep() -> int:
        return 1

    @bus.on("x")
    def handler(value: int = Depends(dep)) -> None:
        pass

    assert len(built) == 1
    client = emits(app, *["x"] * 5)
    with capture(bus) as seen:
        client.post("/")
        client.post("/")
    assert len(seen.handled) == 10
    assert len(built) == 1


def test_sync_handlers_and_dependencies_run_in_the_threadpool_with_contextvars(
    app: FastAPI, bus: EventBus
) -> None:
    tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="none")
    seen: list[tuple[str, str, bool]] = []
    loop_thread: list[threading.Thread] = []

    def current_tenant() -> str:
        return tenant.get()

    @bus.on("x")
    def handler(dep_tenant: str = Depends(current_tenant)) -> None:
        main = threading.current_thread() is loop_thread[0]
        seen.append((dep_tenant, tenant.get(), main))

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        loop_thread.append(threading.current_thread())
        tenant.set("acme")
        bus.emit("x")

    TestClient(app).post("/")
    assert seen == [("acme", "acme", False)]


class Body_(BaseModel):
    x: int


def _query_handler(event: Event, limit: int) -> None: ...


def _query_annotated(event: Event, limit: Annotated[int, Query()]) -> None: ...


def _body_handler(event: Event, data: Body_) -> None: ...


def _explicit_body(event: Event, data: Annotated[dict[str, int], Body()]) -> None: ...


def _needs_header(x_token: Annotated[str, Header()]) -> str:
    return x_token


def _header_in_sub_dependency(event: Event, token: str = Depends(_needs_header)) -> None: ...


def _two_events(event: Event, other: CatCreated) -> None: ...


def _response_param(event: Event, response: Response) -> None: ...


def _union_of_models(event: CatCreated | CatAdopted) -> None: ...


def _optional_model(event: CatCreated | None) -> None: ...


def _optional_envelope(event: Event | None = None) -> None: ...


def _var_kwargs(event: Event, **kwargs: Any) -> None: ...


def _generator_handler(event: Event) -> Iterator[None]:
    yield


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (_query_handler, "handler tests.test_handlers._query_handler.*'limit'.*\\(query\\)"),
        (_query_annotated, "'limit'.*\\(query\\)"),
        (_body_handler, "'data'.*\\(body\\)"),
        (_explicit_body, "'data'.*\\(body\\)"),
        (
            _header_in_sub_dependency,
            "dependency tests.test_handlers._needs_header of handler .*'x_token'.*header",
        ),
        (_two_events, "more than one event parameter \\('event', 'other'\\)"),
        (_union_of_models, "'event' is annotated with a union .*CatCreated \\| .*CatAdopted"),
        (_optional_model, "'event' is annotated with a union .*CatCreated \\| None"),
        (_optional_envelope, "'event' is annotated with a union .*Event \\| None"),
        (_response_param, "'response' asks for a Response"),
        (_var_kwargs, "'kwargs' is variadic keyword"),
        (_generator_handler, "is a generator"),
    ],
)
def test_unsupported_parameters_fail_at_decoration(
    bus: EventBus, handler: Any, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        bus.on("cat.created")(handler)


def test_unresolvable_annotation_is_named(bus: EventBus) -> None:
    def handler(event: Event, db: "Undefined") -> None:  # type: ignore[name-defined]  # noqa: F821
        pass

    with pytest.raises(
        ConfigurationError, match="'Undefined' of parameter 'db' cannot be resolved"
    ):
        bus.on("x")(handler)


def test_typed_handler_patterns_must_match_its_model(bus: EventBus) -> None:
    def handler(cat: CatCreated) -> None: ...

    with pytest.raises(ConfigurationError, match="never match that name"):
        bus.on("dog.*")(handler)
    with pytest.raises(ConfigurationError, match="at least one event pattern"):
        bus.on()(lambda event: None)


def test_typed_handler_registers_its_schema(app: FastAPI, bus: EventBus) -> None:
    @bus.on(CatCreated)
    def handler(cat: CatCreated) -> None: ...

    @app.post("/")
    def endpoint(bus: EventBus = Depends(get_bus)) -> str:
        try:
            bus.emit("cat.created", {"id": "not an int"})
        except ValueError as exc:
            return type(exc).__name__
        return "accepted"

    assert TestClient(app).post("/").json() == "InvalidEventError"


def test_on_returns_the_function_unchanged(bus: EventBus) -> None:
    async def handler(event: Event) -> None: ...

    assert bus.on("x")(handler) is handler


class Shop:
    def __init__(self, ran: list[tuple[str, str]]) -> None:
        self.ran = ran

    async def charge_card(self, event: Event) -> None:
        self.ran.append(("charge_card", event.name))


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["a function", "a bound method"])
async def test_a_handler_registered_twice_runs_once_per_event(bus: EventBus, kind: str) -> None:
    """Found: one function registered twice on a bus (stacked ``@bus.on`` decorators,
    ``bus.on(pattern)(f)`` in a loop) ran twice for an event both registrations matched: a
    card charged twice, though a handler runs once per event. The second registration
    adds its patterns to the first, whose place in the order the handler keeps."""
    ran: list[tuple[str, str]] = []

    async def charge_card(event: Event) -> None:
        ran.append(("charge_card", event.name))

    shop = Shop(ran)

    def handler() -> Any:  # a bound method is a new object at each access
        return charge_card if kind == "a function" else shop.charge_card

    bus.on("order.placed")(handler())
    bus.on("order.*")(lambda event: ran.append(("notify", event.name)))
    bus.on("order.*")(handler())  # what a stacked @bus.on("order.*") does
    bus.on("order.placed")(handler())  # a pattern it has already: nothing changes
    await bus.publish("order.placed")
    await bus.publish("order.refunded")  # matched by the second registration only
    assert ran == [
        ("charge_card", "order.placed"),
        ("notify", "order.placed"),
        ("charge_card", "order.refunded"),
        ("notify", "order.refunded"),
    ]


@pytest.mark.anyio
async def test_a_handler_registered_again_with_other_options_is_another_handler(
    bus: EventBus,
) -> None:
    """One function registered per event name with its own options, in a loop over a
    configuration: each registration is a handler of its own, with its options (a first
    version of the merge refused it at the decorator, and the app could not start). The
    same options make one handler, whose patterns grow."""
    ran: list[str] = []

    async def audit(event: Event) -> None:
        ran.append(event.name)

    for name, timeout in (("payment.captured", 5.0), ("page.viewed", 0.5)):
        bus.on(name, timeout=timeout)(audit)
    bus.on("page.*", timeout=0.5)(audit)  # the same options as the second: merged into it
    await bus.publish("payment.captured")
    await bus.publish("page.viewed")
    await bus.publish("page.closed")
    assert ran == ["payment.captured", "page.viewed", "page.closed"]
    assert bus.time_limit("payment.captured") == 5.0
    assert bus.time_limit("page.viewed") == 0.5


def test_a_union_naming_an_event_type_is_fine_on_a_dependency(bus: EventBus) -> None:
    """Found: the check refusing a union event parameter refused dependency parameters too
    (``before: CatCreated | None = Depends(...)``): valid handlers could not be registered."""

    def previous() -> CatCreated | None:
        return None

    def handler(
        event: Event,
        before: CatCreated | None = Depends(previous),
        cause: Annotated[Event | None, Depends(lambda: None)] = None,
    ) -> None: ...

    bus.on("cat.created")(handler)
