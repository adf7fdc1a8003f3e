"""The forwarder base class and the flush path it shares with local handlers."""

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_eventbus import (
    ConfigurationError,
    Event,
    EventBus,
    ForwarderError,
    InvalidEventError,
    get_bus,
)
from fastapi_eventbus.forwarders import DeadLetter, Delivery, EchoForwarder, Forwarder, Retry
from fastapi_eventbus.testing import RecordingForwarder, capture
from fastapi_eventbus.wire import decode_message

FAST = Retry(attempts=4, initial_delay=0.001, max_delay=0.01, total_timeout=5)


class Flaky(Forwarder):
    """Fails its first *failures* sends with *error*, then records like RecordingForwarder."""

    def __init__(self, failures: int, error: Exception, dead: list[DeadLetter]) -> None:
        super().__init__(retry=FAST, dead_letter=dead.append)
        self.failures = failures
        self.error = error
        self.attempts: list[list[str]] = []

    async def send(self, events: Sequence[Event]) -> None:
        self.attempts.append([e.name for e in events])
        if len(self.attempts) <= self.failures:
            raise self.error


class FailingStart(Forwarder):
    """Its `start` raises the *errors*, one per call, then succeeds."""

    def __init__(self, errors: list[Exception], dead: list[DeadLetter]) -> None:
        super().__init__(retry=FAST, dead_letter=dead.append)
        self.errors = list(errors)
        self.starts = 0
        self.sent: list[str] = []

    async def start(self) -> None:
        self.starts += 1
        if self.errors:
            raise self.errors.pop(0)

    async def send(self, events: Sequence[Event]) -> None:
        self.sent.extend(event.name for event in events)


def emitting_app(bus: EventBus, *names: str) -> TestClient:
    app = FastAPI()
    bus.install(app)

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        for name in names:
            bus.emit(name, {"n": name})

    return TestClient(app)


def test_one_send_per_forwarder_per_flush_with_its_matching_events() -> None:
    bus = EventBus()
    orders, everything = RecordingForwarder("orders"), RecordingForwarder("all")
    assert bus.forward("order.*", orders) is orders
    bus.forward(["*"], everything)
    with emitting_app(bus, "order.placed", "cat.created", "order.paid") as client:
        client.post("/")
        client.post("/")
    assert [[e.name for e in b] for b in orders.batches] == [["order.placed", "order.paid"]] * 2
    assert [len(b) for b in everything.batches] == [3, 3]
    assert orders.started == 1


def test_transient_failures_are_retried() -> None:
    dead: list[DeadLetter] = []
    flaky = Flaky(2, ForwarderError("throttled", transient=True), dead)
    bus = EventBus()
    bus.forward("*", flaky)
    emitting_app(bus, "a", "b").post("/")
    assert flaky.attempts == [["a", "b"]] * 3
    assert dead == []


def test_connection_errors_count_as_transient() -> None:
    dead: list[DeadLetter] = []
    flaky = Flaky(1, ConnectionRefusedError("down"), dead)
    bus = EventBus()
    bus.forward("*", flaky)
    emitting_app(bus, "a").post("/")
    assert len(flaky.attempts) == 2
    assert dead == []


def test_what_still_fails_is_dead_lettered_with_its_ids(caplog: pytest.LogCaptureFixture) -> None:
    dead: list[DeadLetter] = []
    flaky = Flaky(99, ForwarderError("still down", transient=True), dead)
    bus = EventBus()
    bus.forward("*", flaky)
    client = emitting_app(bus, "a", "b")
    with capture(bus) as seen:
        client.post("/")
    assert len(flaky.attempts) == FAST.attempts
    assert [d.ids for d in dead] == [[e.id for e in seen.emitted]]
    assert "gave up after 4 attempt(s)" in dead[0].reason
    assert all(e.id in caplog.text for e in seen.emitted)


def test_permanent_failures_are_not_retried() -> None:
    dead: list[DeadLetter] = []
    flaky = Flaky(99, ForwarderError("no such queue"), dead)
    bus = EventBus()
    bus.forward("*", flaky)
    emitting_app(bus, "a").post("/")
    assert len(flaky.attempts) == 1
    assert len(dead) == 1
    assert isinstance(dead[0].exception, ForwarderError)


class Picky(Forwarder):
    """A broker that fails a whole call for one message it refuses (named ``poison``)."""

    def __init__(self, dead: list[DeadLetter], one_message: bool = True) -> None:
        super().__init__(retry=FAST, dead_letter=dead.append)
        self.one_message = one_message
        self.calls: list[list[str]] = []
        self.sent: list[str] = []

    def may_be_one_message(self, exc: BaseException) -> bool:
        return self.one_message

    async def send(self, events: Sequence[Event]) -> None:
        self.calls.append([e.name for e in events])
        if any(e.name == "poison" for e in events):
            raise ForwarderError("400 one message is malformed")
        self.sent.extend(e.name for e in events)


def test_a_permanent_failure_of_one_message_dead_letters_that_message_only() -> None:
    dead: list[DeadLetter] = []
    picky = Picky(dead)
    bus = EventBus()
    bus.forward("*", picky)
    emitting_app(bus, "a", "b", "poison", "c", "d").post("/")
    # Found: the whole send was dead-lettered, the four good events with the one refused.
    assert [letter.events[0].name for letter in dead] == ["poison"]
    assert picky.sent == ["a", "b", "c", "d"]  # in order, in halves
    assert len(picky.calls) <= 2 * 5


def test_a_failure_every_message_shares_is_dead_lettered_in_one_call() -> None:
    dead: list[DeadLetter] = []
    picky = Picky(dead, one_message=False)  # a missing queue, a denied access
    bus = EventBus()
    bus.forward("*", picky)
    emitting_app(bus, "a", "poison", "b").post("/")
    assert picky.calls == [["a", "poison", "b"]]
    assert [[e.name for e in letter.events] for letter in dead] == [["a", "poison", "b"]]


class Sent(Forwarder):
    """Accepts every send."""

    async def send(self, events: Sequence[Event]) -> None:
        pass


@pytest.mark.parametrize("retry", [Retry, 3, "3"], ids=["the class", "int", "str"])
def test_a_retry_that_is_not_a_retry_is_refused(retry: Any) -> None:
    # Found: accepted, then the first transient failure lost the event: no line, no hook.
    with pytest.raises(ConfigurationError, match="retry must be a Retry instance"):
        Sent(retry=retry)


class Broken(Forwarder):
    """A forwarder with a bug: its `send` returns what is neither None nor a `Delivery`."""

    async def send(self, events: Sequence[Event]) -> Any:
        return {"sent": len(events)}


def test_a_forwarder_that_breaks_is_reported_never_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead: list[DeadLetter] = []
    bus = EventBus()
    bus.forward("*", Broken(dead_letter=dead.append))
    with capture(bus) as seen:
        emitting_app(bus, "a").post("/")
    # Found: the send task's exception was dropped by the flush: no line, no hook.
    [letter] = dead
    assert letter.ids == [event.id for event in seen.emitted]
    assert "failed unexpectedly" in letter.reason
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("failed unexpectedly" in line and letter.ids[0] in line for line in errors)


def test_partial_delivery_retries_some_and_dead_letters_others() -> None:
    dead: list[DeadLetter] = []

    class Partial(Forwarder):
        def __init__(self) -> None:
            super().__init__(retry=FAST, dead_letter=dead.append)
            self.sent: list[list[str]] = []

        async def send(self, events: Sequence[Event]) -> Delivery | None:
            self.sent.append([e.name for e in events])
            if len(self.sent) > 1:
                return None
            return Delivery(
                retry=[e for e in events if e.name == "retry me"],
                rejected=[e for e in events if e.name == "bad"],
                reason="1 throttled, 1 invalid",
            )

    partial = Partial()
    bus = EventBus()
    bus.forward("*", partial)
    emitting_app(bus, "ok", "retry me", "bad").post("/")
    assert partial.sent == [["ok", "retry me", "bad"], ["retry me"]]
    assert [[e.name for e in d.events] for d in dead] == [["bad"]]
    assert "1 throttled, 1 invalid" in dead[0].reason


def test_a_failing_forwarder_does_not_touch_handlers_or_other_forwarders() -> None:
    dead: list[DeadLetter] = []
    bus = EventBus()
    broken = Flaky(99, RuntimeError("bug in a forwarder"), dead)
    healthy = RecordingForwarder()
    bus.forward("*", broken)
    bus.forward("*", healthy)
    handled: list[str] = []
    bus.on("*")(lambda event: handled.append(event.name))
    response = emitting_app(bus, "a").post("/")
    assert response.status_code == 200
    assert handled == ["a"]
    assert [e.name for e in healthy.events] == ["a"]
    assert len(dead) == 1


def test_handlers_do_not_wait_for_a_slow_forwarder() -> None:
    bus = EventBus()
    release = asyncio.Event()
    log: list[str] = []

    class Slow(Forwarder):
        async def send(self, events: Sequence[Event]) -> None:
            log.append("forwarder started")
            await asyncio.wait_for(release.wait(), 5)  # set by the last handler
            log.append("forwarder done")

    @bus.on("*")
    async def handler(event: Event) -> None:
        log.append(f"handled {event.name}")
        if event.name == "b":
            release.set()

    bus.forward("*", Slow())
    emitting_app(bus, "a", "b").post("/")
    assert sorted(log[:3]) == ["forwarder started", "handled a", "handled b"]
    assert log[3:] == ["forwarder done"]


@pytest.mark.anyio
async def test_publish_waits_for_forwarders_and_chained_events_are_forwarded() -> None:
    bus = EventBus()
    recorder = RecordingForwarder()
    bus.forward("*", recorder)

    @bus.on("first")
    async def chain(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("second")

    await bus.publish("first")
    assert [[e.name for e in b] for b in recorder.batches] == [["first"], ["second"]]


def test_oversized_events_are_rejected_at_emit() -> None:
    bus = EventBus()
    recorder = RecordingForwarder()
    recorder.max_message_bytes = 300
    bus.forward("big.*", recorder)
    app = FastAPI()
    bus.install(app)

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> str:
        bus.emit("small.thing", {"data": "x" * 1000})  # not forwarded: no limit applies
        try:
            bus.emit("big.thing", {"data": "x" * 1000})
        except InvalidEventError as exc:
            return str(exc)
        return "accepted"

    message = TestClient(app).post("/").json()
    assert "over the 300-byte limit of forwarder RecordingForwarder" in message
    assert recorder.events == []


def test_forwarders_are_closed_at_shutdown() -> None:
    bus = EventBus()
    recorder = RecordingForwarder()
    bus.forward("*", recorder)
    with emitting_app(bus, "a") as client:
        client.post("/")
        assert (recorder.started, recorder.closed) == (1, 0)
    assert (recorder.started, recorder.closed) == (1, 1)


@pytest.mark.anyio
async def test_start_runs_once_for_concurrent_sends() -> None:
    recorder = RecordingForwarder()
    await asyncio.gather(*(recorder.deliver([Event(name=f"e{i}")]) for i in range(20)))
    assert recorder.started == 1
    assert len(recorder.events) == 20
    async with recorder:
        pass
    assert recorder.closed == 1


@pytest.mark.anyio
async def test_echo_forwarder_prints_cloudevents() -> None:
    out = io.StringIO()
    bus = EventBus(source="/tests")
    bus.forward("*", EchoForwarder(out))
    event = await bus.publish("cat.created", {"id": 1})
    line = json.loads(out.getvalue())
    assert line["type"] == "cat.created"
    assert line["source"] == "/tests"
    assert decode_message({"Body": out.getvalue()}) == event


def test_bad_forwarder_configuration() -> None:
    bus = EventBus()
    with pytest.raises(ConfigurationError, match="needs a Forwarder"):
        bus.forward("*", object())  # type: ignore[type-var]
    with pytest.raises(ConfigurationError, match="non-empty str"):
        bus.forward("", RecordingForwarder())
    with pytest.raises(ConfigurationError, match="attempts"):
        Retry(attempts=0)
    with pytest.raises(ConfigurationError, match="dead_letter must be callable"):
        Forwarder(dead_letter="log")  # type: ignore[arg-type]


def test_retry_delays_grow_and_are_jittered() -> None:
    retry = Retry(initial_delay=1, max_delay=4)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 4), (10, 4)]:
        delays = {retry.delay(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1


def test_shutdown_reports_events_still_being_forwarded() -> None:
    discarded: list[list[str]] = []
    bus = EventBus(shutdown_timeout=0.2, on_discard=lambda d: discarded.append(d.ids))
    started = asyncio.Event()

    class Stuck(RecordingForwarder):
        async def send(self, events: Sequence[Event]) -> None:
            started.set()
            await asyncio.sleep(3600)

    stuck = Stuck()
    bus.forward("*", stuck)
    app = FastAPI()
    bus.install(app)
    views: list[EventBus] = []

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        views.append(bus)

    with TestClient(app) as client:
        client.post("/")
        portal = client.portal
        assert portal is not None
        # Emitted after the request finished: handled by a task the bus tracks.
        event = portal.call(views[0].emit, "stuck")
        portal.call(asyncio.wait_for, started.wait(), 5)
    assert discarded == [[event.id]]
    assert stuck.closed == 1


def test_shutdown_reports_each_unfinished_event_once() -> None:
    """Found: an event waiting for its handlers while its forwarder still sent it was in
    the shutdown's report twice (``['a', 'b', 'b']``), once waiting and once being sent."""
    discarded: list[list[str]] = []
    bus = EventBus(shutdown_timeout=0.2, on_discard=lambda d: discarded.append(d.ids))
    started = asyncio.Event()

    class Stuck(RecordingForwarder):
        async def send(self, events: Sequence[Event]) -> None:
            await asyncio.sleep(3600)

    bus.forward("*", Stuck())

    @bus.on("*")
    async def hang(event: Event) -> None:
        started.set()
        await asyncio.sleep(3600)

    app = FastAPI()
    bus.install(app)
    ids: list[str] = []

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        ids.extend(bus.emit(name).id for name in ("a", "b"))

    async def scenario() -> list[Event]:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            request = asyncio.create_task(client.post("/"))  # its flush never ends
            await asyncio.wait_for(started.wait(), 5)
            unfinished = await bus.drain(0.2)
            request.cancel()
        return unfinished

    assert [event.id for event in asyncio.run(scenario())] == ids
    assert discarded == [ids]


# -- event loops ------------------------------------------------------------------------------


class LoopBound(Forwarder):
    """Opens a stand-in client bound to the running event loop, as SDK clients are."""

    def __init__(self, name: str | None = None, dead: list[DeadLetter] | None = None) -> None:
        super().__init__(retry=FAST, dead_letter=None if dead is None else dead.append, name=name)
        self.client: asyncio.AbstractEventLoop | None = None
        self.log: list[str] = []
        self.sent: list[str] = []

    async def start(self) -> None:
        self.log.append("start")
        await asyncio.sleep(0.01)  # concurrent sends wait for it
        self.client = asyncio.get_running_loop()

    def abandon(self) -> None:
        self.log.append("abandon")
        self.client = None

    async def close(self) -> None:
        self.log.append("close")
        self.client = None

    async def send(self, events: Sequence[Event]) -> None:
        if self.client is not asyncio.get_running_loop():
            raise ForwarderError("a client of another event loop")  # permanent: no retry
        self.sent.extend(event.name for event in events)


def loop_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and "another event loop" in record.getMessage()
    ]


def test_a_forwarder_used_on_a_new_event_loop_starts_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead: list[DeadLetter] = []
    forwarder = LoopBound("orders", dead)

    async def deliver(*names: str) -> None:
        await asyncio.gather(*(forwarder.deliver([Event(name=name)]) for name in names))

    asyncio.run(deliver("a", "b"))
    assert loop_warnings(caplog) == []

    async def second_run() -> None:
        await deliver("c", "d", "e")  # racing to restart it: one restart
        await deliver("f")

    asyncio.run(second_run())
    assert forwarder.log == ["start", "abandon", "start"]
    assert sorted(forwarder.sent) == ["a", "b", "c", "d", "e", "f"]
    assert dead == []
    [warning] = loop_warnings(caplog)
    assert warning.startswith("forwarder orders:")
    assert "abandoned: they cannot be closed from here" in warning
    assert "`with TestClient(app) as client:`, or a single event loop" in warning


def test_a_bare_test_client_restarts_forwarders_on_each_request_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    forwarder = LoopBound("orders")
    bus = EventBus()
    bus.forward("*", forwarder)
    client = emitting_app(bus, "a")  # no `with`: every request runs on a new event loop
    client.post("/")
    client.post("/")
    assert forwarder.sent == ["a", "a"]
    assert forwarder.log == ["start", "abandon", "start"]
    assert len(loop_warnings(caplog)) == 1


def test_closing_on_another_event_loop_abandons_the_clients(
    caplog: pytest.LogCaptureFixture,
) -> None:
    forwarder = LoopBound("orders")
    asyncio.run(forwarder.ensure_started())
    asyncio.run(forwarder.aclose())
    assert forwarder.log == ["start", "abandon"]
    assert "closed on another event loop" in caplog.text
    asyncio.run(forwarder.aclose())  # not started any more: nothing to do
    assert forwarder.log == ["start", "abandon"]


# -- startup ----------------------------------------------------------------------------------


def test_the_lifespan_starts_every_forwarder_once_and_concurrently() -> None:
    log: list[str] = []

    class Slow(Forwarder):
        async def start(self) -> None:
            log.append(f"start {self.name}")
            await asyncio.sleep(0.05)
            log.append(f"started {self.name}")

        async def close(self) -> None:
            log.append(f"close {self.name}")

        async def send(self, events: Sequence[Event]) -> None:
            pass

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.append("app startup")
        yield

    app = FastAPI(lifespan=lifespan)
    bus = EventBus()
    bus.install(app)
    first, second = Slow(name="first"), Slow(name="second")
    bus.forward("order.*", first)
    bus.forward("cat.*", second)
    bus.forward("dog.*", first)  # registered twice, started once
    with TestClient(app):
        assert log[0] == "app startup"
        assert sorted(log[1:3]) == ["start first", "start second"]  # neither waited
        assert sorted(log[3:]) == ["started first", "started second"]
        del log[:]
    assert sorted(log) == ["close first", "close second"]


def test_a_forwarder_failing_to_start_at_startup_is_started_at_its_first_send(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class NotYet(RecordingForwarder):
        async def start(self) -> None:
            await super().start()
            if self.started == 1:
                raise ForwarderError("credentials not there yet")

    not_yet, healthy = NotYet("not-yet"), RecordingForwarder("healthy")
    bus = EventBus()
    bus.forward("*", not_yet)
    bus.forward("*", healthy)
    with emitting_app(bus, "a") as client:
        assert (not_yet.started, healthy.started) == (1, 1)
        [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.getMessage() == (
            "forwarder not-yet failed to start at application startup (ForwarderError("
            "'credentials not there yet')); it will be started again before its first send"
        )
        assert client.post("/").status_code == 200
    assert not_yet.started == 2
    assert [e.name for e in not_yet.events] == ["a"]
    assert [e.name for e in healthy.events] == ["a"]
    assert (not_yet.closed, healthy.closed) == (1, 1)


def test_the_app_serves_even_if_a_forwarder_never_starts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead: list[DeadLetter] = []
    forwarder = FailingStart([RuntimeError("bug in start")] * 2, dead)
    bus = EventBus()
    bus.forward("*", forwarder)
    handled: list[str] = []
    bus.on("*")(lambda event: handled.append(event.name))
    with emitting_app(bus, "a") as client:
        assert "forwarder FailingStart failed to start" in caplog.text
        assert client.post("/").status_code == 200
    assert handled == ["a"]
    assert forwarder.starts == 2  # at startup, then once for the send
    [letter] = dead
    assert letter.reason == "permanent failure: start failed: RuntimeError('bug in start')"


# -- start failures ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(2, "No such file or directory", "/secrets/credentials.json"),
        PermissionError(13, "Permission denied", "/secrets/credentials.json"),
        OSError("an OSError is not transient when start raises it"),
        ForwarderError("invalid credentials"),
        ValueError("malformed key"),
    ],
    ids=lambda error: type(error).__name__,
)
async def test_a_start_failure_is_permanent_unless_it_says_otherwise(error: Exception) -> None:
    dead: list[DeadLetter] = []
    forwarder = FailingStart([error], dead)
    event = Event(name="a")
    await forwarder.deliver([event])
    assert forwarder.starts == 1
    assert forwarder.sent == []
    [letter] = dead
    assert letter.ids == [event.id]
    assert letter.exception is error
    assert letter.reason == f"permanent failure: start failed: {error!r}"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error",
    [
        ForwarderError("token endpoint busy", transient=True),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("metadata server did not answer"),
    ],
    ids=lambda error: type(error).__name__,
)
async def test_a_transient_start_failure_is_retried(error: Exception) -> None:
    dead: list[DeadLetter] = []
    forwarder = FailingStart([error, error], dead)
    await forwarder.deliver([Event(name="a")])
    assert forwarder.starts == 3
    assert forwarder.sent == ["a"]
    assert dead == []


@pytest.mark.anyio
async def test_an_oserror_from_send_is_still_transient() -> None:
    dead: list[DeadLetter] = []
    flaky = Flaky(1, OSError("connection reset by the broker"), dead)
    await flaky.deliver([Event(name="a")])
    assert flaky.attempts == [["a"], ["a"]]
    assert dead == []


class Hanging(Forwarder):
    """A forwarder whose `send` (or `start`) never returns: a broker that accepted the
    connection and never answers, a custom client without a timeout."""

    def __init__(self, dead: list[DeadLetter], hang_in: str = "send") -> None:
        retry = Retry(attempts=2, initial_delay=0.001, max_delay=0.001)
        super().__init__(retry=retry, dead_letter=dead.append, send_timeout=0.1)
        self.hang_in = hang_in
        self.calls = 0

    async def start(self) -> None:
        if self.hang_in == "start":
            await asyncio.Event().wait()

    async def send(self, events: Sequence[Event]) -> None:
        self.calls += 1
        await asyncio.Event().wait()


@pytest.mark.anyio
@pytest.mark.parametrize("hang_in", ["send", "start"])
async def test_a_send_that_never_returns_fails_at_its_time_limit(hang_in: str) -> None:
    """`publish` waits for its forwarders: one whose send hangs held it forever. Each
    attempt fails at ``send_timeout`` as a transient failure; what still fails is
    dead-lettered by id."""
    dead: list[DeadLetter] = []
    forwarder = Hanging(dead, hang_in)
    bus = EventBus()
    bus.forward("order.*", forwarder)
    with anyio.fail_after(5):
        event = await bus.publish("order.placed", {"id": 1})
    [letter] = dead
    assert letter.ids == [event.id]
    assert "did not finish within 0.1s" in letter.reason
    assert forwarder.calls == (2 if hang_in == "send" else 0)


def test_send_timeout_defaults_to_a_minute_and_is_checked() -> None:
    assert EchoForwarder().send_timeout == 60.0
    assert Forwarder(send_timeout=None).send_timeout is None
    for bad in (0, -1, "10", True):
        with pytest.raises(ConfigurationError, match="send_timeout"):
            Forwarder(send_timeout=bad)  # type: ignore[arg-type]


def test_forwarders_without_loop_bound_clients_start_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    recorder = RecordingForwarder()
    bus.forward("*", recorder)
    client = emitting_app(bus, "a")  # no `with`: every request runs on a new event loop
    client.post("/")
    client.post("/")
    assert recorder.started == 1
    assert len(recorder.batches) == 2
    assert "another event loop" not in caplog.text


# -- the retry policy -------------------------------------------------------------------------


def test_the_default_retry_keeps_trying_until_its_total_timeout() -> None:
    retry = Retry()
    assert retry.attempts is None
    elapsed, attempt = 0.0, 1
    while (wait := retry.next_delay(attempt, elapsed)) is not None:
        elapsed += wait
        attempt += 1
    assert elapsed == pytest.approx(retry.total_timeout)  # the last try starts at 30 s
    assert 10 <= attempt <= 20


def test_attempts_still_bounds_the_tries() -> None:
    retry = Retry(attempts=3, initial_delay=0.01)
    assert retry.next_delay(2, 0.0) is not None
    assert retry.next_delay(3, 0.0) is None
    assert Retry(attempts=100).next_delay(1, 30.0) is None
    assert Retry(attempts=3, initial_delay=0, max_delay=0).next_delay(1, 0.0) == 0


def test_longest_bounds_every_try_of_a_call() -> None:
    # The last try starts by total_timeout; with attempts, fewer may fit: each try's time
    # limit and the longest wait between two.
    assert Retry().longest(1.0) == 31.0
    assert Retry(attempts=3, max_delay=2.0).longest(1.0) == 3 * 1.0 + 2 * 2.0
    assert Retry(attempts=100, max_delay=5.0).longest(1.0) == 31.0
    retry, timeout = Retry(attempts=5, initial_delay=0.5, max_delay=4.0), 2.0
    for _ in range(20):  # whatever the jitter: tries and waits never add up to more
        elapsed, attempt = timeout, 1
        while (wait := retry.next_delay(attempt, elapsed)) is not None:
            elapsed += wait + timeout
            attempt += 1
        assert elapsed <= retry.longest(timeout)


@pytest.mark.parametrize(
    "options",
    [
        {"attempts": 0},
        {"attempts": True},
        {"attempts": 2.5},
        {"initial_delay": -1},
        {"max_delay": float("nan")},
        {"total_timeout": "30"},
        {"total_timeout": float("inf")},  # with attempts=None: never gives up
        {"initial_delay": 0},  # with attempts=None: a busy loop for total_timeout
        {"max_delay": 0},
    ],
)
def test_bad_retry_settings_fail_in_the_constructor(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match=r"Retry"):
        Retry(**options)


# -- start-up checks (verify_on_start) --------------------------------------------------------


class Checked(Forwarder):
    """Its `verify` raises the *errors*, one per call, then passes; logs what runs."""

    def __init__(
        self,
        errors: list[Exception],
        *,
        verify_on_start: bool = True,
        dead: list[DeadLetter] | None = None,
    ) -> None:
        super().__init__(
            retry=FAST,
            name="checked",
            verify_on_start=verify_on_start,
            dead_letter=None if dead is None else dead.append,
        )
        self.errors = list(errors)
        self.log: list[str] = []

    async def start(self) -> None:
        self.log.append("start")

    async def verify(self) -> None:
        self.log.append("verify")
        if self.errors:
            raise self.errors.pop(0)

    async def close(self) -> None:
        self.log.append("close")

    async def send(self, events: Sequence[Event]) -> None:
        self.log.extend(f"send {event.name}" for event in events)


def test_a_failed_start_up_check_stops_the_app() -> None:
    checked = Checked([ForwarderError("checked: the queue does not exist")])
    bus = EventBus()
    bus.forward("*", checked)
    with (
        pytest.raises(ForwarderError) as caught,
        emitting_app(bus, "a"),
    ):
        pytest.fail("the app started")
    assert str(caught.value) == (
        "forwarder checked failed its start-up check (verify_on_start=True): "
        "the queue does not exist"
    )
    assert not caught.value.transient
    assert checked.log == ["start", "verify", "close"]  # what start opened is closed


def test_a_start_up_check_that_cannot_reach_the_broker_is_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    unreachable = ForwarderError("broker unreachable", transient=True)
    checked = Checked([unreachable, ConnectionRefusedError(111, "Connection refused")])
    bus = EventBus()
    bus.forward("*", checked)
    with emitting_app(bus, "a") as client:
        client.post("/")
    assert checked.log == ["start", "verify", "close"] * 2 + ["start", "verify", "send a", "close"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith(
        "forwarder checked: start-up check failed (attempt 1: broker unreachable); trying again"
    )


def test_a_broker_unreachable_for_the_whole_retry_stops_the_app() -> None:
    checked = Checked([ForwarderError("broker unreachable", transient=True)] * 10)
    bus = EventBus()
    bus.forward("*", checked)
    with (
        pytest.raises(ForwarderError, match="after 4 attempts: broker unreachable") as caught,
        emitting_app(bus, "a"),
    ):
        pytest.fail("the app started")
    assert caught.value.transient
    assert checked.log.count("verify") == FAST.attempts


def test_without_verify_on_start_nothing_is_checked() -> None:
    checked = Checked([ForwarderError("never raised")], verify_on_start=False)
    bus = EventBus()
    bus.forward("*", checked)
    with emitting_app(bus, "a") as client:
        client.post("/")
    assert checked.log == ["start", "send a", "close"]


@pytest.mark.anyio
async def test_without_the_lifespan_a_failed_check_dead_letters_the_batch() -> None:
    dead: list[DeadLetter] = []
    checked = Checked([ForwarderError("the queue does not exist")], dead=dead)
    bus = EventBus()
    bus.forward("*", checked)
    first = await bus.publish("a")
    await bus.publish("b")  # checked again: it passes now
    await bus.close()
    [letter] = dead
    assert letter.ids == [first.id]
    assert letter.reason == (
        "permanent failure: start failed: ForwarderError('the queue does not exist')"
    )
    assert checked.log == ["start", "verify", "close", "start", "verify", "send b", "close"]


def test_verify_on_start_must_be_a_bool() -> None:
    with pytest.raises(ConfigurationError, match="verify_on_start must be a bool"):
        Forwarder(verify_on_start="yes")  # type: ignore[arg-type]


class CancelledOnItsOwn(Forwarder):
    """Its first *failures* sends raise `asyncio.CancelledError` though nothing cancelled
    them: a client library whose own connection task was cancelled, re-raising it."""

    def __init__(self, failures: int, dead: list[DeadLetter]) -> None:
        super().__init__(retry=FAST, dead_letter=dead.append)
        self.failures = failures
        self.sent: list[str] = []
        self.calls = 0

    async def send(self, events: Sequence[Event]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise asyncio.CancelledError
        self.sent += [event.id for event in events]


@pytest.mark.anyio
@pytest.mark.parametrize("failures", [1, 100])
async def test_a_send_raising_cancelled_error_is_a_transient_failure(failures: int) -> None:
    """Found: the send's task ended cancelled, and the flush took that for shutdown's
    cancellation, which reports what it cancels: the event was neither sent, dead-lettered
    nor reported."""
    dead: list[DeadLetter] = []
    forwarder = CancelledOnItsOwn(failures, dead)
    bus = EventBus()
    bus.forward("order.*", forwarder)
    event = await bus.publish("order.placed", {"id": 1})
    if failures == 1:  # tried again, and sent
        assert (forwarder.sent, dead) == ([event.id], [])
    else:  # each attempt failed: dead-lettered by id
        [letter] = dead
        assert letter.ids == [event.id]
        assert "CancelledError" in letter.reason


class Boom(BaseException):
    """A library's own `BaseException` that is not an `Exception` (as gevent's ``Timeout``)."""


class RaisingBase(Forwarder):
    """Its `send` raises *error*, a `BaseException` that is not an `Exception`."""

    def __init__(self, error: BaseException, dead: list[DeadLetter]) -> None:
        super().__init__(retry=FAST, dead_letter=dead.append)
        self.error = error
        self.calls = 0

    async def send(self, events: Sequence[Event]) -> None:
        self.calls += 1
        raise self.error


@pytest.mark.anyio
async def test_a_forwarder_attached_twice_gets_each_event_once() -> None:
    """Found in review: ``bus.forward("order.*", f)`` and ``bus.forward("order.placed", f)``
    gave ``f`` an event both match twice, in one send (and two spool rows). Attached again,
    a forwarder gets the new patterns, and each event once, as a handler does."""
    bus, forwarder = EventBus(), RecordingForwarder()
    bus.forward("order.*", forwarder)
    bus.forward("order.placed", forwarder)
    bus.forward("invoice.*", forwarder)
    await bus.publish("order.placed")
    await bus.publish("invoice.sent")
    assert [event.name for event in forwarder.events] == ["order.placed", "invoice.sent"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error",
    [Boom("boom"), GeneratorExit("a library closed its generator"), SystemExit(3)],
    ids=lambda error: type(error).__name__,
)
async def test_a_send_raising_a_base_exception_dead_letters_its_events_by_id(
    error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: a send raising a `BaseException` that is not an `Exception` (a library's own,
    ``sys.exit`` in a library, a stray `GeneratorExit`) ended the send's task with it, which
    the flush took for no failure: the event was neither sent, dead-lettered nor logged;
    a `SystemExit` left the task into the event loop and stopped the process. It is a
    permanent failure of the send: dead-lettered by id, not retried, and the bus goes on."""
    dead: list[DeadLetter] = []
    discarded: list[Any] = []
    forwarder = RaisingBase(error, dead)
    bus = EventBus(on_discard=discarded.append)
    bus.forward("order.*", forwarder)
    with anyio.fail_after(5):
        ids = [(await bus.publish("order.placed", {"n": n})).id for n in range(2)]
    assert [letter.ids for letter in dead] == [[ids[0]], [ids[1]]]
    assert all(repr(error) in letter.reason for letter in dead), [d.reason for d in dead]
    assert all(letter.exception is not None for letter in dead)
    assert forwarder.calls == 2  # permanent: each tried once
    assert discarded == []  # reported once, by the forwarder's dead_letter
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert all(any(event_id in line for line in errors) for event_id in ids), errors


class Stuck(Forwarder):
    """A forwarder whose `start`, `verify` or `close` (*hang_in*) never returns: a client
    waiting on a dead connection, a producer flushing its buffer to a broker that is down."""

    def __init__(self, hang_in: str) -> None:
        super().__init__(
            send_timeout=0.2, verify_on_start=hang_in == "verify", retry=Retry(attempts=1)
        )
        self.hang_in = hang_in
        self.sent: list[str] = []

    async def start(self) -> None:
        if self.hang_in == "start":
            await asyncio.Event().wait()

    async def verify(self) -> None:
        if self.hang_in == "verify":
            await asyncio.Event().wait()

    async def close(self) -> None:
        if self.hang_in == "close":
            await asyncio.Event().wait()

    async def send(self, events: Sequence[Event]) -> None:
        self.sent += [event.id for event in events]


@pytest.mark.anyio
@pytest.mark.parametrize("hang_in", ["start", "close"])
async def test_a_start_or_close_that_never_returns_does_not_hold_startup_or_shutdown(
    hang_in: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: the lifespan started the forwarders (without ``verify_on_start``) and closed
    them with no time limit: one whose `start` or `close` never returned held the
    application's startup or shutdown forever. Each is cancelled at the forwarder's
    ``send_timeout``, with an ERROR naming it, and the startup or shutdown goes on."""
    forwarder = Stuck(hang_in)
    bus = EventBus()
    bus.forward("order.*", forwarder)
    app = FastAPI()
    bus.install(app)
    with anyio.fail_after(5):
        async with app.router.lifespan_context(app):
            if hang_in == "close":
                event = await bus.publish("order.placed")
                assert forwarder.sent == [event.id]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    expected = {
        "start": "forwarder Stuck did not start within 0.2s (its send_timeout) at application",
        "close": "closing forwarder Stuck did not finish within 0.2s",
    }[hang_in]
    assert [line for line in errors if expected in line], errors


@pytest.mark.anyio
async def test_forwarders_that_never_close_hold_the_shutdown_once_not_each_in_turn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: the forwarders were closed one after another, each up to its
    ``send_timeout`` (60 s without one): ten that hang held the shutdown ten minutes, past
    any orchestrator's grace period. They close at once now, each under its own limit."""
    bus = EventBus()
    stuck = [Stuck("close") for _ in range(5)]
    for forwarder in stuck:
        forwarder.send_timeout = 0.5
        bus.forward("order.*", forwarder)
    app = FastAPI()
    bus.install(app)
    with anyio.fail_after(10):
        async with app.router.lifespan_context(app):
            started = time.monotonic()
    took = time.monotonic() - started
    closing = [r for r in caplog.records if "did not finish within 0.5s" in r.getMessage()]
    assert len(closing) == 5
    assert took < 1.5, took  # one after another: 2.5 s


@pytest.mark.anyio
async def test_a_start_up_check_that_never_returns_stops_the_startup() -> None:
    """Found: with ``verify_on_start``, a `verify` (or `start`) that never returned held the
    application's startup forever. It fails at ``send_timeout``, retried per *retry*, then
    stops the startup with a `ForwarderError` naming the forwarder."""
    bus = EventBus()
    bus.forward("order.*", Stuck("verify"))
    app = FastAPI()
    bus.install(app)
    with anyio.fail_after(5), pytest.raises(ForwarderError) as raised:
        async with app.router.lifespan_context(app):
            pass
    assert "forwarder Stuck failed its start-up check" in str(raised.value)
    assert "did not finish within 0.2s" in str(raised.value)
