"""The plain-Starlette adapter: `with_bus` and `request_bus`, without FastAPI routing."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from types import ModuleType
from typing import Annotated, Any, assert_type

import pytest
from fastapi import Depends
from starlette.applications import Starlette
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.endpoints import HTTPEndpoint
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from fastapi_eventbus import (
    BusNotInstalledError,
    ConfigurationError,
    DiscardedEvents,
    Event,
    EventBus,
    get_bus,
)
from fastapi_eventbus.starlette import request_bus, with_bus
from fastapi_eventbus.testing import capture
from tests._support import ROOT, load_module, on_response_sent, wait_for


def make_app(bus: EventBus, *routes: Route | WebSocketRoute) -> Starlette:
    app = Starlette(routes=list(routes))
    bus.install(app)
    return app


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def seen(bus: EventBus) -> list[str]:
    """What the handler for every event saw, in order."""
    names: list[str] = []

    @bus.on("*")
    def record(event: Event) -> None:
        names.append(event.name)

    return names


# -- the documented example -----------------------------------------------------------------


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_module(ROOT / "docs/examples/starlette_app.py", monkeypatch)


def test_the_example_handles_events_with_dependencies(example: ModuleType) -> None:
    with TestClient(example.app) as client:
        created = client.post("/cats", json={"name": "Tom"})
        deleted = client.delete("/cats/Tom")
    assert created.status_code == 201
    assert deleted.json() == {"deleted": "Tom"}
    assert example.welcomed == ["welcome, Tom"]
    assert example.audited == ["Tom"]


def test_the_example_runs_handlers_after_the_response_is_sent(example: ModuleType) -> None:
    timeline: list[str] = []
    bus: EventBus = example.bus

    @bus.on("cat.created")
    def note(event: Event) -> None:
        timeline.append("handled")

    app = on_response_sent(example.app, lambda: timeline.append("response sent"))
    with TestClient(app) as client:
        assert client.post("/cats", json={"name": "Tom"}).status_code == 201
    assert timeline == ["response sent", "handled"]


def test_handler_dependencies_can_be_overridden_on_a_starlette_app(example: ModuleType) -> None:
    # Starlette apps have no dependency_overrides; setting the attribute enables them.
    example.app.dependency_overrides = {example.greeting: lambda: "hello"}
    with TestClient(example.app) as client:
        client.post("/cats", json={"name": "Tom"})
    assert example.welcomed == ["hello, Tom"]


# -- when events run --------------------------------------------------------------------------


def test_events_run_after_the_response_s_own_background_task(
    bus: EventBus, seen: list[str]
) -> None:
    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Response:
        bus.emit("report.requested")
        return PlainTextResponse("ok", background=BackgroundTask(seen.append, "own background"))

    with TestClient(make_app(bus, Route("/", endpoint))) as client:
        assert client.get("/").text == "ok"
    assert seen == ["own background", "report.requested"]


def test_events_join_the_response_s_background_tasks(bus: EventBus, seen: list[str]) -> None:
    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(seen.append, "first task")
        bus.emit("report.requested")
        return PlainTextResponse("ok", background=tasks)

    with TestClient(make_app(bus, Route("/", endpoint))) as client:
        client.get("/")
    assert seen == ["first task", "report.requested"]


def test_events_emitted_while_streaming_belong_to_the_request(
    bus: EventBus, seen: list[str]
) -> None:
    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Response:
        bus.emit("export.started")

        async def rows() -> AsyncIterator[str]:
            yield "a\n"
            bus.emit("export.finished")

        return StreamingResponse(rows())

    with TestClient(make_app(bus, Route("/", endpoint))) as client:
        assert client.get("/").text == "a\n"
    assert seen == ["export.started", "export.finished"]


def test_a_request_without_events_adds_no_background_task(bus: EventBus) -> None:
    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Response:
        return PlainTextResponse("ok")

    response = asyncio.run(call_endpoint(bus, endpoint))
    assert response.background is None


def test_late_emits_from_a_task_the_endpoint_started_are_handled(
    bus: EventBus, seen: list[str]
) -> None:
    release = threading.Event()

    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Response:
        async def later() -> None:
            await asyncio.to_thread(release.wait, 5)
            bus.emit("cat.vaccinated")

        request.state.task = asyncio.create_task(later())
        return PlainTextResponse("ok")

    with TestClient(make_app(bus, Route("/", endpoint))) as client:
        client.get("/")
        assert seen == []
        release.set()
        wait_for(lambda: seen == ["cat.vaccinated"])


def test_sync_endpoints_run_in_the_thread_pool(bus: EventBus, seen: list[str]) -> None:
    threads: list[str] = []

    @with_bus
    def endpoint(request: Request, bus: EventBus) -> Response:
        threads.append(threading.current_thread().name)
        bus.emit("cat.created", {"id": 1})
        return PlainTextResponse("ok")

    with TestClient(make_app(bus, Route("/", endpoint))) as client:
        client.get("/")
    assert seen == ["cat.created"]
    assert threads != [threading.main_thread().name]


def test_websocket_events_are_handled_as_they_are_emitted(bus: EventBus) -> None:
    handled: list[Any] = []

    @bus.on("chat.message")
    def record(event: Event) -> None:
        handled.append(event.payload)

    @with_bus
    async def chat(websocket: WebSocket, bus: EventBus) -> None:
        await websocket.accept()
        text = await websocket.receive_text()
        bus.emit("chat.message", text)
        await websocket.send_text("ok")
        await websocket.receive_text()  # the client keeps the session open

    app = make_app(bus, WebSocketRoute("/chat", chat))
    with TestClient(app) as client, client.websocket_connect("/chat") as ws:
        ws.send_text("hi")
        assert ws.receive_text() == "ok"
        wait_for(lambda: handled == ["hi"])  # while the session is still open
        ws.send_text("bye")


def test_handlers_can_chain_events_through_get_bus(bus: EventBus, seen: list[str]) -> None:
    @bus.on("cat.created")
    def chain(event: Event, bus: Annotated[EventBus, Depends(get_bus)]) -> None:
        bus.emit("cat.welcomed")

    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Response:
        bus.emit("cat.created")
        return PlainTextResponse("ok")

    with TestClient(make_app(bus, Route("/", endpoint))) as client:
        client.get("/")
    assert seen == ["cat.created", "cat.welcomed"]


# -- failures ---------------------------------------------------------------------------------


def test_events_of_a_raising_endpoint_are_discarded_and_reported(
    caplog: pytest.LogCaptureFixture, seen: list[str]
) -> None:
    discarded: list[DiscardedEvents] = []
    bus = EventBus(on_discard=discarded.append)
    bus.on("*")(lambda event: seen.append(event.name))

    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Response:
        bus.emit("cat.created")
        raise HTTPException(409, "already exists")

    caplog.set_level(logging.INFO, "fastapi_eventbus")
    with TestClient(make_app(bus, Route("/", endpoint))) as client:
        assert client.get("/").status_code == 409
    assert seen == []
    assert [event.name for d in discarded for event in d.events] == ["cat.created"]
    assert "the endpoint raised HTTPException" in caplog.text


class Transient(Exception):
    """What `RetryOnce` retries."""


class RetryOnce:
    """A pure ASGI middleware calling the app again, with the same scope, after `Transient`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        except Transient:
            await self.app(scope, receive, send)


@pytest.mark.parametrize("fails", [1, 2], ids=["retried", "failed twice"])
def test_each_try_of_a_retried_request_has_its_own_events(fails: int) -> None:
    """Found: the second try took the first try's finished view from the scope: its events
    were handled at once, before its endpoint returned, and even when it raised."""
    discarded: list[DiscardedEvents] = []
    bus = EventBus(on_discard=discarded.append)
    log: list[str] = []
    bus.on("*")(lambda event: log.append(event.name))

    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Response:
        tries = sum(name.startswith("endpoint") for name in log) + 1
        bus.emit(f"try.{tries}")
        await asyncio.sleep(0.01)  # a flush started by the emit would run meanwhile
        log.append(f"endpoint {tries} returns")
        if tries <= fails:
            raise Transient()
        return JSONResponse({"ok": True})

    app = make_app(bus, Route("/", endpoint))
    app.add_middleware(RetryOnce)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/").status_code == (200 if fails == 1 else 500)
    if fails == 1:
        assert log == ["endpoint 1 returns", "endpoint 2 returns", "try.2"]
    else:
        assert log == ["endpoint 1 returns", "endpoint 2 returns"]
    assert [d.events[0].name for d in discarded] == [f"try.{n}" for n in range(1, fails + 1)]


def test_keep_events_on_error_handles_them_anyway() -> None:
    bus = EventBus(keep_events_on_error=True)
    seen: list[str] = []
    bus.on("*")(lambda event: seen.append(event.name))

    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Response:
        bus.emit("payment.failed")
        raise HTTPException(402)

    with TestClient(make_app(bus, Route("/", endpoint))) as client:
        assert client.get("/").status_code == 402
    assert seen == ["payment.failed"]


def test_an_endpoint_that_returns_no_response_fails_loudly(bus: EventBus, seen: list[str]) -> None:
    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Any:
        bus.emit("cat.created")
        return {"not": "a response"}

    client = TestClient(make_app(bus, Route("/", endpoint)))
    with pytest.raises(ConfigurationError, match="returned dict, not a Starlette Response"):
        client.get("/")
    assert seen == []


def test_an_app_without_an_installed_bus_fails_at_the_request() -> None:
    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Response:
        return PlainTextResponse("ok")

    client = TestClient(Starlette(routes=[Route("/", endpoint)]))
    with pytest.raises(BusNotInstalledError, match=r"bus\.install\(app\)"):
        client.get("/")


def test_with_bus_rejects_what_is_not_an_endpoint() -> None:
    with pytest.raises(ConfigurationError, match="decorates an endpoint function"):
        with_bus("create_cat")  # type: ignore[call-overload]


def test_a_decorated_function_called_without_a_request_says_so(bus: EventBus) -> None:
    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Response:
        return PlainTextResponse("ok")

    with pytest.raises(ConfigurationError, match="Request or WebSocket as its last argument"):
        asyncio.run(endpoint("not a request"))  # type: ignore[arg-type]


# -- request_bus ------------------------------------------------------------------------------


def test_request_bus_is_the_endpoint_s_bus(bus: EventBus) -> None:
    same: list[bool] = []

    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Response:
        same.append(request_bus(request) is bus)
        return PlainTextResponse("ok")

    with TestClient(make_app(bus, Route("/", endpoint))) as client:
        client.get("/")
    assert same == [True]


def test_request_bus_without_with_bus_says_what_to_do(bus: EventBus) -> None:
    async def endpoint(request: Request) -> Response:
        request_bus(request)
        return PlainTextResponse("unreachable")

    client = TestClient(make_app(bus, Route("/", endpoint)))
    with pytest.raises(ConfigurationError, match="decorate its Starlette endpoint with"):
        client.get("/")


def test_capture_works_on_a_starlette_app(bus: EventBus) -> None:
    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Response:
        bus.emit("cat.created", {"id": 1})
        return PlainTextResponse("ok")

    with TestClient(make_app(bus, Route("/", endpoint))) as client, capture(bus) as events:
        client.get("/")
    assert events.names == ["cat.created"]


def test_the_lifespan_drains_on_shutdown(bus: EventBus) -> None:
    finished: list[str] = []

    @bus.on("report.requested")
    async def slow(event: Event) -> None:
        await asyncio.sleep(0.2)
        finished.append(event.name)

    emitted = threading.Event()

    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Response:
        async def emit_later() -> None:
            bus.emit("report.requested")
            emitted.set()

        request.state.task = asyncio.create_task(emit_later())
        return PlainTextResponse("ok")

    with TestClient(make_app(bus, Route("/", endpoint))) as client:
        client.get("/")
        assert emitted.wait(5)
        assert finished == []
    assert finished == ["report.requested"]  # shutdown waited for the slow handler


# -- helpers ----------------------------------------------------------------------------------


async def call_endpoint(
    bus: EventBus, endpoint: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Call *endpoint* directly with a bare request of an app that has *bus* installed."""
    app = make_app(bus)
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "app": app}
    return await endpoint(Request(scope))


# -- typing (checked by mypy --strict: an assert_type that no longer holds, or a type: ignore
# -- that is no longer needed, fails the type check) --------------------------------------------


def test_with_bus_types_the_endpoint_starlette_calls() -> None:
    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> JSONResponse:
        return JSONResponse({})

    @with_bus
    def sync_endpoint(request: Request, bus: EventBus) -> PlainTextResponse:
        return PlainTextResponse("")

    class Cat(HTTPEndpoint):
        @with_bus
        async def get(self, request: Request, bus: EventBus) -> Response:
            return PlainTextResponse("")

    assert_type(endpoint, Callable[[Request], Coroutine[Any, Any, JSONResponse]])
    assert_type(sync_endpoint, Callable[[Request], Coroutine[Any, Any, PlainTextResponse]])
    assert_type(Cat.get, Callable[[Cat, Request], Coroutine[Any, Any, Response]])


def test_with_bus_needs_the_bus_as_the_last_parameter() -> None:
    async def no_bus(request: Request) -> Response:
        return PlainTextResponse("")

    wrapped = with_bus(no_bus)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="last argument"):
        asyncio.run(wrapped())


def failing_task() -> None:
    raise RuntimeError("the response's own background task failed")


def test_events_are_handled_when_the_response_s_own_background_task_raises(
    seen: list[str],
) -> None:
    """Found: the flush ran after the response's own background task, so when that raised
    it never ran: the events were neither handled nor reported (until shutdown waited for
    them), and each such request left its events counted as pending for good, until
    ``max_pending_events`` refused every emit of the app."""
    discards: list[DiscardedEvents] = []
    bus = EventBus(max_pending_events=2, on_discard=discards.append)
    bus.on("*")(lambda event: seen.append(event.name))

    @with_bus
    async def endpoint(request: Request, bus: EventBus) -> Response:
        bus.emit("report.requested")
        return PlainTextResponse("ok", background=BackgroundTask(failing_task))

    app = make_app(bus, Route("/", endpoint))
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(4):
            assert client.get("/").text == "ok"
    assert seen == ["report.requested"] * 4
    assert discards == []


class Checkout:
    """A callable instance with ``async def __call__`` as the endpoint."""

    async def __call__(self, request: Request, bus: EventBus) -> Response:
        bus.emit("order.placed")
        return PlainTextResponse("ok")


def test_a_callable_instance_with_async_call_is_an_endpoint(bus: EventBus, seen: list[str]) -> None:
    """Found: it was taken for a sync endpoint and run in the thread pool, where calling it
    only made a coroutine: every request failed, the endpoint never ran."""
    endpoint = with_bus(Checkout())
    with TestClient(make_app(bus, Route("/", endpoint))) as client:
        assert client.get("/").text == "ok"
    assert seen == ["order.placed"]
