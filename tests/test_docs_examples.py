"""The modules the docs embed, run and checked against what the docs say about them.

Each test loads a fresh copy of its example (``docs/`` is not a package), so the
module-level apps, buses and stand-in lists start empty every time.
"""

import asyncio
import contextvars
import functools
import inspect
import logging
import math
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any
from uuid import UUID

import pytest
from fastapi import (
    Depends,
    FastAPI,
    HTTPException,
    Request,
    Response,
    WebSocket,
    WebSocketDisconnect,
)
from fastapi.testclient import TestClient
from pydantic import BaseModel
from starlette.requests import HTTPConnection

from fastapi_eventbus import (
    BusNotInstalledError,
    ConfigurationError,
    DiscardedEvents,
    Event,
    EventBus,
    EventChainError,
    HandlerFailure,
    HandlerFailuresError,
    InvalidEventError,
    OutsideRequestError,
    Retry,
    current_event,
    exceptions,
    get_bus,
)
from fastapi_eventbus.testing import HandledEvent, RecordingForwarder, capture
from tests._support import ROOT, ASGIApp, load_module, on_response_sent, wait_for

Loader = Callable[[str], ModuleType]
Scope = MutableMapping[str, Any]


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch) -> Loader:
    """Import the example at *relative* (to the repository root) afresh, named after its file."""

    def _load(relative: str) -> ModuleType:
        return load_module(ROOT / relative, monkeypatch)

    return _load


def sent_then(mod: ModuleType) -> ASGIApp:
    """*mod*'s app, noting "response sent" in its TIMELINE when the response has gone out."""
    return on_response_sent(mod.app, lambda: mod.TIMELINE.append("response sent"))


# -- index.md -----------------------------------------------------------------------------------


def test_minimal_app_handles_the_event(load: Loader) -> None:
    mod = load("docs/examples/minimal.py")
    with TestClient(mod.app) as client:
        response = client.post("/cats")
    assert response.status_code == 201
    assert mod.welcomed == [1]


# -- quickstart.md: examples/quickstart.py is covered by tests/test_examples.py ----------------


# -- handlers.md --------------------------------------------------------------------------------


def test_handlers_get_their_dependencies(load: Loader) -> None:
    mod = load("docs/examples/handlers_dependencies.py")
    with TestClient(mod.app) as client, capture(mod.bus) as events:
        response = client.post(
            "/orders",
            json={"item": "lamp", "email": "ada@example.com"},
            headers={"X-Request-ID": "req-1"},
        )
    assert response.status_code == 201
    assert events.failures == []
    # A class dependency with a sub-dependency.
    assert mod.OUTBOX == [("shop@example.com", "ada@example.com", "Order 1 confirmed")]
    # One session per handler call: AuditLog and the handler share it (use_cache),
    # it is entered before and closed after the call.
    [session] = mod.SESSIONS
    assert session.rows == ["order.placed 1"]
    assert session.committed
    assert session.closed
    # Request and BackgroundTasks; the task ran after the (sync) handler.
    assert mod.REQUEST_IDS == ["req-1"]
    assert mod.CACHE_WARMED == [1]
    # The chained event.
    assert mod.WAREHOUSE == [1]


def test_handlers_run_in_registration_order_and_chains_run_at_once(load: Loader) -> None:
    mod = load("docs/examples/handlers_dependencies.py")
    with TestClient(mod.app) as client, capture(mod.bus) as events:
        client.post("/orders", json={"item": "lamp", "email": "ada@example.com"})
    calls = [(call.event.name, call.handler.split(".")[-1]) for call in events.handled]
    assert calls == [
        ("order.placed", "send_confirmation"),
        ("order.placed", "record_audit"),
        ("order.placed", "reserve_stock"),
        ("stock.reserved", "notify_warehouse"),  # right after the handler that emitted it
        ("order.placed", "remember_request"),
    ]


def test_several_patterns_and_star_matching_dots(load: Loader) -> None:
    mod = load("docs/examples/handlers_dependencies.py")
    with TestClient(mod.app) as client, capture(mod.bus) as events:
        assert client.delete("/orders/5").status_code == 204
    assert events.handlers_for("order.cancelled") == [
        "handlers_dependencies.record_audit",
        "handlers_dependencies.remember_request",
    ]

    async def publish() -> None:
        await mod.bus.publish("order.refund.requested", {"id": 6})

    with capture(mod.bus) as events:
        asyncio.run(publish())
    assert events.handlers_for("order.refund.requested") == ["handlers_dependencies.record_audit"]
    assert [s.rows for s in mod.SESSIONS] == [["order.cancelled 5"], ["order.refund.requested 6"]]


def test_yield_dependency_exits_when_the_handler_raises(load: Loader) -> None:
    mod = load("docs/examples/handlers_dependencies.py")
    seen: list[Any] = []

    bus: EventBus = mod.bus

    @bus.on("order.cancelled")
    async def explode(event: Event, session: Any = Depends(mod.get_session)) -> None:
        seen.append(session)
        raise RuntimeError("boom")

    with TestClient(mod.app) as client, capture(mod.bus, raise_failures=False) as events:
        client.delete("/orders/1")
    assert [type(call.error) for call in events.failures] == [RuntimeError]
    assert seen[0].closed


def test_handler_dependencies_see_overrides_at_call_time(load: Loader) -> None:
    mod = load("docs/examples/handlers_dependencies.py")
    with TestClient(mod.app) as client:
        client.post("/orders", json={"item": "a", "email": "a@example.com"})
        mod.app.dependency_overrides[mod.get_settings] = lambda: mod.Settings("test@example.com")
        client.post("/orders", json={"item": "b", "email": "b@example.com"})
    assert [sender for sender, _, _ in mod.OUTBOX] == ["shop@example.com", "test@example.com"]


def test_sync_handlers_and_dependencies_see_the_request_contextvars(load: Loader) -> None:
    mod = load("docs/examples/handlers_dependencies.py")
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
    seen: list[str] = []

    def current_request_id() -> str:
        return request_id.get()

    bus: EventBus = mod.bus

    @bus.on("order.cancelled")
    def log_it(event: Event, from_dependency: str = Depends(current_request_id)) -> None:
        seen.extend([from_dependency, request_id.get()])

    inner = mod.app

    async def set_request_id(scope: Scope, receive: Any, send: Any) -> None:
        request_id.set("req-42")
        await inner(scope, receive, send)

    with TestClient(set_request_id) as client:
        client.delete("/orders/1")
    assert seen == ["req-42", "req-42"]


def test_the_request_a_handler_gets(load: Loader) -> None:
    mod = load("docs/examples/handlers_dependencies.py")
    bus: EventBus = mod.bus
    seen: list[tuple[str, str, Any, bool]] = []

    @bus.on("order.cancelled")
    async def inspect(event: Event, request: Request) -> None:
        try:
            await request.body()
        except RuntimeError:
            readable = False
        else:
            readable = True
        user = getattr(request.state, "user", None)
        seen.append((request.method, request.url.path, user, readable))
        assert request.app is app

    app: FastAPI = mod.app

    @app.middleware("http")
    async def set_user(request: Request, call_next: Any) -> Any:
        request.state.user = "ada"
        return await call_next(request)

    with TestClient(app) as client, capture(bus) as events:
        client.delete("/orders/4")
        assert client.portal is not None
        client.portal.call(bus.publish, "order.cancelled", {"id": 5})
    assert events.failures == []
    assert seen == [("DELETE", "/orders/4", "ada", False), ("POST", "/", None, False)]
    assert mod.REQUEST_IDS == [None, None]


def test_publish_applies_dependency_overrides(load: Loader) -> None:
    mod = load("docs/examples/handlers_dependencies.py")
    mod.app.dependency_overrides[mod.get_settings] = lambda: mod.Settings("test@example.com")
    asyncio.run(mod.bus.publish("order.placed", {"id": 1, "email": "a@example.com"}))
    assert mod.OUTBOX == [("test@example.com", "a@example.com", "Order 1 confirmed")]


def test_a_handler_with_a_query_parameter_is_rejected(load: Loader) -> None:
    mod = load("docs/examples/handlers_dependencies.py")
    with pytest.raises(
        ConfigurationError,
        match=r"handler .*list_recent: parameter 'limit' would be read from the HTTP request "
        r"\(query\)",
    ):
        mod.register_handler_with_query_param(mod.bus)


def test_event_parameter_rules() -> None:
    bus = EventBus()
    seen: list[tuple[str, str | None]] = []

    @bus.on("a")
    async def by_name(event) -> None:  # type: ignore[no-untyped-def]
        seen.append(("by_name", event.name))

    @bus.on("a")
    async def no_event() -> None:
        seen.append(("no_event", None))

    asyncio.run(bus.publish("a"))
    assert seen == [("by_name", "a"), ("no_event", None)]

    with pytest.raises(ConfigurationError, match="more than one event parameter"):

        @bus.on("a")
        async def two(first: Event, second: Event) -> None: ...


# -- handlers.md: time limits, retries, the envelope, endpoints and handlers --------------------


def test_a_stuck_handler_times_out_and_the_others_still_run(
    load: Loader, caplog: pytest.LogCaptureFixture
) -> None:
    mod = load("docs/examples/handlers_limits.py")
    mod.STOCK_CACHE.stuck = True
    started = time.monotonic()
    with TestClient(mod.app) as client, capture(mod.bus, raise_failures=False) as events:
        assert client.post("/orders/1/pay", params={"amount": 30}).status_code == 200
    assert 0.5 <= time.monotonic() - started < 5
    [failure] = events.failures
    assert failure.handler == "handlers_limits.refresh_stock_cache"
    assert isinstance(failure.error, TimeoutError)
    assert str(failure.error) == (
        "handler handlers_limits.refresh_stock_cache did not finish within 0.5s"
    )
    assert mod.CARRIER.booked == [1]  # the event's other handlers still ran
    assert list(mod.RECEIPTS.values()) == [1]
    assert any(
        r.levelno == logging.ERROR
        and r.getMessage().startswith(
            "handler handlers_limits.refresh_stock_cache failed for event 'order.paid'"
        )
        for r in caplog.records
    )


def test_the_long_job_of_the_example_runs(load: Loader) -> None:
    mod = load("docs/examples/handlers_limits.py")
    with capture(mod.bus):
        asyncio.run(mod.bus.publish("report.requested", {"month": "2026-11"}))
    assert mod.REPORTS == ["2026-11"]


def test_the_bus_default_none_and_no_limit() -> None:
    assert inspect.signature(EventBus).parameters["handler_timeout"].default == 60.0
    failures: list[HandlerFailure] = []
    bus = EventBus(handler_timeout=0.1, on_error=failures.append)
    finished: list[str] = []

    @bus.on("job")
    async def bounded(event: Event) -> None:
        await asyncio.sleep(0.3)
        finished.append("bounded")

    @bus.on("job", timeout=None)  # the same: the bus's handler_timeout
    async def also_bounded(event: Event) -> None:
        await asyncio.sleep(0.3)
        finished.append("also_bounded")

    @bus.on("job", timeout=math.inf)
    async def unbounded(event: Event) -> None:
        await asyncio.sleep(0.3)
        finished.append("unbounded")

    asyncio.run(bus.publish("job"))
    assert finished == ["unbounded"]
    assert [f.handler.rsplit(".", 1)[-1] for f in failures] == ["bounded", "also_bounded"]
    assert all(isinstance(f.exception, TimeoutError) for f in failures)

    no_default = EventBus(handler_timeout=None)

    @no_default.on("job")
    async def slow(event: Event) -> None:
        await asyncio.sleep(0.3)
        finished.append("slow")

    with capture(no_default):
        asyncio.run(no_default.publish("job"))
    assert finished[-1] == "slow"


@pytest.mark.parametrize("slow_part", ["dependency", "body", "yield exit"])
def test_the_time_limit_covers_the_whole_call(slow_part: str) -> None:
    bus = EventBus()

    async def resource() -> AsyncIterator[None]:
        if slow_part == "dependency":
            await asyncio.sleep(5)
        yield
        if slow_part == "yield exit":
            await asyncio.sleep(5)

    @bus.on("x", timeout=0.1)
    async def handler(event: Event, _: Annotated[None, Depends(resource)]) -> None:
        if slow_part == "body":
            await asyncio.sleep(5)

    started = time.monotonic()
    with capture(bus, raise_failures=False) as events:
        asyncio.run(bus.publish("x"))
    assert time.monotonic() - started < 2
    assert [type(call.error) for call in events.handled] == [TimeoutError]


def test_a_sync_handler_is_reported_at_the_deadline_and_its_thread_runs_on() -> None:
    bus = EventBus()
    release, finished = threading.Event(), threading.Event()

    @bus.on("x", timeout=0.1)
    def blocking(event: Event) -> None:
        release.wait(5)  # a thread cannot be stopped
        finished.set()

    started = time.monotonic()
    try:
        with capture(bus, raise_failures=False) as events:
            asyncio.run(bus.publish("x"))
        assert time.monotonic() - started < 2  # the bus stopped waiting at the deadline
        assert [type(call.error) for call in events.handled] == [TimeoutError]
        assert not finished.is_set()
    finally:
        release.set()
    assert finished.wait(5)  # the thread ran on to its end


def test_a_handler_that_swallows_the_cancellation_is_not_bounded() -> None:
    bus = EventBus()

    @bus.on("x", timeout=0.1)
    async def stubborn(event: Event) -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # keeps going: the bus can only wait

    started = time.monotonic()
    with capture(bus, raise_failures=False) as events:
        asyncio.run(bus.publish("x"))
    assert time.monotonic() - started >= 0.4
    assert [type(call.error) for call in events.handled] == [TimeoutError]


@pytest.mark.parametrize("bad", [0, -1, True, "5", float("nan")])
def test_bad_time_limits_are_refused_where_they_are_given(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="handler_timeout must be a number of seconds"):
        EventBus(handler_timeout=bad)
    with pytest.raises(ConfigurationError, match="timeout must be a number of seconds"):
        EventBus().on("x", timeout=bad)


def _retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "fastapi_eventbus" and r.levelno == logging.WARNING
    ]


def test_a_flaky_handler_is_retried(load: Loader, caplog: pytest.LogCaptureFixture) -> None:
    mod = load("docs/examples/handlers_limits.py")
    mod.CARRIER.outages = 2
    with capture(mod.bus) as events:  # strict: a failure would raise here
        asyncio.run(mod.bus.publish(mod.OrderPaid(id=1, amount=30)))
    assert mod.CARRIER.calls == 3
    assert mod.CARRIER.booked == [1]
    assert events.handlers_for("order.paid").count("handlers_limits.book_shipment") == 1
    first, second = _retry_warnings(caplog)
    assert first.startswith("handler handlers_limits.book_shipment failed for event 'order.paid'")
    assert "attempt 1 of 3 (ConnectionError('carrier API unavailable')); trying again in" in first
    assert "attempt 2 of 3" in second
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_handler_that_keeps_failing_is_reported_once(
    load: Loader, caplog: pytest.LogCaptureFixture
) -> None:
    mod = load("docs/examples/handlers_limits.py")
    mod.CARRIER.outages = 10
    with capture(mod.bus, raise_failures=False) as events:
        asyncio.run(mod.bus.publish(mod.OrderPaid(id=1, amount=30)))
    assert mod.CARRIER.calls == 3
    [failure] = events.failures
    assert failure.handler == "handlers_limits.book_shipment"
    assert isinstance(failure.error, ConnectionError)
    assert len(_retry_warnings(caplog)) == 2
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.getMessage().startswith("handler handlers_limits.book_shipment failed")
    assert list(mod.RECEIPTS.values()) == [1]  # the other handlers are not retried


@pytest.mark.parametrize("recovers", [True, False])
def test_a_failed_attempts_events_are_discarded(recovers: bool) -> None:
    failures: list[HandlerFailure] = []
    discarded: list[DiscardedEvents] = []
    bus = EventBus(on_error=failures.append, on_discard=discarded.append)
    tries: list[int] = []
    booked: list[str] = []

    @bus.on("order.paid", retry=Retry(attempts=3, initial_delay=0.01, max_delay=0.01))
    async def book(event: Event, chained: Annotated[EventBus, Depends(get_bus)]) -> None:
        tries.append(1)
        chained.emit("shipment.booked")
        if not recovers or len(tries) < 3:
            raise ConnectionError("carrier API unavailable")

    @bus.on("shipment.booked")
    async def on_booked(event: Event) -> None:
        booked.append(event.id)

    asyncio.run(bus.publish("order.paid"))
    assert len(tries) == 3
    assert len(booked) == (1 if recovers else 0)  # only a successful attempt's events
    assert len(discarded) == (2 if recovers else 3)
    assert discarded[0].reason.endswith(".book failed (attempt 1)")
    assert [type(f.exception) for f in failures] == ([] if recovers else [ConnectionError])


def test_each_try_has_its_own_time_limit_and_total_timeout_stops_retries() -> None:
    bus = EventBus()
    tries: list[int] = []
    stopped: list[int] = []

    @bus.on("x", timeout=0.1, retry=Retry(attempts=2, initial_delay=0.01, max_delay=0.01))
    async def hangs_once(event: Event) -> None:
        tries.append(1)
        if len(tries) == 1:
            await asyncio.Event().wait()

    @bus.on("y", retry=Retry(attempts=100, initial_delay=0.05, max_delay=0.05, total_timeout=0.2))
    async def always_fails(event: Event) -> None:
        stopped.append(1)
        raise ConnectionError("down")

    with capture(bus):  # strict: the second try of hangs_once succeeded
        asyncio.run(bus.publish("x"))
    assert len(tries) == 2
    with capture(bus, raise_failures=False) as events:
        asyncio.run(bus.publish("y"))
    assert 2 <= len(stopped) < 20
    assert [type(call.error) for call in events.failures] == [ConnectionError]


def test_a_worker_does_not_retry_the_redelivery_does(load: Loader) -> None:
    mod = load("docs/examples/handlers_limits.py")
    mod.CARRIER.outages = 1
    event = Event(name="order.paid", payload={"id": 1, "amount": 30})
    with capture(mod.bus, raise_failures=False):
        failures = asyncio.run(mod.bus.handle(event))  # what the worker calls
    assert mod.CARRIER.calls == 1  # no retry in process
    assert [f.handler for f in failures] == ["handlers_limits.book_shipment"]
    with capture(mod.bus):  # the broker delivers the same event again
        assert asyncio.run(mod.bus.handle(event)) == []
    assert mod.CARRIER.booked == [1]
    receipts: dict[str, int] = mod.RECEIPTS
    assert receipts == {event.id: 1}  # one receipt per event id


def test_typed_handlers_get_the_envelope(load: Loader) -> None:
    mod = load("docs/examples/handlers_limits.py")
    with TestClient(mod.app) as client, capture(mod.bus) as events:
        emitted = client.post("/orders/1/pay", params={"amount": 30}).json()["event_id"]
    published = asyncio.run(mod.bus.publish(mod.OrderPaid(id=2, amount=5)))
    assert events.emitted[0].id == emitted
    receipts: dict[str, int] = mod.RECEIPTS
    assert receipts == {emitted: 1, published.id: 2}


def test_current_event_in_dependencies_and_both_spellings() -> None:
    bus = EventBus()
    seen: list[str] = []

    def event_id(event: Annotated[Event, Depends(current_event)]) -> str:
        return event.id  # a sync dependency, in the threadpool

    @bus.on("x")
    async def handler(
        from_dependency: Annotated[str, Depends(event_id)],
        event: Event = Depends(current_event),
    ) -> None:
        seen.extend([from_dependency, event.id])

    published = asyncio.run(bus.publish("x"))
    assert seen == [published.id, published.id]


def test_current_event_in_an_endpoint_is_a_configuration_error(load: Loader) -> None:
    mod = load("docs/examples/handlers_limits.py")
    app: FastAPI = mod.app

    @app.get("/envelope")
    async def envelope(event: Annotated[Event, Depends(current_event)]) -> None: ...

    with pytest.raises(ConfigurationError, match="only available while a handler runs"):
        TestClient(app).get("/envelope")


@pytest.mark.filterwarnings("error::RuntimeWarning")  # "coroutine ... was never awaited"
def test_wrapped_partial_and_awaitable_returning_handlers_run() -> None:
    bus = EventBus()
    ran: list[str] = []

    def logged(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return func(*args, **kwargs)

        return wrapper

    async def wrapped(event: Event) -> None:
        ran.append("wrapped")

    async def notify(channel: str, event: Event) -> None:
        ran.append(channel)

    def returns_awaitable(event: Event) -> Awaitable[None]:
        return notify("awaitable", event)

    bus.on("x")(logged(wrapped))
    bus.on("x")(functools.partial(notify, "partial"))
    bus.on("x")(returns_awaitable)
    with capture(bus):
        asyncio.run(bus.publish("x"))
    assert ran == ["wrapped", "partial", "awaitable"]


def test_request_and_http_connection_and_the_lifespan_state() -> None:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        yield {"pool": "the pool"}

    app = FastAPI(lifespan=lifespan)
    bus = EventBus()
    bus.install(app)
    seen: list[tuple[str, str, str, str, int]] = []

    @bus.on("x")
    async def handler(event: Event, request: Request, connection: HTTPConnection) -> None:
        state = (request.state.pool, connection.state.pool)
        seen.append((request.method, request.url.path, *state, len(request.headers)))

    with TestClient(app) as client:
        assert client.portal is not None
        with capture(bus):
            client.portal.call(bus.publish, "x")
            client.portal.call(bus.handle, Event(name="x"))
    assert seen == [("POST", "/", "the pool", "the pool", 0)] * 2


def test_parameters_fastapi_would_not_fill_are_refused() -> None:
    bus = EventBus()
    with pytest.raises(ConfigurationError, match="would never fill parameter 'first'"):

        @bus.on("x")
        def two_requests(event: Event, first: Request, second: Request) -> None: ...

    with pytest.raises(ConfigurationError, match="asks for a Response"):

        @bus.on("x")
        def response(event: Event, response: Response) -> None: ...

    with pytest.raises(ConfigurationError, match="asks for a WebSocket"):

        @bus.on("x")
        def websocket(event: Event, websocket: WebSocket) -> None: ...


# -- typed-events.md ----------------------------------------------------------------------------


def test_typed_event_model_round_trip(load: Loader) -> None:
    mod = load("docs/examples/typed_events.py")
    cat = {"id": 1, "name": "Tom", "born": "2020-05-01"}
    with TestClient(mod.app) as client:
        response = client.post("/cats", json=cat)
    assert response.status_code == 201
    [greeted] = mod.GREETED
    assert isinstance(greeted, mod.CatCreated)
    assert greeted.born == date(2020, 5, 1)
    assert mod.RECORDED == [("cat.created", {"id": 1, "name": "Tom", "born": "2020-05-01"})]


def test_typed_handler_registers_its_model_as_the_schema(load: Loader) -> None:
    mod = load("docs/examples/typed_events.py")
    with pytest.raises(InvalidEventError, match="does not match its schema CatCreated"):
        asyncio.run(mod.bus.publish("cat.created", {"id": "not a number", "name": "Tom"}))


def test_registered_schema_validates_at_emit(load: Loader) -> None:
    mod = load("docs/examples/typed_events.py")
    with TestClient(mod.app) as client:
        assert client.post("/cats/3/rename", json={"new_name": "Kit"}).status_code == 200
        with pytest.raises(InvalidEventError, match="does not match its schema CatRenamed"):
            client.post("/cats/3/rename", json={"new_name": ""})
    assert mod.RECORDED == [("cat.renamed", {"id": 3, "new_name": "Kit"})]
    assert issubclass(InvalidEventError, ValueError)


def test_payloads_become_json_data(load: Loader) -> None:
    mod = load("docs/examples/typed_events.py")
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    uid = UUID("12345678-1234-5678-1234-567812345678")
    payload = {"at": when, "uid": uid, "price": Decimal("1.50"), "pair": (1, 2)}

    async def publish(value: object) -> Event:
        result: Event = await mod.bus.publish("shop.thing", value)
        return result

    event = asyncio.run(publish(payload))
    assert event.payload == {
        "at": "2024-01-02T03:04:05Z",
        "uid": "12345678-1234-5678-1234-567812345678",
        "price": "1.50",
        "pair": [1, 2],
    }
    for bad in (float("nan"), {"x": float("inf")}, object()):
        with pytest.raises(InvalidEventError):
            asyncio.run(publish(bad))


def test_models_without_an_event_name_are_rejected(load: Loader) -> None:
    mod = load("docs/examples/typed_events.py")

    class Untitled(BaseModel):
        id: int

    with pytest.raises(InvalidEventError, match="has no __event_name__"):
        asyncio.run(mod.bus.publish(Untitled(id=1)))


def test_event_envelope(load: Loader) -> None:
    mod = load("docs/examples/typed_events.py")

    async def publish() -> Event:
        result: Event = await mod.bus.publish(mod.CatCreated(id=1, name="Tom"))
        return result

    first, second = asyncio.run(publish()), asyncio.run(publish())
    assert first.name == "cat.created"
    assert first.id != second.id
    assert first.time.utcoffset() is not None  # timezone-aware
    with pytest.raises(ValueError, match="frozen"):
        first.name = "other"


# -- brokers.md ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_worker_without_a_broker_example(load: Loader) -> None:
    mod = load("docs/examples/testing_worker.py")
    await mod.test_book_payment()
    assert len(mod.PAID) == 1


# -- testing.md ---------------------------------------------------------------------------------


def test_capture_examples(load: Loader) -> None:
    mod = load("docs/examples/testing_capture.py")
    mod.test_adopting_a_cat_notifies_the_shelter()
    mod.test_adopt_emits_without_running_handlers()
    mod.test_a_shelter_outage_is_a_handler_failure()
    assert mod.SHELTER.notes == [7]
    assert mod.app.dependency_overrides == {}


@pytest.mark.anyio
async def test_capture_publish_example(load: Loader) -> None:
    mod = load("docs/examples/testing_capture.py")
    await mod.test_notify_shelter_on_its_own()
    assert mod.SHELTER.notes == [9]


def test_capture_sees_handler_failures(load: Loader) -> None:
    mod = load("docs/examples/testing_capture.py")

    bus: EventBus = mod.bus

    @bus.on("cat.adopted")
    async def broken(event: Event) -> None:
        raise LookupError("no such shelter")

    with TestClient(mod.app) as client, capture(mod.bus, raise_failures=False) as events:
        assert client.post("/cats/1/adopt").status_code == 200
    [failure] = events.failures
    assert failure.handler.endswith("broken")
    assert isinstance(failure.error, LookupError)
    assert mod.SHELTER.notes == [1]


def test_capture_raises_when_a_handler_failed(load: Loader) -> None:
    mod = load("docs/examples/testing_capture.py")
    mod.app.dependency_overrides[mod.get_shelter] = mod.ClosedShelter
    with TestClient(mod.app) as client:
        with pytest.raises(HandlerFailuresError) as raised, capture(mod.bus):
            assert client.post("/cats/10/adopt").status_code == 200
        error = raised.value
        [call] = error.failures
        assert isinstance(call, HandledEvent)
        assert str(error).splitlines() == [
            "1 handler call(s) failed inside capture(); pass raise_failures=False to assert on "
            "Capture.failures instead:",
            f"- testing_capture.notify_shelter failed for event 'cat.adopted' "
            f"(id={call.event.id}): ConnectionError: the shelter's API is down",
        ]
        assert error.__cause__ is call.error
        assert isinstance(call.error, ConnectionError)
        assert HandlerFailuresError is exceptions.HandlerFailuresError

        def the_tests_own_failure() -> None:
            client.post("/cats/11/adopt")  # the handler fails here too
            raise KeyError("the test's own")

        with pytest.raises(KeyError, match="the test's own"), capture(mod.bus):
            the_tests_own_failure()  # goes through instead of HandlerFailuresError


def test_app_factory_examples(load: Loader) -> None:
    mod = load("docs/examples/app_factory.py")
    mod.test_a_new_user_is_welcomed()
    mod.test_each_app_has_overrides_of_its_own()


def test_one_bus_on_several_apps(load: Loader) -> None:
    mod = load("docs/examples/app_factory.py")
    first, second = mod.create_app(), mod.create_app()
    assert EventBus.of(first) is EventBus.of(second) is mod.bus
    first_mailer, second_mailer = mod.Mailer(), mod.Mailer()
    first.dependency_overrides[mod.get_mailer] = lambda: first_mailer
    second.dependency_overrides[mod.get_mailer] = lambda: second_mailer

    # Requests use their own app's overrides.
    for app, email in ((first, "ada@example.com"), (second, "bob@example.com")):
        with TestClient(app) as client:
            client.post("/users", params={"email": email})
    assert first_mailer.sent == ["ada@example.com"]
    assert second_mailer.sent == ["bob@example.com"]

    # publish() uses the app whose lifespan started last, or else the app installed last.
    with TestClient(first) as client:
        assert client.portal is not None
        client.portal.call(mod.bus.publish, "user.created", {"email": "lifespan@example.com"})
    assert first_mailer.sent[-1] == "lifespan@example.com"
    third = mod.create_app()
    third_mailer = mod.Mailer()
    third.dependency_overrides[mod.get_mailer] = lambda: third_mailer
    asyncio.run(mod.bus.publish("user.created", {"email": "installed@example.com"}))
    assert third_mailer.sent == ["installed@example.com"]


def test_of_an_app_without_a_bus() -> None:
    with pytest.raises(BusNotInstalledError, match=r"bus\.install\(app\)"):
        EventBus.of(FastAPI())


def test_disabled_by_environment(load: Loader, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTAPI_EVENTBUS_DISABLED", "1")
    mod = load("docs/examples/testing_capture.py")  # read when the EventBus is created
    assert mod.bus.disabled
    with TestClient(mod.app) as client, capture(mod.bus, raise_failures=False) as events:
        assert client.post("/cats/1/adopt").status_code == 200
    assert events.names == ["cat.adopted"]  # still validated and recorded
    assert events.handled == []
    assert mod.SHELTER.notes == []


def test_disabled_bus_still_validates() -> None:
    bus = EventBus(disabled=True)
    with pytest.raises(InvalidEventError):
        asyncio.run(bus.publish("x", float("nan")))


def test_override_examples(load: Loader) -> None:
    mod = load("docs/examples/override_bus.py")
    mod.test_adopter_gets_an_email()
    mod.test_with_a_bus_of_its_own()
    assert mod.app.dependency_overrides == {}


def test_override_bus_replaces_the_app_bus(load: Loader) -> None:
    mod = load("docs/examples/override_bus.py")
    mod.app.dependency_overrides[get_bus] = EventBus().dependency
    with TestClient(mod.app) as client, capture(mod.bus) as events:
        client.post("/cats/2/adopt", params={"email": "bob@example.com"})
    assert events.emitted == []  # the app's bus (and its SMTP handler) never saw the event


# -- semantics.md: when events are handled ------------------------------------------------------


def test_startup_publish_runs_in_the_lifespan(load: Loader) -> None:
    mod = load("docs/examples/semantics_timing.py")
    with TestClient(mod.app):
        assert mod.TIMELINE == ["handled app.started"]


def test_events_are_handled_after_the_response_in_order(load: Loader) -> None:
    mod = load("docs/examples/semantics_timing.py")
    with TestClient(sent_then(mod)) as client:
        mod.TIMELINE.clear()
        client.post("/orders")
    assert mod.TIMELINE == [
        "response sent",
        "handled order.placed",
        "handled order.paid",
        "endpoint's background task",
    ]


def test_response_with_its_own_background(load: Loader) -> None:
    mod = load("docs/examples/semantics_timing.py")
    with TestClient(sent_then(mod)) as client:
        mod.TIMELINE.clear()
        client.post("/reports")
    assert mod.TIMELINE == [
        "response sent",
        "response's background",
        "handled report.requested",
    ]


def test_streaming_response(load: Loader) -> None:
    mod = load("docs/examples/semantics_timing.py")
    with TestClient(sent_then(mod)) as client:
        mod.TIMELINE.clear()
        assert client.get("/export").text == "a\nb\n"
    assert mod.TIMELINE == [
        "response sent",
        "handled export.started",
        "handled export.finished",
    ]


def test_websocket_events_are_handled_as_emitted(load: Loader) -> None:
    mod = load("docs/examples/semantics_timing.py")
    with TestClient(mod.app) as client, client.websocket_connect("/chat") as websocket:
        mod.TIMELINE.clear()
        websocket.send_text("hello")
        assert websocket.receive_text() == "ok"
        wait_for(lambda: mod.TIMELINE == ["handled chat.message"])  # session still open
        websocket.send_text("again")
        assert websocket.receive_text() == "ok"
        wait_for(lambda: len(mod.TIMELINE) == 2)
    assert mod.TIMELINE == ["handled chat.message", "handled chat.message"]


def test_websocket_events_reach_handlers_with_dependencies(load: Loader) -> None:
    mod = load("docs/examples/semantics_timing.py")

    bus: EventBus = mod.bus

    @bus.on("chat.message")
    async def with_dependency(event: Event, bus: EventBus = Depends(get_bus)) -> None:
        pass

    with TestClient(mod.app) as client, capture(mod.bus) as events:
        with client.websocket_connect("/chat") as websocket:
            websocket.send_text("hello")
            assert websocket.receive_text() == "ok"
        wait_for(lambda: len(events.handled) == 2)
    assert events.failures == []


def test_events_emitted_after_the_flush_are_handled_and_drained(load: Loader) -> None:
    mod = load("docs/examples/semantics_timing.py")

    bus: EventBus = mod.bus

    @bus.on("import.finished")
    async def slow(event: Event) -> None:
        await asyncio.sleep(0.2)
        mod.TIMELINE.append("slow handler done")

    with capture(mod.bus) as events, TestClient(mod.app) as client:
        assert client.post("/imports").status_code == 202
        wait_for(lambda: events.names == ["app.started", "import.finished"])  # the lifespan's
        # Leaving the client runs the lifespan shutdown, which waits for the event (and then
        # capture ends: it warns about events it would leave running).
    assert mod.TIMELINE[-2:] == ["handled import.finished", "slow handler done"]


def test_shutdown_drains_before_the_apps_own_shutdown_code() -> None:
    order: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        order.append("app shutdown code")

    bus = EventBus()
    app = FastAPI(lifespan=lifespan)
    bus.install(app)

    @bus.on("late")
    async def slow(event: Event) -> None:
        await asyncio.sleep(0.1)
        order.append("handled late")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, scoped: EventBus = Depends(get_bus)) -> None:
        await websocket.accept()
        scoped.emit("late")
        await websocket.close()

    with (
        TestClient(app) as client,
        client.websocket_connect("/ws") as websocket,
        pytest.raises(WebSocketDisconnect),
    ):
        websocket.receive_text()
    assert order == ["handled late", "app shutdown code"]


def test_websocket_events_survive_an_endpoint_error() -> None:
    handled: list[str] = []
    bus = EventBus()
    app = FastAPI()
    bus.install(app)

    @bus.on("*")
    async def record(event: Event) -> None:
        handled.append(event.name)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, scoped: EventBus = Depends(get_bus)) -> None:
        await websocket.accept()
        scoped.emit("before.error")
        raise RuntimeError("boom")

    with TestClient(app) as client:
        with pytest.raises(RuntimeError), client.websocket_connect("/ws") as websocket:
            websocket.receive_text()
        wait_for(lambda: handled == ["before.error"])


def test_shutdown_reports_what_did_not_finish(caplog: pytest.LogCaptureFixture) -> None:
    discarded: list[DiscardedEvents] = []
    bus = EventBus(shutdown_timeout=0.2, on_discard=discarded.append)
    app = FastAPI()
    bus.install(app)
    tasks: set[asyncio.Task[None]] = set()

    @bus.on("slow")
    async def slow(event: Event) -> None:
        await asyncio.sleep(5)

    async def later(scoped: EventBus) -> None:
        await asyncio.sleep(0.05)  # after the request's own flush
        scoped.emit("slow")

    @app.post("/")
    async def endpoint(scoped: EventBus = Depends(get_bus)) -> None:
        task = asyncio.create_task(later(scoped))
        tasks.add(task)

    with capture(bus, raise_failures=False) as events, TestClient(app) as client:
        client.post("/")
        wait_for(lambda: events.names == ["slow"])
    [report] = discarded
    [cut_off] = events.failures  # cancelled at the deadline: a failure for `capture` too
    assert isinstance(cut_off.error, asyncio.CancelledError)
    assert [event.name for event in report.events] == ["slow"]
    assert report.reason == "shutdown did not finish within 0.2s"
    assert any(
        r.levelno == logging.ERROR and "did not finish within 0.2s" in r.getMessage()
        for r in caplog.records
    )


# -- semantics.md: errors -----------------------------------------------------------------------


def test_endpoint_error_discards_the_events(load: Loader, caplog: pytest.LogCaptureFixture) -> None:
    mod = load("docs/examples/semantics_errors.py")
    caplog.set_level(logging.INFO, logger="fastapi_eventbus")
    with TestClient(mod.app) as client:
        response = client.post("/payments", json={"amount": 10, "card": "declined"})
    assert response.status_code == 402
    assert mod.LEDGER == []
    [discarded] = mod.DISCARDED
    assert [event.name for event in discarded.events] == ["payment.received"]
    assert discarded.reason == "the endpoint raised HTTPException"
    assert isinstance(discarded.exception, HTTPException)
    assert any(
        r.levelno == logging.INFO
        and r.getMessage().startswith("discarded 1 event(s) because the endpoint raised")
        for r in caplog.records
    )


def test_publish_does_not_raise_handler_failures(load: Loader) -> None:
    mod = load("docs/examples/semantics_errors.py")
    asyncio.run(mod.bus.publish("payment.received", {"amount": 5000, "card": "ok"}))
    assert [type(f.exception) for f in mod.FAILURES] == [ValueError]
    assert mod.LEDGER == [5000]


def test_a_failing_hook_is_logged_and_contained(caplog: pytest.LogCaptureFixture) -> None:
    def broken_hook(failure: HandlerFailure) -> None:
        raise RuntimeError("hook is broken")

    bus = EventBus(on_error=broken_hook)

    @bus.on("x")
    async def fails(event: Event) -> None:
        raise ValueError("handler is broken")

    asyncio.run(bus.publish("x"))
    assert any("hook" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


def test_keep_events_on_error() -> None:
    handled: list[str] = []
    bus = EventBus(keep_events_on_error=True)
    app = FastAPI()
    bus.install(app)

    @bus.on("*")
    async def record(event: Event) -> None:
        handled.append(event.name)

    @app.post("/")
    async def endpoint(scoped: EventBus = Depends(get_bus)) -> None:
        scoped.emit("kept")
        raise HTTPException(409)

    with TestClient(app) as client:
        assert client.post("/").status_code == 409
        wait_for(lambda: handled == ["kept"])


def test_a_failing_handler_is_isolated(load: Loader, caplog: pytest.LogCaptureFixture) -> None:
    mod = load("docs/examples/semantics_errors.py")
    with TestClient(mod.app) as client:
        assert client.post("/payments", json={"amount": 5000, "card": "ok"}).status_code == 200
        assert client.post("/payments", json={"amount": 20, "card": "ok"}).status_code == 200
    [failure] = mod.FAILURES
    assert failure.handler == "semantics_errors.issue_invoice"
    assert failure.event.name == "payment.received"
    assert isinstance(failure.exception, ValueError)
    assert mod.LEDGER == [5000, 20]  # the other handler ran both times
    assert mod.INVOICES == [20]  # the failed handler's invoice.issued was discarded
    [discarded] = mod.DISCARDED
    assert [event.name for event in discarded.events] == ["invoice.issued"]
    assert discarded.reason == "handler semantics_errors.issue_invoice failed"
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == (
        f"handler semantics_errors.issue_invoice failed for event 'payment.received' "
        f"(id={failure.event.id})"
    )
    assert record.exc_info is not None


def test_a_chain_loop_stops_at_max_chain_depth(load: Loader) -> None:
    mod = load("docs/examples/semantics_errors.py")
    with TestClient(mod.app) as client, capture(mod.bus, raise_failures=False) as events:
        assert client.post("/meow").status_code == 200
    assert len(events.handled) == 9  # the emitted event, then max_chain_depth=8 chained ones
    [failure] = events.failures
    assert failure is events.handled[-1]
    assert isinstance(failure.error, EventChainError)
    assert isinstance(mod.FAILURES[0].exception, EventChainError)


def test_a_swallowed_handler_exception_is_still_a_failure(load: Loader) -> None:
    mod = load("docs/examples/semantics_errors.py")
    asyncio.run(mod.bus.publish("refund.requested", {"amount": 500}))
    assert mod.ROLLED_BACK == [500]  # the dependency caught the exception
    [failure] = mod.FAILURES  # and the call failed all the same
    assert failure.handler == "semantics_errors.refund"
    assert isinstance(failure.exception, ValueError)
    assert failure.exception.__notes__ == [
        "a yield dependency of the handler caught this exception and did not re-raise it"
    ]
    asyncio.run(mod.bus.publish("refund.requested", {"amount": 20}))
    assert len(mod.FAILURES) == 1


def test_an_event_nothing_handles_is_warned_about_once(
    load: Loader, caplog: pytest.LogCaptureFixture
) -> None:
    mod = load("docs/examples/semantics_errors.py")
    with TestClient(mod.app) as client:
        client.post("/payments", json={"amount": 10, "card": "ok"})
    assert [r for r in caplog.records if r.name == "fastapi_eventbus.unmatched"] == []

    async def publish_twice() -> str:
        first: Event = await mod.bus.publish("payment.recieved")  # a typo
        await mod.bus.publish("payment.recieved")
        return first.id

    event_id = asyncio.run(publish_twice())
    [record] = [r for r in caplog.records if r.name == "fastapi_eventbus.unmatched"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"event 'payment.recieved' (id={event_id}) matches no handler and no forwarder: "
        "check the patterns given to @bus.on and bus.forward (warned once per event name; "
        "on_discard hears of each)"
    )


def test_silencing_the_unmatched_warning(load: Loader, caplog: pytest.LogCaptureFixture) -> None:
    mod = load("docs/examples/semantics_errors.py")
    unmatched = logging.getLogger("fastapi_eventbus.unmatched")
    level = unmatched.level
    try:
        mod.silence_unmatched_warnings()
        asyncio.run(mod.bus.publish("audit.login"))
    finally:
        unmatched.setLevel(level)
    assert [r for r in caplog.records if r.name == "fastapi_eventbus.unmatched"] == []


@pytest.mark.parametrize("pattern", [" user.*", "user.* "])
def test_a_pattern_that_can_never_match_is_refused(pattern: str) -> None:
    bus = EventBus()
    with pytest.raises(
        ConfigurationError, match=re.escape(f"the pattern {pattern!r} can never match")
    ):
        bus.on(pattern)
    with pytest.raises(ConfigurationError, match="can never match"):
        bus.forward(pattern, RecordingForwarder())


def test_on_without_parentheses_says_what_to_write() -> None:
    bus = EventBus()
    with pytest.raises(ConfigurationError, match=r'write @bus.on\("pattern"\) with parentheses'):

        @bus.on  # type: ignore[arg-type]
        async def handler(event: Event) -> None: ...


def test_emit_on_the_application_bus(load: Loader) -> None:
    mod = load("docs/examples/semantics_errors.py")
    with pytest.raises(OutsideRequestError, match=r"await bus\.publish"):
        mod.bus.emit("payment.received", {"amount": 1, "card": "ok"})


def test_get_bus_without_install() -> None:
    app = FastAPI()

    @app.post("/")
    async def endpoint(scoped: EventBus = Depends(get_bus)) -> None: ...

    with pytest.raises(BusNotInstalledError, match=r"bus\.install\(app\)"):
        TestClient(app).post("/")


def test_drain_by_hand() -> None:
    bus = EventBus()

    @bus.on("slow")
    async def slow(event: Event) -> None:
        await asyncio.sleep(5)

    async def scenario() -> list[Event]:
        task = asyncio.create_task(bus.publish("slow"))
        await asyncio.sleep(0.01)
        unfinished: list[Event] = await bus.drain(timeout=0.05)
        task.cancel()
        return unfinished

    assert [event.name for event in asyncio.run(scenario())] == ["slow"]


# -- database.md (Without SQLAlchemy) ------------------------------------------------------------


@pytest.fixture
def pitfall(load: Loader, tmp_path: Path) -> ModuleType:
    mod = load("docs/examples/commit_pitfall.py")
    mod.app.state.database = tmp_path / "users.sqlite3"
    mod.create_tables(mod.app.state.database)
    return mod


def test_request_scoped_commit_comes_after_the_handlers(pitfall: ModuleType) -> None:
    with TestClient(pitfall.app) as client:
        assert client.post("/v1/users", json={"email": "ada@example.com"}).json() == {"id": 1}
    assert pitfall.MISSING == [1]
    assert pitfall.WELCOMED == []
    with sqlite3.connect(pitfall.app.state.database) as db:  # committed, but too late
        assert db.execute("SELECT email FROM users").fetchall() == [("ada@example.com",)]


@pytest.mark.parametrize("path", ["/v2/users", "/v3/users"])
def test_committing_before_the_response_fixes_it(pitfall: ModuleType, path: str) -> None:
    with TestClient(pitfall.app) as client:
        assert client.post(path, json={"email": "ada@example.com"}).status_code == 201
    assert pitfall.MISSING == []
    assert pitfall.WELCOMED == ["ada@example.com"]


def test_a_failing_function_scoped_commit_discards_the_events() -> None:
    handled: list[str] = []
    discarded: list[DiscardedEvents] = []
    bus = EventBus(on_discard=discarded.append)
    app = FastAPI()
    bus.install(app)

    def failing_commit() -> Iterator[None]:
        yield
        raise RuntimeError("commit failed")

    @bus.on("*")
    async def record(event: Event) -> None:
        handled.append(event.name)

    @app.post("/")
    async def endpoint(
        _: None = Depends(failing_commit, scope="function"),
        scoped: EventBus = Depends(get_bus),
    ) -> None:
        scoped.emit("user.created")

    with TestClient(app) as client, pytest.raises(RuntimeError, match="commit failed"):
        client.post("/")
    assert handled == []
    assert [event.name for d in discarded for event in d.events] == ["user.created"]
