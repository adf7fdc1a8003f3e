"""The modules the docs embed, run and checked against what the docs say about them.

Each test loads a fresh copy of its example (``docs/`` is not a package), so the
module-level apps, buses and stand-in lists start empty every time.
"""

import asyncio
import contextvars
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any
from uuid import UUID

import pytest
from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.testclient import TestClient
from pydantic import BaseModel

from fastapi_eventbus import (
    BusNotInstalledError,
    ConfigurationError,
    DiscardedEvents,
    Event,
    EventBus,
    EventChainError,
    HandlerFailure,
    InvalidEventError,
    OutsideRequestError,
    get_bus,
)
from fastapi_eventbus.testing import capture
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


# -- testing.md ---------------------------------------------------------------------------------


def test_capture_examples(load: Loader) -> None:
    mod = load("docs/examples/testing_capture.py")
    mod.test_adopting_a_cat_notifies_the_shelter()
    mod.test_adopt_emits_without_running_handlers()
    assert mod.SHELTER_NOTES == [7]


@pytest.mark.anyio
async def test_capture_publish_example(load: Loader) -> None:
    mod = load("docs/examples/testing_capture.py")
    await mod.test_notify_shelter_on_its_own()
    assert mod.SHELTER_NOTES == [9]


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
    assert mod.SHELTER_NOTES == [1]


def test_disabled_by_environment(load: Loader, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTAPI_EVENTBUS_DISABLED", "1")
    mod = load("docs/examples/testing_capture.py")  # read when the EventBus is created
    assert mod.bus.disabled
    with TestClient(mod.app) as client, capture(mod.bus, raise_failures=False) as events:
        assert client.post("/cats/1/adopt").status_code == 200
    assert events.names == ["cat.adopted"]  # still validated and recorded
    assert events.handled == []
    assert mod.SHELTER_NOTES == []


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

    with TestClient(mod.app) as client, capture(mod.bus) as events:
        assert client.post("/imports").status_code == 202
        wait_for(lambda: events.names == ["import.finished"])
        # Leaving the block runs the lifespan shutdown, which waits for the event.
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

    with TestClient(app) as client, capture(bus) as events:
        client.post("/")
        wait_for(lambda: events.names == ["slow"])
    [report] = discarded
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


# -- commit-pitfall.md --------------------------------------------------------------------------


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
