"""fastapi_eventbus.testing and the documented override recipes."""

import asyncio
from collections.abc import Iterator

import pytest
from fastapi import Depends, FastAPI, WebSocket
from fastapi.testclient import TestClient

from fastapi_eventbus import Event, EventBus, HandlerFailuresError, get_bus
from fastapi_eventbus.testing import MemorySource, capture
from fastapi_eventbus.worker import Worker


def make_app(bus: EventBus) -> FastAPI:
    app = FastAPI()
    bus.install(app)

    @app.post("/cats")
    async def create_cat(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("cat.created", {"id": 1})

    return app


def test_capture_records_emitted_and_handled() -> None:
    bus = EventBus()
    app = make_app(bus)

    @bus.on("cat.*")
    async def ok(event: Event) -> None: ...

    @bus.on("cat.*")
    async def broken(event: Event) -> None:
        raise RuntimeError("x")

    with capture(bus, raise_failures=False) as seen:
        TestClient(app).post("/cats")
    assert seen.names == ["cat.created"]
    assert seen.handlers_for("cat.created") == [
        "tests.test_testing.test_capture_records_emitted_and_handled.<locals>.ok",
        "tests.test_testing.test_capture_records_emitted_and_handled.<locals>.broken",
    ]
    assert [f.handler.rsplit(".", 1)[1] for f in seen.failures] == ["broken"]
    TestClient(app).post("/cats")
    assert len(seen.emitted) == 1  # recording stopped with the block


def test_capture_without_handling() -> None:
    bus = EventBus()
    app = make_app(bus)
    calls: list[Event] = []
    bus.on("*")(lambda event: calls.append(event))
    with capture(bus, handle=False) as seen:
        TestClient(app).post("/cats")
    assert seen.names == ["cat.created"]
    assert seen.handled == []
    assert calls == []


def test_override_get_bus_with_another_bus() -> None:
    bus = EventBus()
    app = make_app(bus)
    real_calls: list[str] = []
    bus.on("*")(lambda event: real_calls.append(event.name))

    test_bus = EventBus()
    test_calls: list[str] = []
    test_bus.on("*")(lambda event: test_calls.append(event.name))
    app.dependency_overrides[get_bus] = test_bus.dependency
    TestClient(app).post("/cats")
    assert (real_calls, test_calls) == ([], ["cat.created"])


def test_override_a_handler_dependency() -> None:
    bus = EventBus()
    app = make_app(bus)
    sent: list[str] = []

    def get_mailer() -> Iterator[str]:
        raise AssertionError("the real mailer must not be used in tests")
        yield "smtp"

    @bus.on("cat.created")
    def welcome(event: Event, mailer: str = Depends(get_mailer)) -> None:
        sent.append(f"{mailer}: welcome cat {event.payload['id']}")

    app.dependency_overrides[get_mailer] = lambda: "fake-mailer"
    with capture(bus, raise_failures=False) as seen:
        TestClient(app).post("/cats")
    assert seen.failures == []
    assert sent == ["fake-mailer: welcome cat 1"]


def test_nested_captures_each_record_their_own_and_unmute_the_bus() -> None:
    """An inner ``capture`` leaving removed the outer one's recorder (they compared equal):
    the outer block then missed failures, and a muting recorder stayed on the bus, so that
    later events ran no handler, without a word."""
    bus = EventBus()
    ran: list[str] = []

    @bus.on("x")
    async def handler(event: Event) -> None:
        ran.append(event.id)

    async def scenario() -> None:
        with capture(bus, handle=False) as outer:
            with capture(bus, handle=False) as inner:
                await bus.publish("x")
            await bus.publish("x")
        assert (len(outer.emitted), len(inner.emitted)) == (2, 1)
        assert ran == []
        after = await bus.publish("x")
        assert ran == [after.id]

    asyncio.run(scenario())


@pytest.mark.parametrize("raise_failures", [True, False], ids=["raising", "raise_failures=False"])
def test_capture_warns_when_it_ends_before_its_events_are_handled(raise_failures: bool) -> None:
    """Found: around a WebSocket session, whose events are handled as they come, the block
    ended before the handler failed: the test passed, and the failure came after it.
    Found later: with ``raise_failures=False`` (a test asserting on ``Capture.failures``,
    which missed the failure just as well) the block ended without the warning."""
    bus, app = EventBus(), FastAPI()
    bus.install(app)

    @bus.on("chat.*")
    async def moderate(event: Event) -> None:
        await asyncio.sleep(0.2)
        raise RuntimeError("the handler broke after the block")

    @app.websocket("/ws")
    async def chat(websocket: WebSocket, events: EventBus = Depends(get_bus)) -> None:
        await websocket.accept()
        await websocket.receive_text()
        events.emit("chat.message", {"text": "hi"})
        await websocket.close()

    def a_test_that_ends_too_soon(client: TestClient) -> None:
        with capture(bus, raise_failures=raise_failures), client.websocket_connect("/ws") as ws:
            ws.send_text("hi")

    with TestClient(app) as client:
        with pytest.warns(RuntimeWarning, match="still being handled"):
            a_test_that_ends_too_soon(client)
        client.portal.call(bus.drain)  # type: ignore[union-attr]


def test_a_handler_call_cut_off_at_shutdown_fails_the_capture_block() -> None:
    """Found: an event whose handler was still running at the bus's shutdown deadline (here
    emitted by a task the endpoint started) was reported to the app (ERROR, ``on_discard``)
    but not to `capture`: the test passed, its handler never having finished. A handler
    call cut off (cancelled) is a failure for `capture` now."""
    bus = EventBus(shutdown_timeout=0.5)
    app = FastAPI()
    bus.install(app)
    finished: list[str] = []

    @bus.on("report.requested")
    async def build_report(event: Event) -> None:
        await asyncio.sleep(5)  # slower than the shutdown's deadline
        finished.append(event.id)

    @app.post("/reports")
    async def request_report(events: EventBus = Depends(get_bus)) -> None:
        async def later() -> None:
            await asyncio.sleep(0.05)
            events.emit("report.requested")  # from a task the endpoint started

        tasks.append(asyncio.create_task(later()))

    tasks: list[asyncio.Task[None]] = []

    def scenario() -> None:
        with capture(bus), TestClient(app) as client:
            client.post("/reports")
            client.portal.call(asyncio.sleep, 0.2)  # type: ignore[union-attr]

    with pytest.raises(HandlerFailuresError, match="build_report"):
        scenario()
    assert finished == []


@pytest.mark.anyio
async def test_a_worker_giving_back_a_message_at_a_stop_does_not_fail_the_capture_block() -> None:
    """A broker's message whose handler is cut off when the worker stops goes back, to be
    delivered again: nothing is lost, so `capture` does not count it as a failure."""
    bus = EventBus()
    started = asyncio.Event()

    @bus.on("slow")
    async def slow(event: Event) -> None:
        started.set()
        await asyncio.sleep(10)

    source = MemorySource(Event(name="slow"))
    with capture(bus) as seen:
        async with Worker(bus, source, shutdown_timeout=0.1):
            await started.wait()
    assert seen.failures == []
    assert len(source.nacked) == 1
