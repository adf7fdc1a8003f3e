"""`Worker` from Python (``async with`` / ``run``), in this process, against moto's SQS server."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI

from fastapi_eventbus import (
    ConfigurationError,
    DiscardedEvents,
    Event,
    EventBus,
    HandlerFailure,
    SourceError,
    _deadline,
    get_bus,
)
from fastapi_eventbus.exceptions import MessageDecodeError, MissingExtraError
from fastapi_eventbus.testing import MemorySource, RecordingForwarder
from fastapi_eventbus.wire import decode_message
from fastapi_eventbus.worker import (
    Backoff,
    ReceivedMessage,
    SQSSource,
    Worker,
    WorkerStats,
)
from fastapi_eventbus.worker._source import Coalescer
from tests._support import until
from tests.forwarders._moto import KEY_ID, REGION, SECRET, Moto, start_moto, stop_moto
from tests.worker._helpers import counts, create_queue, peek, send_raw
from tests.worker.shop import execute, label, worker_app

pytestmark = pytest.mark.anyio


def source(moto: Moto, queue_url: str, **options: Any) -> SQSSource:
    """An `SQSSource` on moto with short polls and, unless told, immediate retries."""
    options.setdefault("visibility_backoff", Backoff(initial=0))
    return moto.source(queue_url, **options)


async def publish(moto: Moto, queue_url: str, *payloads: dict[str, Any]) -> list[str]:
    """Forward one ``order.placed`` event per payload to *queue_url*; their ids."""
    bus = EventBus()
    bus.forward("order.*", moto.forwarder(queue_url))
    ids = [(await bus.publish("order.placed", payload)).id for payload in payloads]
    await bus.close()
    return ids


# -- the happy path ------------------------------------------------------------------------


async def test_async_with_runs_the_handlers_with_the_apps_overrides(moto: Moto, db: Path) -> None:
    queue_url = await create_queue(moto, "orders")
    app = worker_app()
    app.dependency_overrides[label] = lambda: "from the test"
    ids = await publish(moto, queue_url, {"n": 1}, {"n": 2}, {"n": 3, "fail_times": 1})
    async with Worker(app, source(moto, queue_url), concurrency=2) as worker:
        await until(lambda: worker.stats.handled == 3)
    assert worker.stats == WorkerStats(received=4, handled=3, failed=1)
    rows = execute(db, "SELECT event_id, label FROM handled")
    assert sorted(rows) == sorted((event_id, "from the test") for event_id in ids)
    assert execute(db, "SELECT what FROM lifecycle") == [("startup",), ("shutdown",)]
    assert await counts(moto, queue_url) == (0, 0)


async def test_run_until_stop(moto: Moto, db: Path) -> None:
    queue_url = await create_queue(moto, "orders")
    worker = Worker(worker_app(), source(moto, queue_url))
    task = asyncio.create_task(worker.run())
    await publish(moto, queue_url, {"n": 1})
    await until(lambda: worker.stats.handled == 1)
    await worker.stop()
    assert task.done()
    await task
    with pytest.raises(ConfigurationError, match="already run"):
        await worker.run()


async def test_a_bare_bus_handles_chains_forwards_and_is_closed(moto: Moto) -> None:
    queue_url = await create_queue(moto, "orders")
    bus = EventBus()
    recorder = RecordingForwarder()
    bus.forward("audit.*", recorder)

    @bus.on("order.*")
    async def audit(event: Event, chained: Annotated[EventBus, Depends(get_bus)]) -> None:
        chained.emit("audit.seen", {"of": event.id})

    (event_id,) = await publish(moto, queue_url, {"n": 1})
    async with Worker(bus, source(moto, queue_url)) as worker:
        await until(lambda: worker.stats.handled == 1)
    assert [(e.name, e.payload) for e in recorder.events] == [("audit.seen", {"of": event_id})]
    assert recorder.closed == 1


async def test_concurrency_bounds_the_messages_in_flight(moto: Moto) -> None:
    queue_url = await create_queue(moto, "orders")
    bus = EventBus()
    running: list[int] = [0]
    peak: list[int] = [0]

    @bus.on("order.*")
    async def slow(event: Event) -> None:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.2)
        running[0] -= 1

    await publish(moto, queue_url, *({"n": n} for n in range(8)))
    async with Worker(bus, source(moto, queue_url), concurrency=3) as worker:
        await until(lambda: worker.stats.handled == 8)
    assert peak[0] == 3


async def test_acknowledgements_are_batched(moto: Moto) -> None:
    queue_url = await create_queue(moto, "orders")
    bus = EventBus()

    @bus.on("order.*")
    async def noop(event: Event) -> None:  # the ten finish together: one DeleteMessageBatch
        pass

    calls: list[int] = []
    sqs = source(moto, queue_url)
    await publish(moto, queue_url, *({"n": n} for n in range(10)))
    async with Worker(bus, sqs) as worker:
        sqs.client.meta.events.register(
            "before-parameter-build.sqs.DeleteMessageBatch",
            lambda params, **_: calls.append(len(params["Entries"])),
        )
        await until(lambda: worker.stats.handled == 10)
    assert sum(calls) == 10
    assert len(calls) <= 2


# -- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "left"), [("retry", (0, 1)), ("delete", (0, 0))])
async def test_undecodable_messages_follow_the_policy(
    moto: Moto, policy: Any, left: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    queue_url = await create_queue(moto, "orders")
    message_id = await send_raw(moto, queue_url, "\x00 not json")
    sqs = source(moto, queue_url, visibility_backoff=Backoff(initial=60))
    async with Worker(EventBus(), sqs, on_undecodable=policy) as worker:
        await until(lambda: worker.stats.undecodable == 1)
    assert worker.stats.handled == worker.stats.failed == 0
    assert await counts(moto, queue_url) == left  # given back (invisible for 60 s) or deleted
    (record,) = [r for r in caplog.records if message_id in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert "is not an event" in record.getMessage()


async def test_a_timed_out_handler_fails_its_message_and_frees_the_slot(moto: Moto) -> None:
    queue_url = await create_queue(moto, "orders")
    bus = EventBus(handler_timeout=0.2)
    hung: list[str] = []

    @bus.on("order.*")
    async def hangs_once(event: Event) -> None:
        if event.id not in hung:
            hung.append(event.id)
            await asyncio.Event().wait()  # hung: only the timeout ends this call

    ids = await publish(moto, queue_url, {"n": 1}, {"n": 2})
    async with Worker(bus, source(moto, queue_url), concurrency=1) as worker:
        await until(lambda: worker.stats.handled == 2)
    assert worker.stats.failed == 2  # each timed out once, then came back and succeeded
    assert sorted(hung) == sorted(ids)
    assert await counts(moto, queue_url) == (0, 0)


async def test_stop_gives_unfinished_messages_back(moto: Moto) -> None:
    queue_url = await create_queue(moto, "orders", {"VisibilityTimeout": "60"})
    bus = EventBus()
    started = asyncio.Event()

    @bus.on("order.*")
    async def forever(event: Event) -> None:
        started.set()
        await asyncio.sleep(60)

    (event_id,) = await publish(moto, queue_url, {"n": 1})
    async with Worker(bus, source(moto, queue_url), shutdown_timeout=0.1) as worker:
        await asyncio.wait_for(started.wait(), 10)
    assert worker.stats.unfinished == 1
    (message,) = await peek(moto, queue_url)  # visible again at once, despite the 60 s
    assert decode_message(message).id == event_id


async def test_transient_receive_errors_are_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "fastapi_eventbus.worker")
    server = start_moto()
    moto = Moto(server)
    port = moto.port
    queue_url = await create_queue(moto, "orders")
    bus = EventBus()
    seen: list[str] = []
    bus.on("order.*")(lambda event: seen.append(event.id))
    async with Worker(bus, source(moto, queue_url)):
        stop_moto(server)
        await until(lambda: "retrying in" in caplog.text, timeout=15)
        server = start_moto(port)  # moto keeps its queues in the process: the queue is back
        try:
            ids = await publish(moto, queue_url, {"n": 1})
            await until(lambda: seen == ids, timeout=15)
        finally:
            stop_moto(server)
    assert f"receiving from {queue_url.rsplit('/', 1)[-1]} again" in caplog.text


async def test_a_missing_queue_stops_the_worker(moto: Moto) -> None:
    missing = f"{moto.endpoint}/123456789012/no-such-queue"
    worker = Worker(EventBus(), source(moto, missing))
    with pytest.raises(SourceError, match="NonExistentQueue") as caught:
        await worker.run()
    assert not caught.value.transient


async def test_the_body_of_async_with_may_fail_alone(moto: Moto) -> None:
    queue_url = await create_queue(moto, "orders")
    with pytest.raises(RuntimeError, match="body"):
        async with Worker(EventBus(), source(moto, queue_url)):
            raise RuntimeError("body")


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency must be an int >= 1"),
        ({"concurrency": True}, "concurrency must be an int >= 1"),
        ({"shutdown_timeout": -1}, "shutdown_timeout must be a number of seconds >= 0"),
        ({"shutdown_timeout": "1"}, "shutdown_timeout must be a number of seconds >= 0"),
        ({"on_undecodable": "drop"}, "on_undecodable must be 'retry' or 'delete'"),
        ({"on_unhandled": "ack"}, "on_unhandled must be 'retry' or 'delete'"),
    ],
)
async def test_bad_settings_fail_in_the_constructor(options: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Worker(EventBus(), MemorySource(), **options)


async def test_the_worker_needs_a_bus_and_a_source() -> None:
    with pytest.raises(ConfigurationError, match=r"bus\.install"):
        Worker(FastAPI(), MemorySource())
    with pytest.raises(ConfigurationError, match="must be a Source"):
        Worker(EventBus(), object())  # type: ignore[arg-type]


async def test_an_app_without_startup_runs_an_empty_source_until_stopped() -> None:
    bus = EventBus()
    app = FastAPI()
    bus.install(app)
    worker = Worker(app, MemorySource())
    assert worker.bus is bus
    assert worker.app is app
    async with worker:
        pass
    assert worker.stats == WorkerStats()


def test_backoff() -> None:
    backoff = Backoff(initial=1, maximum=10)
    assert [backoff.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert backoff.delay(10_000) == 10
    assert 0.5 <= backoff.jittered(1) <= 1
    with pytest.raises(ConfigurationError):
        Backoff(initial=-1)
    with pytest.raises(ConfigurationError):
        Backoff(multiplier=0.5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"queue_url": "sqs://queue"}, "queue_url must be an http"),
        ({"wait_time_seconds": 21}, "wait_time_seconds must be an int from 0 to 20"),
        ({"max_messages": 11}, "max_messages must be an int from 1 to 10"),
        ({"aws_access_key_id": "id"}, "pass both"),
    ],
)
def test_sqs_source_settings(options: dict[str, Any], message: str) -> None:
    options.setdefault("queue_url", "https://sqs.eu-west-1.amazonaws.com/123456789012/orders")
    with pytest.raises(ConfigurationError, match=message):
        SQSSource(**options)


def test_sqs_source_defaults() -> None:
    sqs = SQSSource("https://sqs.eu-west-1.amazonaws.com/123456789012/orders")
    assert sqs.name == "orders"
    assert sqs._settings.region_name == "eu-west-1"
    assert sqs.visibility_backoff == Backoff()
    assert repr(sqs) == (
        "<SQSSource 'orders' queue_url='https://sqs.eu-west-1.amazonaws.com/123456789012/orders'>"
    )
    with pytest.raises(SourceError, match="has not started"):
        sqs.client  # noqa: B018


def test_sqs_source_names_the_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "aiobotocore" else real(name)
    )
    with pytest.raises(MissingExtraError, match=r"fastapi-eventbus-di\[aws\]"):
        SQSSource("https://sqs.eu-west-1.amazonaws.com/123456789012/orders")


# -- sources that misbehave ----------------------------------------------------------------


class AckFails(MemorySource):
    """A `MemorySource` whose acknowledgements fail."""

    async def ack(self, message: ReceivedMessage) -> None:
        raise SourceError("ReceiptHandleIsInvalid")


def ids(messages: list[ReceivedMessage]) -> list[str]:
    return [message.message_id for message in messages]


async def test_a_failed_acknowledgement_is_logged_and_the_worker_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    bus.on("order.*")(lambda event: None)
    source = AckFails(name="source")
    source.put(Event(name="order.placed"), message_id="m0")
    async with Worker(bus, source) as worker:
        await until(lambda: worker.stats.settle_errors == 1)
    assert worker.stats.handled == 1
    assert "could not acknowledge message m0" in caplog.text
    assert "it will be delivered again" in caplog.text


async def test_a_slow_acknowledgement_does_not_abandon_a_handled_message(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: the handlers' time allowance kept running after they finished, so an
    acknowledgement slower than what was left of it (a DeleteMessage that botocore retries)
    abandoned a message handled with success: ERROR "a handler ignores its time limit",
    the message given back while being acknowledged, and handled twice."""
    monkeypatch.setattr(_deadline, "MIN_OVERTIME", 0.2)  # the allowance: 0.1 s + 0.2 s

    class SlowAck(MemorySource):
        async def ack(self, message: ReceivedMessage) -> None:
            await asyncio.sleep(0.6)
            await super().ack(message)

    bus = EventBus()
    calls: list[str] = []

    @bus.on("order.*", timeout=0.1)
    async def handle(event: Event) -> None:
        calls.append(event.id)

    source = SlowAck(Event(name="order.placed"), max_deliveries=3)
    async with Worker(bus, source) as worker:
        await asyncio.wait_for(source.join(), 5)
    assert len(calls) == 1
    assert ids(source.acked) == ids(source.acked[:1])
    assert source.nacked == []
    assert (worker.stats.handled, worker.stats.abandoned) == (1, 0)
    assert "ignores its time limit" not in caplog.text


async def test_memory_source_keeps_two_messages_with_one_id_apart() -> None:
    """Found: they shared a receipt, so settling one settled the other's: a message whose
    handler always failed vanished (not dead, not pending) and `join` returned."""
    bus = EventBus()

    @bus.on("bad")
    async def poison(event: Event) -> None:
        raise RuntimeError("poison")

    bus.on("good")(lambda event: None)
    source = MemorySource(name="q", max_deliveries=3)
    source.put(Event(name="bad"), message_id="q-2")  # as the next automatic id
    source.put(Event(name="good"))
    async with Worker(bus, source, concurrency=10):
        await asyncio.wait_for(source.join(), 10)
    assert [decode_message(m.body).name for m in source.dead] == ["bad"]
    assert [decode_message(m.body).name for m in source.acked] == ["good"]


async def test_a_receive_raising_a_stray_cancellation_is_retried_not_a_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found: a `CancelledError` nothing asked for (a client library leaking its own) out
    of `receive` ended the worker's receiving as if it had been stopped: `run` returned, no
    WARNING, and the CLI would have exited 0 with the queue no longer consumed."""

    class Leaky(MemorySource):
        calls = 0

        async def receive(self, max_messages: int) -> list[ReceivedMessage]:
            self.calls += 1
            if self.calls == 1:
                raise asyncio.CancelledError  # nobody cancelled the worker
            return await super().receive(max_messages)

    bus = EventBus()
    bus.on("order.*")(lambda event: None)
    source = Leaky(Event(name="order.placed"))
    async with Worker(bus, source):
        await asyncio.wait_for(source.join(), 10)
    assert ids(source.acked) == ["memory-1"]
    assert "receiving from memory failed (CancelledError" in caplog.text


async def test_an_acknowledgement_raising_a_stray_cancellation_is_a_settle_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found: the message's task ended "cancelled", which the worker took for its own doing:
    nothing logged, the message neither acknowledged nor given back."""

    class Leaky(MemorySource):
        async def ack(self, message: ReceivedMessage) -> None:
            raise asyncio.CancelledError

    bus = EventBus()
    bus.on("order.*")(lambda event: None)
    source = Leaky()
    source.put(Event(name="order.placed"), message_id="m0")
    async with Worker(bus, source) as worker:
        await until(lambda: worker.stats.settle_errors == 1)
    assert "could not acknowledge message m0" in caplog.text


async def test_a_decode_returning_no_event_makes_the_message_undecodable() -> None:
    """Found: a `Source.decode` override returning None (a decode hook that did not take
    the message) broke the processing with a TypeError: no policy, no hook, never settled."""
    discarded: list[DiscardedEvents] = []

    class Hooked(MemorySource):
        def decode(self, message: ReceivedMessage) -> Event:
            return None  # type: ignore[return-value]

    bus = EventBus(on_discard=discarded.append)
    bus.on("order.*")(lambda event: None)
    source = Hooked()
    source.put(Event(name="order.placed"), message_id="m0")
    async with Worker(bus, source, on_undecodable="delete") as worker:
        await asyncio.wait_for(source.join(), 5)
    assert worker.stats.undecodable == 1
    assert [report.message_ids for report in discarded] == [("m0",)]
    assert "returned NoneType, not an Event" in str(discarded[0].exception)


async def test_memory_source_join_says_so_when_a_message_would_fail_forever() -> None:
    """Found: with the defaults (no ``max_deliveries``, no ``nack_delay``), a handler that
    always fails made `join` wait forever while the message was redelivered in a tight loop
    (33,000 deliveries in 3 s): the test hung instead of failing."""
    bus = EventBus()

    @bus.on("order.*")
    async def always_fails(event: Event) -> None:
        raise RuntimeError("poison")

    source = MemorySource(Event(name="order.placed"), name="q")
    async with Worker(bus, source):
        with pytest.raises(RuntimeError, match=r"q-1 delivered 100 times.*max_deliveries"):
            await asyncio.wait_for(source.join(), 10)


async def test_a_source_that_fails_unexpectedly_is_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Flaky(MemorySource):
        calls = 0

        async def receive(self, max_messages: int) -> list[ReceivedMessage]:
            self.calls += 1
            if self.calls == 1:
                raise OSError("a bug, or an error the source does not translate")
            return await super().receive(max_messages)

    bus = EventBus()
    bus.on("order.*")(lambda event: None)
    source = Flaky()
    source.put(Event(name="order.placed"), message_id="m0")
    async with Worker(bus, source) as worker:
        await until(lambda: worker.stats.handled == 1)
    assert ids(source.acked) == ["m0"]
    assert "a bug, or an error the source does not translate" in caplog.text


async def test_a_failing_startup_raises_from_async_with() -> None:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        raise RuntimeError("no database")
        yield

    bus = EventBus()
    app = FastAPI(lifespan=lifespan)
    bus.install(app)
    with pytest.raises(RuntimeError, match="no database"):
        async with Worker(app, MemorySource()):
            pass


async def test_when_both_the_body_and_the_worker_fail_the_body_wins(
    moto: Moto, caplog: pytest.LogCaptureFixture
) -> None:
    worker = Worker(EventBus(), source(moto, f"{moto.endpoint}/123456789012/no-such-queue"))

    async def body() -> None:
        async with worker:
            await until(lambda: "worker stopping" in caplog.text)
            raise RuntimeError("body")

    with pytest.raises(RuntimeError, match="body"):
        await body()
    assert "the worker failed too" in caplog.text


async def test_the_coalescer_reports_each_items_outcome() -> None:
    calls: list[list[int]] = []

    async def settle(items: list[int]) -> list[str | None]:
        calls.append(items)
        if 99 in items:
            raise SourceError("the whole call failed")
        return [None if item % 2 == 0 else f"odd {item}" for item in items]

    coalescer = Coalescer(settle, size=3)
    results = await asyncio.gather(
        *(coalescer.submit(item) for item in range(4)), return_exceptions=True
    )
    assert calls == [[0, 1, 2], [3]]
    assert [str(result) if result else None for result in results] == [
        None,
        "odd 1",
        None,
        "odd 3",
    ]
    with pytest.raises(SourceError, match="the whole call failed"):
        await coalescer.submit(99)
    await coalescer.wait()


# -- events no handler matches ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "acked", "nacked", "level"),
    [("retry", [], [("m0", None)], logging.ERROR), ("delete", ["m0"], [], logging.WARNING)],
)
async def test_an_event_no_handler_matches_follows_on_unhandled(
    policy: Any,
    acked: list[str],
    nacked: list[tuple[str, float | None]],
    level: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    discards: list[DiscardedEvents] = []
    bus = EventBus(on_discard=discards.append)
    bus.on("order.*")(lambda event: None)
    event = Event(name="invoice.sent")
    source = MemorySource(name="source", max_deliveries=1)  # given back: dead, not redelivered
    source.put(event, message_id="m0")
    async with Worker(bus, source, on_unhandled=policy) as worker:
        await until(lambda: source.acked or source.nacked)
    assert worker.stats == WorkerStats(received=1, unhandled=1)  # never "handled"
    # Found: a deleted one reached no hook (a log line only); one given back comes again.
    deleted = [(report.ids, report.reason) for report in discards]
    why = "no handler of the bus matches it; the worker deleted its message (on_unhandled='delete')"
    assert deleted == ([([event.id], why)] if policy == "delete" else [])
    given_back = [(message.message_id, delay) for message, delay in source.nacked]
    assert (ids(source.acked), given_back) == (acked, nacked)
    (record,) = [r for r in caplog.records if event.id in r.getMessage()]
    assert record.levelno == level
    assert record.name == "fastapi_eventbus.worker"
    what = (
        "deleting it (on_unhandled='delete')"
        if policy == "delete"
        else "giving it back (on_unhandled='retry'): source delivers it again, "
        "forever unless a dead-letter policy moves it"
    )
    assert record.getMessage() == (
        f"message m0 (event 'invoice.sent' id={event.id}) from source matches no handler "
        f"of the bus; {what}"
    )


async def test_a_bus_without_handlers_is_a_warning_at_startup(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    bus.forward("order.*", RecordingForwarder())  # a web app's bus, passed by mistake
    async with Worker(bus, MemorySource()):
        pass
    (record,) = [r for r in caplog.records if "no handlers" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        "the bus has no handlers: no message can be handled; each one is given back, "
        "to come again (on_unhandled='retry')"
    )


# -- messages that break the decoder -------------------------------------------------------------


class Unreadable(Mapping[str, Any]):
    """A message body that fails when read (a source with a bug)."""

    def __getitem__(self, key: str) -> Any:
        raise RuntimeError("a broken source")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("a broken source")

    def __len__(self) -> int:
        return 1


async def test_a_message_that_breaks_the_decoder_affects_that_message_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    bus.on("order.*")(lambda event: None)
    source = MemorySource(name="source")
    source.put({"Body": "[" * 100_000 + "]" * 100_000}, message_id="deep")
    source.put(Unreadable(), message_id="unreadable")
    source.put(Event(name="order.placed"), message_id="good")
    async with Worker(bus, source, on_undecodable="delete") as worker:
        await until(lambda: len(source.acked) == 3)
    assert worker.stats == WorkerStats(received=3, handled=1, undecodable=2)
    assert sorted(ids(source.acked)) == ["deep", "good", "unreadable"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "message deep from source is not an event "
        "(SQS message body is JSON nested too deeply to decode); deleting it",
        "message unreadable from source is not decodable (RuntimeError: a broken source); "
        "deleting it",
    ]


async def test_a_message_that_cannot_be_started_fails_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found: a message the worker could not start (a custom source's ``order_key`` that is
    no str, here a list: unhashable) raised out of the receive loop and stopped the worker;
    the receive's later messages were never handled, nor named. Now that message alone
    fails: an ERROR names it, it is given back (and handled when it comes again), and the
    others are handled."""

    class BadKeyOnce(MemorySource):
        async def receive(self, max_messages: int) -> list[ReceivedMessage]:
            received = await super().receive(max_messages)
            return [
                replace(m, order_key=["bad"])  # type: ignore[arg-type]
                if m.message_id == "m1" and not self.nacked
                else m
                for m in received
            ]

    bus = EventBus()
    handled: list[str] = []
    bus.on("order.*")(lambda event: handled.append(event.payload["n"]))
    source = BadKeyOnce(name="source")
    for n in range(3):
        source.put(Event(name="order.placed", payload={"n": f"m{n}"}), message_id=f"m{n}")
    with caplog.at_level(logging.ERROR, "fastapi_eventbus.worker"):
        async with Worker(bus, source) as worker:
            await until(lambda: len(source.acked) == 3)
    assert sorted(handled) == ["m0", "m1", "m2"]
    assert [(message.message_id, delay) for message, delay in source.nacked] == [("m1", None)]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["message m1 from source could not be started; giving it back"]
    assert worker.stats.handled == 3


async def test_a_receive_count_that_is_not_a_number_loses_no_message(moto: Moto) -> None:
    """Found: one message whose ``ApproximateReceiveCount`` was not a number (a faulty
    SQS-compatible server) failed the whole ``ReceiveMessage`` with a ValueError: every
    message it brought stayed invisible until its visibility timeout, none of them named.
    That count is now unknown (None), and the receive's messages are handled at once."""

    def garble(parsed: dict[str, Any], **kwargs: Any) -> None:
        for message in parsed.get("Messages", [])[:1]:
            message["Attributes"]["ApproximateReceiveCount"] = "many"

    class Garbled(SQSSource):
        async def start(self) -> None:
            await super().start()
            self.client.meta.events.register("after-call.sqs.ReceiveMessage", garble)

    queue_url = await create_queue(moto, "garbled", {"VisibilityTimeout": "30"})
    event_ids = await publish(moto, queue_url, *({"n": n} for n in range(3)))
    bus = EventBus()
    handled: list[str] = []
    bus.on("order.*")(lambda event: handled.append(event.id))
    garbled = Garbled(
        queue_url,
        endpoint_url=moto.endpoint,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        wait_time_seconds=1,
    )
    async with Worker(bus, garbled):
        await until(lambda: len(handled) == 3, timeout=10)  # not after 30 s
    assert sorted(handled) == sorted(event_ids)
    assert await counts(moto, queue_url) == (0, 0)


GARBLED: dict[str, tuple[Any, str]] = {
    # what the first message of the first answer becomes; the ERROR that says why
    "not an object": (lambda message: ["junk"], "no ReceiptHandle"),
    "Attributes null": (
        lambda message: {**message, "Attributes": None},
        "its Attributes are a NoneType, not an object",
    ),
    "MessageGroupId an int": (  # it was a group of its own, silently out of order
        lambda message: {**message, "Attributes": {**message["Attributes"], "MessageGroupId": 7}},
        "its MessageGroupId is a int, not a string",
    ),
    "MessageGroupId a list": (
        lambda message: {**message, "Attributes": {**message["Attributes"], "MessageGroupId": []}},
        "its MessageGroupId is a list, not a string",
    ),
    "no MessageId, in its group": (  # its group can be read: it keeps its place in it
        lambda message: {k: v for k, v in message.items() if k != "MessageId"},
        "its MessageId is missing",
    ),
}


@pytest.mark.parametrize(
    ("case", "policy"),
    [
        ("not an object", "retry"),
        ("Attributes null", "retry"),
        ("Attributes null", "delete"),
        ("MessageGroupId an int", "retry"),
        ("MessageGroupId a list", "retry"),
        ("no MessageId, in its group", "retry"),
    ],
)
async def test_one_unreadable_message_fails_alone_not_the_receive(
    moto: Moto, caplog: pytest.LogCaptureFixture, case: str, policy: Any
) -> None:
    """Found: one message of a ``ReceiveMessage`` answer that `SQSSource` could not read (not
    an object, ``Attributes`` null, from a faulty SQS-compatible server) failed the whole
    receive ("receiving from ... failed; retrying"): every message it brought stayed
    invisible until its visibility timeout, none of them named. A ``MessageGroupId`` that
    is not a string went to the worker as a group of its own (an int: silently out of its
    group's order) or failed as it started (a list). Each message is now read alone: that
    one is undecodable, named by its MessageId and given back or deleted per
    ``on_undecodable``; without a ReceiptHandle an ERROR says it comes again at its
    visibility timeout; the others are handled at once. Found in review: one without its
    MessageId lost its group, and the rest of the group ran ahead of it; it keeps its place
    now, and its name no longer changes with its receipt."""
    garble, why = GARBLED[case]
    broken: list[tuple[str, str]] = []  # (MessageId, event id) of the garbled message

    def garbled(parsed: dict[str, Any], **kwargs: Any) -> None:
        messages = parsed.get("Messages", [])
        if messages and not broken:  # the first answer with messages only
            first = messages[0]
            broken.append((first["MessageId"], json.loads(first["Body"])["id"]))
            messages[0] = garble(first)

    class Garbled(SQSSource):
        async def start(self) -> None:
            await super().start()
            self.client.meta.events.register("after-call.sqs.ReceiveMessage", garbled)

    fifo = "MessageGroupId" in case or "group" in case
    queue_url = await moto.create_queue("garbled", fifo=fifo)  # visibility timeout 30 s
    publisher = EventBus()
    group = {"message_group_id": lambda event: "g"} if fifo else {}
    publisher.forward("order.*", moto.forwarder(queue_url, **group))
    ids = [(await publisher.publish("order.placed", {"n": n})).id for n in range(3)]
    await publisher.close()
    discards: list[DiscardedEvents] = []
    bus = EventBus(on_discard=discards.append)
    handled: list[str] = []
    bus.on("order.*")(lambda event: handled.append(event.id))
    garbled_source = Garbled(
        queue_url,
        endpoint_url=moto.endpoint,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        wait_time_seconds=1,
        visibility_backoff=Backoff(initial=0),
    )
    readable = case != "not an object"
    with caplog.at_level(logging.ERROR, "fastapi_eventbus"):
        async with Worker(bus, garbled_source, on_undecodable=policy) as worker:
            await until(lambda: broken and len(handled) >= 2, timeout=10)  # not after 30 s
            if readable and policy == "retry":  # given back: it comes again, unbroken
                await until(lambda: len(handled) == 3, timeout=10)
    ((message_id, event_id),) = broken
    if case == "no MessageId, in its group":  # the others of its group waited for it
        assert handled == ids
    others = [i for i in ids if i != event_id]
    lost = policy == "delete" or not readable
    assert sorted(handled) == sorted(others if lost else ids)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    (error,) = [e for e in errors if why in e]
    if readable:
        named = "with no MessageId, content " if "no MessageId" in case else f"{message_id} from"
        assert error.startswith(f"message {named}"), error
        assert worker.stats.undecodable == 1
    assert [r.message_ids for r in discards] == ([(message_id,)] if policy == "delete" else [])
    # Not an object: no receipt to give it back with; it comes again at its visibility timeout.
    assert await counts(moto, queue_url) == ((0, 0) if readable else (0, 1))


@pytest.mark.parametrize("policy", ["retry", "delete"])
async def test_a_deleted_message_that_is_not_an_event_is_reported_to_on_discard(
    policy: Any,
) -> None:
    discards: list[DiscardedEvents] = []
    bus = EventBus(on_discard=discards.append)
    bus.on("order.*")(lambda event: None)
    source = MemorySource(name="source", max_deliveries=1)  # given back: dead, not redelivered
    source.put({"Body": "not json"}, message_id="junk")
    async with Worker(bus, source, on_undecodable=policy) as worker:
        await until(lambda: source.acked or source.nacked)
    assert worker.stats == WorkerStats(received=1, undecodable=1)
    # Found: a deleted one reached no hook (a log line only); one given back comes again.
    reports = [(r.events, r.message_ids, r.reason, type(r.exception)) for r in discards]
    why = "message junk from source is not an event; it is deleted (on_undecodable='delete')"
    assert reports == ([((), ("junk",), why, MessageDecodeError)] if policy == "delete" else [])


class RefusingAcks(MemorySource):
    """Acknowledges nothing: a broker that is down when the worker deletes."""

    async def ack(self, message: ReceivedMessage) -> None:
        raise SourceError("the broker is down")


@pytest.mark.parametrize("what", ["undecodable", "unhandled"])
async def test_a_message_is_reported_deleted_only_once_it_is(what: str) -> None:
    """Found: ``on_discard`` heard that a message was deleted (``on_undecodable`` or
    ``on_unhandled="delete"``) before the worker deleted it: when the deletion failed, the
    message came again, and was reported deleted again at each delivery."""
    discards: list[DiscardedEvents] = []
    bus = EventBus(on_discard=discards.append)
    bus.on("order.*")(lambda event: None)
    source = RefusingAcks(name="source")
    source.put({"Body": "not json"} if what == "undecodable" else Event(name="other.thing"))
    async with Worker(bus, source, on_undecodable="delete", on_unhandled="delete") as worker:
        await until(lambda: worker.stats.settle_errors == 1)
    assert discards == []


# -- FIFO queues: each group's order --------------------------------------------------------


async def fifo_orders(moto: Moto, *orders: tuple[str, int], fifo: bool = True) -> str:
    """A new FIFO queue (or standard: *fifo* False) holding one ``order.placed`` event per
    (group, n) with its group as ``MessageGroupId``, sent in order."""
    queue_url = await moto.create_queue("orders", fifo=fifo)
    bus = EventBus()
    bus.forward("order.*", moto.forwarder(queue_url, message_group_id=lambda e: e.payload["g"]))
    for group, n in orders:
        await bus.publish("order.placed", {"g": group, "n": n})
    await bus.close()
    return queue_url


async def test_a_fifo_queue_s_groups_are_handled_in_order(moto: Moto) -> None:
    orders = [(group, n) for n in range(4) for group in ("a", "b")]
    queue_url = await fifo_orders(moto, *orders)
    bus = EventBus()
    done: list[tuple[str, int]] = []

    @bus.on("order.*")
    async def ship(event: Event) -> None:
        await asyncio.sleep(0.05 * (4 - event.payload["n"]))  # the first is the slowest
        done.append((event.payload["g"], event.payload["n"]))

    async with Worker(bus, source(moto, queue_url), concurrency=10) as worker:
        await until(lambda: worker.stats.handled == 8)
    # Found: handled concurrently, so each group finished in reverse order.
    for group in ("a", "b"):
        assert [n for g, n in done if g == group] == [0, 1, 2, 3]
    assert await counts(moto, queue_url) == (0, 0)


@pytest.mark.parametrize("fifo", [True, False], ids=["fifo", "standard"])
async def test_a_message_not_handled_holds_back_the_rest_of_its_group_on_a_fifo_queue(
    moto: Moto, caplog: pytest.LogCaptureFixture, fifo: bool
) -> None:
    """FIFO: found, a2 was handled (and deleted) while a1 waited for its redelivery: a0, a2,
    a1. Standard: found, the worker kept the order of every ``MessageGroupId`` on a
    standard queue too (SQS fair queues take group ids there, and keep no order): each
    give-back counted toward the redrive policy, so good messages could reach the
    dead-letter queue without their handlers ever running."""
    orders = [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
    queue_url = await fifo_orders(moto, *orders, fifo=fifo)
    bus = EventBus()
    done: list[tuple[str, int]] = []
    failed: list[int] = []

    @bus.on("order.*")
    async def ship(event: Event) -> None:
        group, n = event.payload["g"], event.payload["n"]
        if (group, n) == ("a", 1) and not failed:
            failed.append(n)
            raise RuntimeError("the first try fails")
        done.append((group, n))

    async with Worker(bus, source(moto, queue_url), concurrency=10) as worker:
        await until(lambda: worker.stats.handled == 4)
    assert sorted(done) == orders
    assert worker.stats.failed == 1
    held = [r for r in caplog.records if "to keep the order of its group 'a'" in r.getMessage()]
    if fifo:
        assert [n for g, n in done if g == "a"] == [0, 1, 2]
        assert worker.stats.held_back == (worker.stats.received - 5)  # a2 came back after a1
        assert len(held) == worker.stats.held_back >= 1
        assert all(r.levelno == logging.WARNING for r in held)
    else:
        assert worker.stats.held_back == len(held) == 0
        assert worker.stats.received == 5  # a1 twice, the others once
    assert await counts(moto, queue_url) == (0, 0)


async def test_at_shutdown_a_fifo_message_waiting_for_the_one_before_it_is_given_back(
    moto: Moto, caplog: pytest.LogCaptureFixture
) -> None:
    queue_url = await fifo_orders(moto, ("a", 0), ("a", 1))
    bus = EventBus()
    started: list[int] = []

    @bus.on("order.*")
    async def ship(event: Event) -> None:
        started.append(event.payload["n"])
        await asyncio.Event().wait()  # until shutdown cancels it

    async with Worker(bus, source(moto, queue_url), shutdown_timeout=0.2) as worker:
        await until(lambda: started == [0] and worker.stats.received == 2)
    assert started == [0]  # a1 never started: a0 was still running
    assert worker.stats.unfinished == 2
    assert await counts(moto, queue_url) == (2, 0)  # both given back at once
    assert not [r for r in caplog.records if r.name == "asyncio"]  # no failed callback


# -- handlers that ignore their time limit, at shutdown -------------------------------------------


async def test_a_fifo_worker_without_a_heartbeat_warns_at_start(
    moto: Moto, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: the docs said a FIFO message waiting for the one before it "is kept invisible
    meanwhile", which holds only with a heartbeat: without one, it keeps the queue's
    visibility timeout, and a group's later messages could expire while waiting and be
    handled again, out of order, by another worker, without a word. A worker on a FIFO queue
    without a heartbeat now says so at start; with one, or on a standard queue, it does not."""
    fifo_url = await moto.create_queue("orders", fifo=True)
    standard_url = await moto.create_queue("orders")
    bus = EventBus()
    bus.on("order.*")(lambda event: None)
    warned: dict[str, bool] = {}
    for case, queue_source in (
        ("fifo", source(moto, fifo_url)),
        ("fifo with a heartbeat", source(moto, fifo_url, visibility_timeout=30)),
        ("standard", source(moto, standard_url)),
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING, "fastapi_eventbus.worker"):
            async with Worker(bus, queue_source, shutdown_timeout=0):
                pass
        lines = [r.getMessage() for r in caplog.records if "no heartbeat" in r.getMessage()]
        warned[case] = bool(lines)
        if lines:
            (line,) = lines
            assert line.startswith(f"{queue_source.name} keeps each group's messages in order")
            assert "must then cover the handlers of its whole group" in line
    assert warned == {"fifo": True, "fifo with a heartbeat": False, "standard": False}


@pytest.mark.slow
async def stop_while_stubborn(
    event: Event, handler_timeout: float | None, shutdown_timeout: float
) -> tuple[Worker, MemorySource, float]:
    """Stop a worker while it handles *event* (message ``m0``) with a handler that ignores
    its cancellation (the bus's ``shutdown_timeout``: 1 s); the worker, its source, and how
    long stopping took."""
    bus = EventBus(handler_timeout=handler_timeout, shutdown_timeout=1)
    release = asyncio.Event()

    @bus.on("order.*")
    async def stubborn(event: Event) -> None:
        while not release.is_set():
            with suppress(asyncio.CancelledError):
                await release.wait()

    source = MemorySource(name="source", max_deliveries=1)  # given back: dead, not redelivered
    source.put(event, message_id="m0")
    worker = Worker(bus, source, shutdown_timeout=shutdown_timeout)
    asyncio.get_running_loop().call_later(40, release.set)  # in case stop() is not bounded
    async with worker:
        await until(lambda: bool(bus._core.active))  # the handler runs
        started = time.monotonic()
        await worker.stop()
        stopped_in = time.monotonic() - started
        release.set()  # let the abandoned handler end, as the test's event loop closes
    return worker, source, stopped_in


async def test_stop_waits_no_longer_for_a_message_given_up_meanwhile() -> None:
    """Found: stopping waited up to ``shutdown_timeout`` for the messages in flight until
    each *finished*: one given up meanwhile (its handler past its time allowance, ignoring
    its cancellation, left running) was still waited for, the full ``shutdown_timeout``
    (30 s by default), though it was no longer the worker's. Under load a worker process
    then outlived its supervisor's patience. Stopping now ends once every message in
    flight is settled or given up."""
    worker, source, stopped_in = await stop_while_stubborn(Event(name="order.placed"), 0.2, 30)
    # Given up at its allowance (0.2 s + 5 s), then the bus's shutdown_timeout, a margin
    assert stopped_in < 0.2 + 5 + 1 + 2, stopped_in
    assert worker.stats.abandoned == 1
    assert [message.message_id for message, _ in source.nacked] == ["m0"]
    assert source.acked == []


async def test_the_heartbeat_keeps_its_beat_when_extending_is_slow() -> None:
    """Found: the heartbeat slept its interval *after* each extension, so slow extensions
    (a busy broker, a starved machine) pushed every later one back: with a visibility
    timeout of twice the interval, a few slow calls let the message become visible (and be
    delivered again, or dead-lettered) while its handler still ran. Beats now keep their
    times from the start."""
    beats: list[float] = []

    class SlowExtends(MemorySource):
        async def extend(self, message: ReceivedMessage, seconds: float | None = None) -> None:
            beats.append(asyncio.get_running_loop().time())
            await asyncio.sleep(0.4)  # each extension takes most of the interval

    bus = EventBus(handler_timeout=None)
    started: list[float] = []

    @bus.on("order.*")
    async def slow(event: Event) -> None:
        started.append(asyncio.get_running_loop().time())
        await asyncio.sleep(2.7)

    source = SlowExtends(Event(name="order.placed"), extend_interval=0.5)
    async with Worker(bus, source) as worker:
        await until(lambda: worker.stats.handled == 1)
    offsets = [beat - started[0] for beat in beats]
    assert len(offsets) >= 4, offsets  # drifting: 0.5, 1.4, 2.3
    for n, offset in enumerate(offsets[:4], 1):
        assert abs(offset - 0.5 * n) < 0.25, offsets


async def test_stop_is_bounded_when_a_handler_ignores_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No time limit: only shutdown cancels it. At exit, the bus waits 1 s for its event.
    event = Event(name="order.placed")
    worker, source, stopped_in = await stop_while_stubborn(event, None, 0.1)
    # The worker's shutdown_timeout, 6 s after cancelling, the bus's shutdown_timeout, a margin
    assert stopped_in < 0.1 + 6 + 1 + 1
    assert worker.stats == WorkerStats(received=1, unfinished=1, abandoned=1)
    given_back = [(message.message_id, delay) for message, delay in source.nacked]
    assert given_back == [("m0", 0)]  # given back at once
    assert source.acked == []
    errors = [(r.name, r.getMessage()) for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        (
            "fastapi_eventbus.worker",
            f"message m0 (event 'order.placed' id={event.id}) from source did not stop within "
            "6s of being cancelled at shutdown; giving it back and leaving it running "
            "(a handler ignores cancellation)",
        ),
        ("fastapi_eventbus", f"shutdown: 1 event(s) did not finish within 1.0s: {event.id}"),
    ]


async def test_a_handler_raising_cancelled_error_fails_its_message_only() -> None:
    """Found: a handler that raised `asyncio.CancelledError` without being cancelled (it
    awaited a task someone else cancelled) was neither a failure nor a success: no ERROR, no
    ``on_error``, ``failed`` stayed 0, and the message went back until the broker
    dead-lettered it."""
    failures: list[HandlerFailure] = []
    bus = EventBus(on_error=failures.append)
    seen: list[str] = []

    @bus.on("order.lost")
    async def lost(event: Event) -> None:
        raise asyncio.CancelledError

    bus.on("order.placed")(lambda event: seen.append(event.id))
    bad, good = Event(name="order.lost"), Event(name="order.placed")
    source = MemorySource(name="source", max_deliveries=1)
    source.put(bad, message_id="bad")
    source.put(good, message_id="good")
    async with Worker(bus, source) as worker:
        await source.join()
    assert worker.stats == WorkerStats(received=2, handled=1, failed=1)
    assert seen == [good.id]
    assert ids(source.acked) == ["good"]
    assert [m.message_id for m in source.dead] == ["bad"]
    assert [(f.event.id, type(f.exception)) for f in failures] == [(bad.id, asyncio.CancelledError)]


async def test_a_message_whose_handler_swallows_the_shutdown_cancellation_is_given_back() -> None:
    """Found: at shutdown the worker cancelled the message (and logged that it goes back for
    redelivery); the handler caught the cancellation and returned, and the worker then
    acknowledged the message: deleted, its work cut short, counted handled and unfinished."""
    bus = EventBus()
    started = asyncio.Event()

    @bus.on("order.*")
    async def cleanup_forgets_to_reraise(event: Event) -> None:
        started.set()
        with suppress(asyncio.CancelledError):
            await asyncio.sleep(30)

    source = MemorySource(name="source")
    source.put(Event(name="order.placed"), message_id="m0")
    async with Worker(bus, source, shutdown_timeout=0.1) as worker:
        await started.wait()
    assert source.acked == []
    assert [(message.message_id, delay) for message, delay in source.nacked] == [("m0", 0)]
    assert worker.stats == WorkerStats(received=1, unfinished=1)


async def test_a_handler_raising_system_exit_fails_its_message_and_the_worker_goes_on() -> None:
    """Found: `SystemExit` from a handler stopped the worker's event loop: the messages in
    flight were cut off, the bad one was neither given back nor reported, and after a
    restart it did the same again."""
    failures: list[HandlerFailure] = []
    bus = EventBus(on_error=failures.append)
    seen: list[str] = []

    @bus.on("order.*")
    async def handle(event: Event) -> None:
        if event.payload == {"exit": True}:
            raise SystemExit(1)
        seen.append(event.id)

    first, bad, last = (Event(name="order.placed", payload=p) for p in ({}, {"exit": True}, {}))
    source = MemorySource(name="source", max_deliveries=1)
    for message_id, event in (("first", first), ("bad", bad), ("last", last)):
        source.put(event, message_id=message_id)
    async with Worker(bus, source) as worker:
        await source.join()
    assert sorted(seen) == sorted([first.id, last.id])
    assert sorted(ids(source.acked)) == ["first", "last"]
    assert [m.message_id for m in source.dead] == ["bad"]
    assert worker.stats == WorkerStats(received=3, handled=2, failed=1)
    assert [(f.event.id, type(f.exception)) for f in failures] == [(bad.id, SystemExit)]


async def test_a_message_that_comes_again_while_being_handled_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found: without a heartbeat, a handler that ran longer than the queue's visibility
    timeout had its message delivered again and handled twice at once, with no log line."""
    bus = EventBus()
    release = asyncio.Event()
    runs: list[str] = []

    @bus.on("order.*")
    async def slow(event: Event) -> None:
        runs.append(event.id)
        await release.wait()

    placed = Event(name="order.placed")

    class Expiring(MemorySource):
        """Delivers its message again while it is held, as SQS does past its visibility."""

        again = True

        async def receive(self, max_messages: int) -> list[ReceivedMessage]:
            if self.again and runs:
                self.again = False
                self.put(placed, message_id="m-1")
            return await super().receive(max_messages)

    source = Expiring(name="q", wait_time=0.01)
    source.put(placed, message_id="m-1")
    with caplog.at_level(logging.WARNING, "fastapi_eventbus"):
        async with Worker(bus, source, concurrency=2):
            await until(lambda: len(runs) == 2)
            release.set()
    (warning,) = [r.getMessage() for r in caplog.records if "came again" in r.getMessage()]
    assert warning.startswith("message m-1 from q came again while it is being handled")


async def test_a_message_given_back_and_delivered_again_at_once_is_no_duplicate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in CI: Pub/Sub's emulator delivered a message given back (nacked) before the
    nack call returned, and the worker, still counting it in flight, logged the false
    warning that its visibility timeout had run out and its handlers ran twice at once."""
    bus = EventBus()
    received: list[str] = []

    class Eager(MemorySource):
        """Delivers a message given back again before its nack returns, as the emulator does."""

        async def receive(self, max_messages: int) -> list[ReceivedMessage]:
            batch = await super().receive(max_messages)
            received.extend(m.message_id for m in batch)
            return batch

        async def nack(self, message: ReceivedMessage, delay: float | None = None) -> None:
            await super().nack(message, 0)
            count = len(received)
            await until(lambda: len(received) > count or len(received) >= 3)

    source = Eager(name="q", wait_time=0.01, max_deliveries=3)
    source.put({"Body": "not an event"}, message_id="m-1")
    with caplog.at_level(logging.WARNING, "fastapi_eventbus"):
        async with Worker(bus, source, on_undecodable="retry", concurrency=2) as worker:
            await until(lambda: len(source.dead) == 1)
    assert received == ["m-1", "m-1", "m-1"]
    assert worker.stats.undecodable == 3
    assert not [r.getMessage() for r in caplog.records if "came again" in r.getMessage()]


async def test_stopping_while_a_source_returned_more_than_asked_loses_none() -> None:
    """Found (a custom source): when `receive` returned more messages than the worker asked
    for, the worker waited for a free slot for each extra one; stopped meanwhile, it left
    them neither handled nor given back, invisible until the broker's timeout. Each is now
    settled or given back."""

    class Generous(MemorySource):
        async def receive(self, max_messages: int) -> list[ReceivedMessage]:
            return await super().receive(10)  # more than the one slot the worker has

    bus = EventBus()
    release = asyncio.Event()
    running: list[int] = []

    @bus.on("order.*")
    async def slow(event: Event) -> None:
        running.append(len(running) + 1)
        await release.wait()

    source = Generous(*(Event(name="order.placed") for _ in range(3)))
    async with Worker(bus, source, concurrency=1, shutdown_timeout=0.2) as worker:
        await until(lambda: source.in_flight == 3)
        await worker.stop()
    assert len(source.acked) + len(source.nacked) == 3
    assert running == [1]  # the others went back unhandled: never over its concurrency
