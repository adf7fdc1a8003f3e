"""Flush semantics: when a request's events run, in what order, and what happens on errors."""

import asyncio
import contextlib
import functools
import importlib.util
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel
from starlette.background import BackgroundTask

from fastapi_eventbus import DiscardedEvents, Event, EventBus, EventChainError, get_bus
from fastapi_eventbus.forwarders import Forwarder
from fastapi_eventbus.testing import capture
from tests.conftest import Hooks


def record(bus: EventBus, pattern: str = "*") -> list[str]:
    """Register a handler that appends ``handler:name`` for every event it gets."""
    log: list[str] = []

    @bus.on(pattern)
    async def recorder(event: Event) -> None:
        log.append(event.name)

    return log


async def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Poll *condition* on the event loop until it holds (fails the test after *timeout*)."""
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - the condition is plain test state
            await asyncio.sleep(0.005)


def test_events_run_after_the_endpoint_in_emission_order(app: FastAPI, bus: EventBus) -> None:
    log: list[str] = []

    @bus.on("*")
    async def first(event: Event) -> None:
        log.append(f"first {event.name}")

    @bus.on("b", "c")
    def second(event: Event) -> None:
        log.append(f"second {event.name}")

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        for name in "abc":
            bus.emit(name)
        log.append("endpoint returned")

    TestClient(app).post("/")
    assert log == [
        "endpoint returned",
        "first a",
        "first b",
        "second b",
        "first c",
        "second c",
    ]


@pytest.mark.parametrize("exc", [HTTPException(404), ValueError("boom")])
def test_events_are_discarded_when_the_endpoint_raises(
    app: FastAPI, bus: EventBus, hooks: Hooks, exc: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    log = record(bus)

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("doomed.one")
        bus.emit("doomed.two")
        raise exc

    caplog.set_level(logging.INFO, "fastapi_eventbus")
    with capture(bus) as seen:
        TestClient(app, raise_server_exceptions=False).post("/")
    assert log == []
    assert [d.reason for d in hooks.discards] == [f"the endpoint raised {type(exc).__name__}"]
    assert hooks.discards[0].ids == [e.id for e in seen.emitted]
    assert hooks.discards[0].exception is exc
    assert f"discarded 2 event(s) because the endpoint raised {type(exc).__name__}" in caplog.text


def test_events_are_discarded_when_a_yield_dependency_swallows_the_endpoint_s_exception(
    app: FastAPI, bus: EventBus, hooks: Hooks, caplog: pytest.LogCaptureFixture
) -> None:
    """A session dependency that rolls back and does not raise again: FastAPI answers 500
    ("Response not awaited"), and the request's events go as if the dependency had raised."""
    log = record(bus)
    failure = ValueError("boom")

    async def rolling_back_session() -> AsyncIterator[None]:
        try:
            yield
        except ValueError:
            log.append("rolled back")  # and not raised again

    @app.post("/")
    async def endpoint(
        bus: EventBus = Depends(get_bus), session: None = Depends(rolling_back_session)
    ) -> None:
        bus.emit("order.placed")
        raise failure

    caplog.set_level(logging.INFO, "fastapi_eventbus")
    with capture(bus) as seen, TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/").status_code == 500
    assert log == ["rolled back"]  # order.placed was not handled
    assert [d.ids for d in hooks.discards] == [[e.id for e in seen.emitted]]
    assert hooks.discards[0].exception is failure
    assert "which a yield dependency caught" in hooks.discards[0].reason
    assert "discarded 1 event(s) because the endpoint raised ValueError" in caplog.text


HAS_GENERATOR_ENDPOINTS = importlib.util.find_spec("fastapi.sse") is not None
"""Whether the installed FastAPI streams what a generator endpoint yields (0.134 and later)."""


@pytest.mark.skipif(not HAS_GENERATOR_ENDPOINTS, reason="this FastAPI has no generator endpoints")
@pytest.mark.parametrize("stream", ["jsonl", "sse", "raw"])
@pytest.mark.parametrize("when", ["before its first item", "half-way"])
def test_a_generator_endpoint_that_raises_has_its_events_discarded(
    bus: EventBus, hooks: Hooks, stream: str, when: str
) -> None:
    """A generator endpoint runs while its response is sent: if it raises, the endpoint
    raised, whatever the kind of stream (before, only Server-Sent Events were discarded;
    JSON Lines and raw streams were handled, with a WARNING saying the endpoint returned)."""
    from fastapi.sse import EventSourceResponse

    app = FastAPI()
    bus.install(app)
    log = record(bus)
    classes: dict[str, Any] = {"sse": EventSourceResponse, "raw": StreamingResponse}
    kind = {"response_class": classes[stream]} if stream in classes else {}

    @app.get("/", **kind)
    async def rows(bus: EventBus = Depends(get_bus)) -> AsyncIterator[Any]:
        bus.emit("import.started")
        if when == "half-way":
            yield b"1" if stream == "raw" else 1
        raise HTTPException(409, "already importing")

    client = TestClient(app, raise_server_exceptions=False)
    with client, contextlib.suppress(Exception):  # the stream broke off: the client may raise
        client.get("/")
    assert log == []
    assert [(d.events[0].name, d.reason) for d in hooks.discards] == [
        ("import.started", f"the endpoint raised {type(hooks.discards[0].exception).__name__}")
    ]


async def tagged_rows(tag: str, bus: EventBus = Depends(get_bus)) -> AsyncIterator[int]:
    bus.emit(f"import.{tag}")
    yield 1
    raise ValueError("row 2 is bad")


class RowStream:
    """A callable instance as a generator endpoint."""

    async def __call__(self, bus: EventBus = Depends(get_bus)) -> AsyncIterator[int]:
        bus.emit("import.instance")
        yield 1
        raise ValueError("row 2 is bad")


class SubStream(RowStream):
    """Its ``__call__`` is its base class's."""


class Row(BaseModel):
    id: int


async def invalid_rows(bus: EventBus = Depends(get_bus)) -> AsyncIterator[Row]:
    bus.emit("import.invalid")
    yield Row(id=1)
    yield {"id": "not an int"}  # type: ignore[misc]  # FastAPI refuses it


async def nested_rows(bus: EventBus = Depends(get_bus)) -> StreamingResponse:
    bus.emit("import.nested")

    async def body() -> AsyncIterator[bytes]:
        yield b"1"
        raise ValueError("row 2 is bad")

    return StreamingResponse(body())


def wrapping_partial(endpoint: Any) -> Any:
    """A ``functools.wraps`` wrapper of *endpoint* (a partial): FastAPI sees through both."""

    @functools.wraps(endpoint)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return endpoint(*args, **kwargs)

    return wrapper


def logged(func: Any) -> Any:
    """A decorator without ``functools.wraps``: one code object for all it decorates."""

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await func(*args, **kwargs)

    wrapper.__signature__ = inspect.signature(func)  # type: ignore[attr-defined]
    return wrapper


@logged
async def fetch_row() -> bytes:
    raise ConnectionError("upstream closed mid-stream")


@logged
async def logged_stream(bus: EventBus = Depends(get_bus)) -> StreamingResponse:
    """Returns a stream that fails in a helper carrying the endpoint's own decorator."""
    bus.emit("import.logged")

    async def body() -> AsyncIterator[bytes]:
        yield b"1"
        yield await fetch_row()

    return StreamingResponse(body())


async def checked_remotely(bus: EventBus = Depends(get_bus)) -> Response:
    """Returns; its own background task gets a ResponseValidationError from another app."""
    other = FastAPI()

    @other.get("/", response_model=int)
    async def invalid() -> Any:
        return "not an int"

    async def call_other() -> None:
        transport = httpx.ASGITransport(other)
        async with httpx.AsyncClient(transport=transport, base_url="http://other") as client:
            await client.get("/")

    bus.emit("import.checked")
    return Response("ok", background=BackgroundTask(call_other))


def streamed(func: Any) -> Any:
    """A generator wrapper streaming what *func* returns: FastAPI streams the endpoint."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        for item in await func(*args, **kwargs):
            yield item

    return wrapper


def counted(func: Any) -> Any:
    """A generator wrapper of a generator endpoint, raising once that one is done."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for item in func(*args, **kwargs):
            yield item
        raise ValueError("too few rows")

    return wrapper


@streamed
async def streamed_rows(bus: EventBus = Depends(get_bus)) -> list[int]:
    bus.emit("import.streamed")
    raise ValueError("no rows")


@counted
async def counted_rows(bus: EventBus = Depends(get_bus)) -> AsyncIterator[int]:
    bus.emit("import.counted")
    yield 1


async def inline_task(bus: EventBus = Depends(get_bus)) -> None:
    """Runs a background task itself, which raises: the endpoint raised."""

    async def fails() -> None:
        raise ValueError("the task failed")

    bus.emit("import.inline")
    await BackgroundTask(fails)()


@pytest.mark.skipif(not HAS_GENERATOR_ENDPOINTS, reason="this FastAPI has no generator endpoints")
@pytest.mark.parametrize(
    ("endpoint", "discarded"),
    [
        (functools.partial(tagged_rows, "partial"), True),
        (RowStream(), True),
        (SubStream(), True),
        (invalid_rows, True),  # FastAPI's ResponseValidationError, as for a response_model
        (wrapping_partial(functools.partial(tagged_rows, "wrapped")), True),
        (streamed_rows, True),
        (counted_rows, True),
        (inline_task, True),
        (nested_rows, False),  # the endpoint returned: its body raised
        (logged_stream, False),  # the same, the body failing in code the endpoint shares
        (checked_remotely, False),  # the same, in its response's own background task
    ],
    ids=[
        "a partial",
        "an instance",
        "a subclass's instance",
        "an invalid item",
        "a wrapped partial",
        "a generator wrapper",
        "a generator wrapper raising",
        "a task run inline",
        "a stream",
        "a stream through shared code",
        "a background task",
    ],
)
def test_what_an_endpoint_raised_is_told_from_what_its_response_raised(
    bus: EventBus, hooks: Hooks, endpoint: Callable[..., Any], discarded: bool
) -> None:
    app = FastAPI()
    bus.install(app)
    log = record(bus)
    app.get("/")(endpoint)
    client = TestClient(app, raise_server_exceptions=False)
    with client, contextlib.suppress(Exception):  # the stream broke off: the client may raise
        client.get("/")
    assert (log == [], len(hooks.discards) == 1) == (discarded, discarded)


class Conflict(Exception):
    """What the exception handler and the route class of the next test turn into a 409."""


class ConflictRoute(APIRoute):
    """A custom route class that answers `Conflict` with a response of its own."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await original(request)
            except Conflict:
                return JSONResponse({"detail": "conflict"}, status_code=409)

        return handler


@pytest.mark.parametrize("how", ["exception handler", "response model", "route class"])
def test_what_the_bus_sees_of_an_endpoint_s_exception(
    bus: EventBus, hooks: Hooks, how: str
) -> None:
    """As docs/semantics.md says: an exception handler's response and a failed
    ``response_model`` discard the events (the exception went through FastAPI's handling of
    the request); a route class answering the exception itself hides it from the bus."""
    app = FastAPI()
    bus.install(app)
    log = record(bus)
    app.add_exception_handler(Conflict, lambda _, __: JSONResponse({}, status_code=409))
    router = APIRouter(route_class=ConflictRoute if how == "route class" else APIRoute)

    @router.post("/", response_model=int)
    async def endpoint(bus: EventBus = Depends(get_bus)) -> Any:
        bus.emit("order.placed")
        if how == "response model":
            return "not an int"
        raise Conflict()

    app.include_router(router)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/").status_code == (500 if how == "response model" else 409)
    if how == "route class":
        assert (log, hooks.discards) == (["order.placed"], [])
    else:
        assert log == []
        name = "ResponseValidationError" if how == "response model" else "Conflict"
        assert [d.reason for d in hooks.discards] == [f"the endpoint raised {name}"]


class Transient(Exception):
    """What `RetryOnce` retries."""


class RetryOnce:
    """A pure ASGI middleware calling the app again after a `Transient` failure, within its
    ``except`` block, with the same scope or a copy of it."""

    def __init__(self, app: Any, copy: bool) -> None:
        self.app, self.copy = app, copy

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(dict(scope) if self.copy else scope, receive, send)
        except Transient:
            await self.app(dict(scope) if self.copy else scope, receive, send)


@pytest.mark.parametrize("copy", [True, False], ids=["a copy of the scope", "the same scope"])
@pytest.mark.parametrize("fails", [1, 2], ids=["retried", "failed twice"])
def test_a_retried_request_handles_the_events_of_the_attempt_that_succeeded(
    bus: EventBus, hooks: Hooks, copy: bool, fails: int
) -> None:
    """Each attempt is a request of its own: a failed one's events are discarded, the one that
    succeeds has its events handled after its response, even when a middleware retries in its
    ``except`` block (no exception a yield dependency caught) or passes the same scope again."""
    app = FastAPI()
    bus.install(app)
    app.add_middleware(RetryOnce, copy=copy)
    log = record(bus)
    attempts: list[int] = []

    async def own_task() -> None:
        log.append("own background task")

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> JSONResponse:
        attempts.append(len(attempts) + 1)
        bus.emit(f"attempt.{len(attempts)}")
        await asyncio.sleep(0.01)  # a flush started by the emit would run meanwhile
        log.append(f"endpoint {len(attempts)} returns")
        if len(attempts) <= fails:
            raise Transient()
        return JSONResponse({"ok": True}, background=BackgroundTask(own_task))

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/").status_code == (200 if fails == 1 else 500)
    discarded = [(d.events[0].name, d.reason) for d in hooks.discards]
    if fails == 1:
        assert log == [
            "endpoint 1 returns",
            "endpoint 2 returns",
            "own background task",
            "attempt.2",
        ]
        assert discarded == [("attempt.1", "the endpoint raised Transient")]
    else:
        assert log == ["endpoint 1 returns", "endpoint 2 returns"]
        assert discarded == [
            ("attempt.1", "the endpoint raised Transient"),
            ("attempt.2", "the endpoint raised Transient"),
        ]


def test_keep_events_on_error_handles_them_anyway(hooks: Hooks) -> None:
    bus = EventBus(keep_events_on_error=True, on_discard=hooks.discards.append)
    app = FastAPI()
    bus.install(app)
    log = record(bus)

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("kept")
        raise HTTPException(409)

    with TestClient(app) as client:
        assert client.post("/").status_code == 409
    assert log == ["kept"]
    assert hooks.discards == []


def test_a_response_with_its_own_background_keeps_the_events(app: FastAPI, bus: EventBus) -> None:
    log = record(bus)

    async def own_task() -> None:
        log.append("own background task")

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> JSONResponse:
        bus.emit("emitted")
        return JSONResponse({"ok": True}, background=BackgroundTask(own_task))

    TestClient(app).post("/")
    assert log == ["own background task", "emitted"]


def test_a_streaming_response_keeps_events_emitted_while_streaming(
    app: FastAPI, bus: EventBus
) -> None:
    log = record(bus)

    @app.get("/stream")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> StreamingResponse:
        bus.emit("before stream")

        async def body() -> AsyncIterator[bytes]:
            for i in range(3):
                log.append(f"chunk {i}")
                bus.emit(f"during stream {i}")
                yield b"x"

        return StreamingResponse(body())

    assert TestClient(app).get("/stream").content == b"xxx"
    assert log == [
        "chunk 0",
        "chunk 1",
        "chunk 2",
        "before stream",
        "during stream 0",
        "during stream 1",
        "during stream 2",
    ]


def test_websocket_endpoints_handle_events_as_they_are_emitted(app: FastAPI, bus: EventBus) -> None:
    log = record(bus)

    @app.websocket("/ws")
    async def endpoint(websocket: WebSocket, bus: EventBus = Depends(get_bus)) -> None:
        await websocket.accept()
        emitted = 0
        async for text in websocket.iter_text():
            bus.emit("ws.message", {"text": text})
            emitted += 1

            def handled(n: int = emitted) -> bool:
                return len(log) == n

            await wait_for(handled)  # handled while the session goes on, not when it ends
            await websocket.send_json(list(log))

    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        ws.send_text("hello")
        assert ws.receive_json() == ["ws.message"]
        ws.send_text("again")
        assert ws.receive_json() == ["ws.message", "ws.message"]


def request_method(request: Request) -> str:
    return request.method


def test_a_websocket_session_s_handlers_may_read_the_request(
    app: FastAPI, bus: EventBus, hooks: Hooks
) -> None:
    """Found: a handler whose dependency reads ``request.method`` failed with ``KeyError``
    for events emitted in a WebSocket session (its scope has no method), though it worked
    for the same events emitted in an HTTP request."""
    seen: list[str] = []

    @bus.on("ws.*")
    async def handler(event: Event, method: Annotated[str, Depends(request_method)]) -> None:
        seen.append(method)

    @app.websocket("/ws")
    async def endpoint(websocket: WebSocket, bus: EventBus = Depends(get_bus)) -> None:
        await websocket.accept()
        bus.emit("ws.opened")
        await wait_for(lambda: bool(seen or hooks.failures))
        await websocket.close()

    with TestClient(app) as client, client.websocket_connect("/ws"):
        pass
    assert hooks.failures == []
    assert seen == ["GET"]  # a WebSocket session starts with a GET


def test_events_emitted_after_the_flush_are_not_lost(app: FastAPI, bus: EventBus) -> None:
    log = record(bus)
    spawned: list[asyncio.Task[None]] = []

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        async def later() -> None:
            await asyncio.sleep(0.05)
            bus.emit("late")

        bus.emit("on time")
        spawned.append(asyncio.create_task(later()))

    with TestClient(app) as client:
        client.post("/")
        client.portal.call(wait_for, lambda: len(log) == 2)  # type: ignore[union-attr]
    assert log == ["on time", "late"]


@pytest.mark.anyio
@pytest.mark.parametrize("fails", [False, True], ids=["returned", "failed"])
async def test_an_event_a_handler_s_task_emits_after_the_handler_ended_is_handled(
    bus: EventBus, fails: bool
) -> None:
    """The handler emitted nothing before it ended: its bus must not keep collecting."""
    handled: list[str] = []
    spawned: list[asyncio.Task[None]] = []

    @bus.on("start")
    async def starter(event: Event, events: EventBus = Depends(get_bus)) -> None:
        async def later() -> None:
            await asyncio.sleep(0.02)
            events.emit("late")

        spawned.append(asyncio.create_task(later()))
        if fails:
            raise RuntimeError("the handler failed after starting its task")

    @bus.on("late")
    async def late(event: Event) -> None:
        handled.append(event.name)

    await bus.publish("start")
    await spawned[0]
    await wait_for(lambda: handled == ["late"], timeout=2)
    assert await bus.drain(1) == []


def streaming_app(framework: str, bus: EventBus, body: Callable[[], AsyncIterator[bytes]]) -> Any:
    """A FastAPI or Starlette app whose ``GET /`` emits ``export.started`` and streams *body*."""
    if framework == "fastapi":
        fastapi_app = FastAPI()

        @fastapi_app.get("/")
        async def export(events: EventBus = Depends(get_bus)) -> StreamingResponse:
            events.emit("export.started")
            return StreamingResponse(body())

        bus.install(fastapi_app)
        return fastapi_app
    from starlette.applications import Starlette
    from starlette.routing import Route

    from fastapi_eventbus.starlette import with_bus

    @with_bus
    async def starlette_export(request: Request, events: EventBus) -> StreamingResponse:
        events.emit("export.started")
        return StreamingResponse(body())

    app = Starlette(routes=[Route("/", starlette_export)])
    bus.install(app)
    return app


async def rows() -> AsyncIterator[bytes]:
    yield b"row 1\n"
    yield b"row 2\n"


async def rows_then_fail() -> AsyncIterator[bytes]:
    yield b"row 1\n"
    raise RuntimeError("the cursor died")


@pytest.mark.anyio
@pytest.mark.parametrize("framework", ["fastapi", "starlette"])
@pytest.mark.parametrize("failure", ["client-disconnects", "body-raises"])
async def test_events_of_an_endpoint_that_returned_are_handled_when_its_response_fails(
    framework: str, failure: str, hooks: Hooks, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: a response that failed while being sent (the client gone, on a server of ASGI
    spec 2.4 whose ``send`` raises; a streaming body that raised) never ran its background
    tasks. Starlette: the events stayed pending, unreported until shutdown's timeout.
    FastAPI: discarded at INFO as if "the endpoint raised". The endpoint had returned."""
    handled: list[str] = []
    bus = EventBus(on_discard=hooks.discards.append)

    @bus.on("export.*")
    async def audit(event: Event) -> None:
        handled.append(event.name)

    app = streaming_app(framework, bus, rows_then_fail if failure == "body-raises" else rows)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    bodies = 0

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal bodies
        if message["type"] == "http.response.body" and message.get("body"):
            bodies += 1
            if failure == "client-disconnects" and bodies == 2:
                raise OSError("the client went away")

    async with app.router.lifespan_context(app):
        with pytest.raises(Exception):  # noqa: B017 - whatever the response raised
            await app(scope, receive, send)
        await wait_for(lambda: handled == ["export.started"], timeout=2)
    assert hooks.discards == []
    assert any(
        r.levelno == logging.WARNING and "response" in r.message and "handled" in r.message
        for r in caplog.records
    )


class SlowBroker(Forwarder):
    """A forwarder whose every send takes a while: the flush waits for it."""

    def __init__(self) -> None:
        super().__init__(name="slow")
        self.sent: list[str] = []

    async def send(self, events: Sequence[Event]) -> None:
        await asyncio.sleep(0.05)
        self.sent += [event.id for event in events]


def test_events_emitted_while_the_flush_waits_for_a_forwarder_are_handled(
    app: FastAPI, bus: EventBus, hooks: Hooks
) -> None:
    """A WebSocket session's events come while its flush waits for the forwarder's send:
    each is handled and forwarded (they were discarded as "the flush was cancelled")."""
    broker = SlowBroker()
    bus.forward("chat.*", broker)
    handled: list[str] = []
    emitted: list[str] = []

    @bus.on("chat.*")
    async def on_message(event: Event) -> None:
        handled.append(event.id)

    @app.websocket("/ws")
    async def endpoint(websocket: WebSocket, bus: EventBus = Depends(get_bus)) -> None:
        await websocket.accept()
        for _ in range(5):
            await websocket.receive_text()
            emitted.append(bus.emit("chat.message", {"n": len(emitted)}).id)
        await wait_for(lambda: len(broker.sent) == 5 and len(handled) == 5)
        await websocket.send_text("done")

    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        for _ in range(5):
            ws.send_text("hi")
        assert ws.receive_text() == "done"
    assert sorted(handled) == sorted(emitted)
    assert sorted(broker.sent) == sorted(emitted)
    assert hooks.discards == []


def test_an_event_emitted_while_a_cut_short_flush_reports_is_not_lost(app: FastAPI) -> None:
    """A flush cut short reports what it did not finish through ``on_discard``; an event
    emitted while that hook runs gets a flush of its own (it was neither handled nor
    reported: the ending flush counted as the one that would take it)."""
    handled: list[str] = []
    discarded: list[str] = []
    emitted: dict[str, str] = {}
    views: list[EventBus] = []

    async def on_discard(report: DiscardedEvents) -> None:
        discarded.extend(report.ids)
        emitted["after"] = views[0].emit("after").id  # e.g. an alert, or another task's emit
        await asyncio.sleep(0.02)

    bus = EventBus(on_discard=on_discard)
    bus.install(app := FastAPI())

    @bus.on("cut")
    async def cut_short(event: Event) -> None:
        task = asyncio.current_task()  # whatever cancels the flush: shutdown, a task group
        assert task is not None
        task.cancel()
        await asyncio.sleep(1)

    @bus.on("after")
    async def after(event: Event) -> None:
        handled.append(event.id)

    @app.websocket("/ws")
    async def endpoint(websocket: WebSocket, bus: EventBus = Depends(get_bus)) -> None:
        await websocket.accept()
        views.append(bus)
        emitted["cut"] = bus.emit("cut").id
        await wait_for(lambda: "after" in emitted and emitted["after"] in handled + discarded)
        await websocket.send_text("done")

    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive_text() == "done"
    assert discarded == [emitted["cut"]]
    assert handled == [emitted["after"]]


def test_a_failing_handler_does_not_stop_the_others(
    app: FastAPI, bus: EventBus, hooks: Hooks, caplog: pytest.LogCaptureFixture
) -> None:
    log: list[str] = []

    @bus.on("*")
    async def async_fails(event: Event) -> None:
        raise RuntimeError("async failure")

    @bus.on("*")
    def sync_fails(event: Event) -> None:
        raise KeyError("sync failure")

    @bus.on("*")
    async def survivor(event: Event) -> None:
        log.append(event.name)

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> dict[str, bool]:
        bus.emit("one")
        bus.emit("two")
        return {"ok": True}

    with capture(bus, raise_failures=False) as seen:
        response = TestClient(app).post("/")
    assert response.json() == {"ok": True}
    assert log == ["one", "two"]
    assert [(f.event.name, f.handler.rsplit(".", 1)[1]) for f in hooks.failures] == [
        ("one", "async_fails"),
        ("one", "sync_fails"),
        ("two", "async_fails"),
        ("two", "sync_fails"),
    ]
    assert isinstance(hooks.failures[1].exception, KeyError)
    first = seen.emitted[0]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4
    message = errors[0].getMessage()
    assert "test_flush.test_a_failing_handler_does_not_stop_the_others.<locals>.async_fails" in (
        message
    )
    assert f"'one' (id={first.id})" in message
    assert errors[0].exc_info is not None


def test_a_raising_hook_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    def bad_hook(failure: object) -> None:
        raise RuntimeError("hook bug")

    bus = EventBus(on_error=bad_hook)
    app = FastAPI()
    bus.install(app)
    log = record(bus)

    @bus.on("*")
    async def fails(event: Event) -> None:
        raise RuntimeError("handler bug")

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("a")
        bus.emit("b")

    assert TestClient(app).post("/").status_code == 200
    assert log == ["a", "b"]
    assert "hook" in caplog.text


def test_handlers_can_chain_events_through_get_bus(app: FastAPI, bus: EventBus) -> None:
    log: list[str] = []

    @bus.on("order.placed")
    async def reserve(event: Event, bus: EventBus = Depends(get_bus)) -> None:
        log.append("reserve")
        bus.emit("stock.reserved", {"order": event.payload})

    @bus.on("order.placed")
    async def after_reserve(event: Event) -> None:
        log.append("second handler of order.placed")

    @bus.on("stock.reserved")
    def notify(event: Event) -> None:
        log.append(f"notify {event.payload}")

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("order.placed", 7)

    TestClient(app).post("/")
    assert log == ["reserve", "notify {'order': 7}", "second handler of order.placed"]


def test_chains_stop_at_the_depth_limit(hooks: Hooks) -> None:
    bus = EventBus(max_chain_depth=3, on_error=hooks.failures.append)
    app = FastAPI()
    bus.install(app)
    depths: list[int] = []

    @bus.on("ping")
    async def ping(event: Event, bus: EventBus = Depends(get_bus)) -> None:
        depths.append(event.payload)
        bus.emit("ping", event.payload + 1)

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("ping", 0)

    TestClient(app).post("/")
    assert depths == [0, 1, 2, 3]
    assert len(hooks.failures) == 1
    assert isinstance(hooks.failures[0].exception, EventChainError)
    assert "max_chain_depth=3" in str(hooks.failures[0].exception)


@pytest.mark.anyio
async def test_publish_on_the_application_bus_in_a_handler_counts_toward_the_depth_limit(
    hooks: Hooks,
) -> None:
    """Found: a handler calling ``publish`` on the application bus (the module-level one most
    handlers import) started again at depth 0: a loop ran about 200 levels deep, with its
    side effects, and ended in a `RecursionError`. It stops at ``max_chain_depth``."""
    bus = EventBus(max_chain_depth=3, on_error=hooks.failures.append)
    depths: list[int] = []

    @bus.on("ping")
    async def ping(event: Event) -> None:
        depths.append(event.payload)
        await bus.publish("ping", event.payload + 1)

    await bus.publish("ping", 0)
    assert depths == [0, 1, 2, 3]
    assert [type(failure.exception) for failure in hooks.failures] == [EventChainError]


def test_events_of_a_failed_handler_are_discarded(
    app: FastAPI, bus: EventBus, hooks: Hooks
) -> None:
    log = record(bus, "follow.up")

    @bus.on("start")
    async def fails_after_emitting(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("follow.up")
        raise RuntimeError("after emitting")

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("start")

    TestClient(app).post("/")
    assert log == []
    assert len(hooks.discards) == 1
    assert hooks.discards[0].reason.endswith("fails_after_emitting failed")
    assert [e.name for e in hooks.discards[0].events] == ["follow.up"]


@pytest.mark.anyio
async def test_publish_runs_handlers_and_chains_before_returning(bus: EventBus) -> None:
    log = record(bus, "chained")

    @bus.on("first")
    async def first(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("chained")

    await bus.publish("first")
    assert log == ["chained"]


def test_get_bus_in_a_dependency_shares_the_request_batch(app: FastAPI, bus: EventBus) -> None:
    log = record(bus)

    async def audit(bus: EventBus = Depends(get_bus)) -> EventBus:
        bus.emit("from dependency")
        return bus

    @app.post("/")
    async def endpoint(
        audit_bus: EventBus = Depends(audit), bus: EventBus = Depends(get_bus, use_cache=False)
    ) -> None:
        assert audit_bus is bus
        bus.emit("from endpoint")

    TestClient(app).post("/")
    assert log == ["from dependency", "from endpoint"]


def test_the_flush_joins_background_tasks_at_the_first_emit(app: FastAPI, bus: EventBus) -> None:
    log = record(bus)

    async def note(text: str) -> None:
        log.append(text)

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks, bus: EventBus = Depends(get_bus)) -> None:
        tasks.add_task(note, "added before the first emit")
        bus.emit("first")
        tasks.add_task(note, "added after it")
        bus.emit("second")

    @app.post("/quiet")
    async def quiet(tasks: BackgroundTasks, bus: EventBus = Depends(get_bus)) -> None:
        assert tasks.tasks == []  # resolving get_bus alone schedules nothing

    client = TestClient(app)
    client.post("/")
    assert log == ["added before the first emit", "first", "second", "added after it"]
    assert client.post("/quiet").status_code == 200


@pytest.mark.anyio
async def test_handle_runs_local_handlers_of_an_existing_event_and_reports_failures(
    bus: EventBus, hooks: Hooks
) -> None:
    from fastapi_eventbus.testing import RecordingForwarder

    recorder = RecordingForwarder()
    bus.forward("*", recorder)
    log = record(bus)

    @bus.on("order.placed")
    async def fails(event: Event, bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("never")  # discarded with the failure
        raise RuntimeError("no stock")

    @bus.on("order.placed")
    async def chains(event: Event, bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("order.reserved")

    received = Event(name="order.placed", payload={"id": 1}, source="/elsewhere")
    failures = await bus.handle(received)
    assert [(f.event, f.handler.rsplit(".", 1)[1]) for f in failures] == [(received, "fails")]
    assert log == ["order.placed", "order.reserved"]
    assert [e.name for e in recorder.events] == ["order.reserved"]  # not the handled event
    assert await bus.handle(Event(name="nobody.listens")) == []


def emitting_dependency(events: Annotated[EventBus, Depends(get_bus)]) -> EventBus:
    return events


def plain_dependency() -> None:
    return None


def test_a_bus_asked_for_deep_in_the_graph_or_by_an_override_still_chains(
    app: FastAPI, bus: EventBus
) -> None:
    chained: list[str] = []

    @bus.on("deep")
    async def deep(event: Event, events: Annotated[EventBus, Depends(emitting_dependency)]) -> None:
        events.emit("chained.deep")

    @bus.on("overridden")
    async def overridden(event: Event, events: Annotated[Any, Depends(plain_dependency)]) -> None:
        events.emit("chained.overridden")

    @bus.on("chained.*")
    async def record(event: Event) -> None:
        chained.append(event.name)

    app.dependency_overrides[plain_dependency] = emitting_dependency

    @app.post("/")
    async def endpoint(events: Annotated[EventBus, Depends(get_bus)]) -> None:
        events.emit("deep")
        events.emit("overridden")

    with TestClient(app) as client:
        client.post("/")
    assert chained == ["chained.deep", "chained.overridden"]


def test_events_are_handled_when_a_background_task_added_before_them_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found: the flush runs as one of the request's background tasks, after those added
    before the first ``emit``. When one of those raised, the flush never ran, and the events
    of a request answered 200 were discarded at INFO as if "the endpoint raised"."""
    discards: list[DiscardedEvents] = []
    handled: list[str] = []
    bus = EventBus(on_discard=discards.append)
    bus.install(app := FastAPI())
    bus.on("order.*")(lambda event: handled.append(event.id))
    order: list[str] = []

    def first() -> None:
        order.append("first task")
        raise RuntimeError("a background task of the endpoint failed")

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks, bus: EventBus = Depends(get_bus)) -> str:
        tasks.add_task(first)
        event = bus.emit("order.placed")
        tasks.add_task(order.append, "later task")
        return event.id

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/")
    assert response.status_code == 200
    assert handled == [response.json()]
    assert order == ["first task"]  # Starlette stops at the failed task, as without the bus
    assert discards == []


def test_events_are_handled_when_the_response_s_own_background_task_raises() -> None:
    """Found: with a ``Response(background=...)`` the bus handles the events as the request
    ends; when that background task raised, the request ended with its exception and the
    events were discarded at INFO as if "the endpoint raised"."""
    discards: list[DiscardedEvents] = []
    handled: list[str] = []
    bus = EventBus(on_discard=discards.append)
    bus.install(app := FastAPI())
    bus.on("order.*")(lambda event: handled.append(event.id))

    def failing() -> None:
        raise RuntimeError("the response's own background task failed")

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> JSONResponse:
        event = bus.emit("order.placed")
        return JSONResponse(event.id, background=BackgroundTask(failing))

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/")
    assert response.status_code == 200
    assert handled == [response.json()]
    assert discards == []


def test_events_of_a_request_whose_task_a_middleware_cancels_are_handled() -> None:
    """Found: a ``BaseHTTPMiddleware`` that raised after ``call_next`` cancelled the request's
    task while its response was on its way. The bus logged that the events were "handled",
    then ran the flush in that cancelled task: no handler ran, and an async ``on_discard``
    (one that awaits, as a database write does) was cancelled too: neither handled nor
    reported to a hook. The endpoint had returned: its events are handled."""
    handled: list[str] = []
    reported: list[str] = []

    async def record_discards(report: DiscardedEvents) -> None:
        await asyncio.sleep(0.001)
        reported.extend(report.ids)

    bus = EventBus(on_discard=record_discards)
    app = FastAPI()
    bus.install(app)

    @bus.on("order.*")
    async def ship(event: Event) -> None:
        await asyncio.sleep(0.001)  # any I/O
        handled.append(event.id)

    @app.middleware("http")
    async def audit(request: Request, call_next: Callable[..., Any]) -> Any:
        await call_next(request)
        raise RuntimeError("the audit log is down")

    emitted: list[str] = []

    @app.post("/orders")
    async def place(events: Annotated[EventBus, Depends(get_bus)]) -> None:
        emitted.extend(events.emit(name).id for name in ("order.placed", "order.paid"))

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/orders").status_code == 500
        client.portal.call(bus.drain)  # type: ignore[union-attr]
    assert (sorted(handled), reported) == (sorted(emitted), [])


def test_every_discard_reaches_an_async_on_discard_even_in_a_cancelled_request() -> None:
    """Found: a request-timeout middleware (an anyio cancel scope around the app) cancelled
    an endpoint after it emitted: the events were discarded with a line at INFO, and the
    async ``on_discard`` hook, awaited in the cancelled task, was cancelled at its first
    await: the application never heard of them."""
    reported: list[str] = []

    async def record_discards(report: DiscardedEvents) -> None:
        await asyncio.sleep(0.001)  # a database write
        reported.extend(report.ids)

    bus = EventBus(on_discard=record_discards)
    app = FastAPI()
    bus.install(app)
    bus.on("order.*")(lambda event: None)

    class Timeout:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            with anyio.move_on_after(0.1):
                await self.app(scope, receive, send)
            await JSONResponse({"error": "timed out"}, 504)(scope, receive, send)

    app.add_middleware(Timeout)
    emitted: list[str] = []

    @app.post("/orders")
    async def place(events: Annotated[EventBus, Depends(get_bus)]) -> None:
        emitted.append(events.emit("order.placed").id)
        await asyncio.sleep(10)

    with TestClient(app) as client:
        assert client.post("/orders").status_code == 504
        client.portal.call(anyio.sleep, 0.1)  # type: ignore[union-attr]
    assert reported == emitted


@pytest.mark.parametrize("replaced", [False, True], ids=["raised", "replaced-the-endpoint-s"])
def test_a_dependency_failing_on_exit_after_the_response_does_not_discard_its_events(
    hooks: Hooks, replaced: bool
) -> None:
    """Found: an endpoint that returned a response with its own ``background=`` (so its
    events wait for the request's end) had them discarded, "because the endpoint raised",
    when a ``yield`` dependency failed closing after the response was sent: the client had
    its 200. An exception raised in place of the endpoint's own still discards them."""
    handled: list[str] = []
    bus = EventBus(on_discard=hooks.discards.append)
    app = FastAPI()
    bus.install(app)
    bus.on("report.*")(lambda event: handled.append(event.name))

    async def session() -> AsyncIterator[str]:
        try:
            yield "session"
        except LookupError as exc:
            raise RuntimeError("rolled back") from exc
        raise RuntimeError("the connection dropped while closing")

    @app.post("/reports")
    async def build(
        events: Annotated[EventBus, Depends(get_bus)], db: Annotated[str, Depends(session)]
    ) -> JSONResponse:
        events.emit("report.requested")
        if replaced:
            raise LookupError("no such customer")
        return JSONResponse({"ok": True}, background=BackgroundTask(lambda: None))

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/reports").status_code == (500 if replaced else 200)
    assert handled == ([] if replaced else ["report.requested"])
    assert [d.reason for d in hooks.discards] == (
        ["the endpoint raised RuntimeError"] if replaced else []
    )


def failing_app(hook_takes: float) -> tuple[FastAPI, list[str], list[str]]:
    """An app whose endpoint emits, then raises; its async ``on_discard`` hook takes
    *hook_takes* seconds. The app, the ids emitted, the ids the hook was told of."""
    emitted: list[str] = []
    reported: list[str] = []

    async def record_discards(report: DiscardedEvents) -> None:
        await asyncio.sleep(hook_takes)  # a database write
        reported.extend(report.ids)

    bus = EventBus(on_discard=record_discards)
    app = FastAPI()
    bus.install(app)
    bus.on("order.*")(lambda event: None)

    @app.post("/orders")
    async def place(events: Annotated[EventBus, Depends(get_bus)]) -> None:
        emitted.append(events.emit("order.placed").id)
        raise HTTPException(404, "no such cart")

    return app, emitted, reported


def test_a_slow_on_discard_hook_does_not_hold_the_error_response() -> None:
    """Found: when an endpoint raised after emitting, its events were discarded in FastAPI's
    request exit stack, which awaited the async ``on_discard`` hook before the error
    response could be sent: a slow (or hung: 30 s) hook held every failing request's
    response. The log line is written at once; the hook runs in a task of its own, which
    the shutdown waits for."""
    app, emitted, reported = failing_app(1.5)  # a slow database
    with TestClient(app) as client:
        started = time.monotonic()
        assert client.post("/orders").status_code == 404
        assert time.monotonic() - started < 1.0
        assert reported == []  # not yet: the hook is still running
    assert reported == emitted  # the shutdown waited for it


def test_an_async_on_discard_hook_still_runs_under_a_bare_test_client() -> None:
    """Without ``with``, a `TestClient` runs each request on an event loop it then closes,
    and no lifespan waits for anything: the hook is awaited with the request, as before."""
    app, emitted, reported = failing_app(0.01)
    assert TestClient(app).post("/orders").status_code == 404
    assert reported == emitted
