"""The heartbeat: a message stays invisible (SQS) or unexpired (Pub/Sub) while handlers run.

Against moto's SQS server, a handler slower than the visibility timeout gets its message once
with ``visibility_timeout`` set, and twice without it; against the Pub/Sub emulator,
`PubSubSource.extend` and ``ack_deadline`` push a message's ack deadline past the
subscription's own.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from contextlib import suppress
from dataclasses import replace
from typing import Any

import pytest

from fastapi_eventbus import ConfigurationError, Event, EventBus, SourceError
from fastapi_eventbus.forwarders.pubsub import PubSubForwarder
from fastapi_eventbus.testing import MemorySource
from fastapi_eventbus.worker import PubSubSource, ReceivedMessage, Source, SQSSource, Worker
from tests._pubsub import PROJECT, Channel, Emulator
from tests._support import until
from tests.forwarders._moto import Moto
from tests.worker._helpers import counts, create_queue

pytestmark = pytest.mark.anyio

SLOW_HANDLER_SECONDS = 5.0
"""Longer than the 2 s visibility timeouts below."""


def sqs_source(moto: Moto, queue_url: str, **options: Any) -> SQSSource:
    return moto.source(queue_url, **options)


def slow_bus(calls: list[str], seconds: float = SLOW_HANDLER_SECONDS) -> EventBus:
    """A bus whose one handler records the event id, then takes *seconds*."""
    bus = EventBus()

    @bus.on("order.*")
    async def slow(event: Event) -> None:
        calls.append(event.id)
        await asyncio.sleep(seconds)

    return bus


async def publish_one(moto: Moto, queue_url: str) -> str:
    bus = EventBus()
    bus.forward("order.*", moto.forwarder(queue_url))
    event = await bus.publish("order.placed", {"n": 1})
    await bus.close()
    return event.id


# -- SQS ------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_slow_handler_gets_its_message_once_with_a_visibility_timeout(
    moto: Moto,
) -> None:
    queue_url = await create_queue(moto, "slow", {"VisibilityTimeout": "2"})
    event_id = await publish_one(moto, queue_url)
    calls: list[str] = []
    source = sqs_source(moto, queue_url, visibility_timeout=2)
    assert source.extend_interval == 1.0
    async with Worker(slow_bus(calls), source, concurrency=2) as worker:
        await until(lambda: worker.stats.handled == 1, timeout=15)
    assert calls == [event_id]
    assert worker.stats.received == 1
    assert await counts(moto, queue_url) == (0, 0)


@pytest.mark.slow
async def test_without_a_heartbeat_a_slow_handler_gets_its_message_twice(moto: Moto) -> None:
    """The control of the test above: the queue's own 2 s visibility timeout runs out."""
    queue_url = await create_queue(moto, "slow", {"VisibilityTimeout": "2"})
    event_id = await publish_one(moto, queue_url)
    calls: list[str] = []
    source = sqs_source(moto, queue_url)
    assert source.extend_interval is None
    async with Worker(slow_bus(calls), source, concurrency=2, shutdown_timeout=0):
        await until(lambda: len(calls) == 2, timeout=SLOW_HANDLER_SECONDS)
    assert calls == [event_id, event_id]


@pytest.mark.parametrize("value", [0, 43_201, 2.5, True, "30"])
def test_sqs_visibility_timeout_must_be_an_int_from_1_to_43200(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="visibility_timeout must be an int from 1"):
        SQSSource("https://sqs.eu-west-1.amazonaws.com/1/q", visibility_timeout=value)


async def test_sqs_extend_needs_seconds_without_a_visibility_timeout() -> None:
    source = SQSSource("https://sqs.eu-west-1.amazonaws.com/1/q")
    with pytest.raises(ConfigurationError, match="no visibility_timeout"):
        await source.extend(ReceivedMessage(body={}, message_id="m", receipt="r"))


# -- the worker's heartbeat, with a source of its own ----------------------------------------


class OneMessageSource(MemorySource):
    """A `MemorySource` holding one message that records the worker's calls in order, and
    whose extensions fail if told; a message given back is dead, not delivered again."""

    def __init__(self, *, extend_interval: float | None, extend_fails: bool = False) -> None:
        super().__init__(name="one", max_deliveries=1, extend_interval=extend_interval)
        self.extend_fails = extend_fails
        self.calls: list[str] = []
        self.put(Event(name="order.placed", payload={}), message_id="m-1")

    async def ack(self, message: ReceivedMessage) -> None:
        self.calls.append("ack")
        await super().ack(message)

    async def nack(self, message: ReceivedMessage, delay: float | None = None) -> None:
        self.calls.append("nack")
        await super().nack(message, delay)

    async def extend(self, message: ReceivedMessage, seconds: float | None = None) -> None:
        self.calls.append(f"extend {message.message_id} {seconds}")
        if self.extend_fails:
            raise SourceError("receipt handle expired")
        await super().extend(message, seconds)


async def test_the_heartbeat_extends_while_handlers_run_and_stops_before_the_ack() -> None:
    calls: list[str] = []
    source = OneMessageSource(extend_interval=0.05)
    async with Worker(slow_bus(calls, seconds=0.3), source) as worker:
        await until(lambda: worker.stats.handled == 1)
        await asyncio.sleep(0.15)  # no extension after the acknowledgement
    assert len(calls) == 1
    extensions, settled = source.calls[:-1], source.calls[-1]
    assert settled == "ack"
    assert len(extensions) >= 3
    assert set(extensions) == {"extend m-1 None"}


async def test_a_failing_extension_is_logged_and_retried_and_the_message_handled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []
    source = OneMessageSource(extend_interval=0.05, extend_fails=True)
    with caplog.at_level(logging.WARNING, logger="fastapi_eventbus.worker"):
        async with Worker(slow_bus(calls, seconds=0.3), source) as worker:
            await until(lambda: worker.stats.handled == 1)
    assert source.calls.count("extend m-1 None") >= 2  # it keeps trying
    assert source.calls[-1] == "ack"
    warnings = [r.getMessage() for r in caplog.records if "could not extend" in r.getMessage()]
    assert len(warnings) >= 2
    assert warnings[0] == (
        "could not extend the visibility of message m-1 on one (receipt handle expired); "
        "it may be delivered again while its handlers run"
    )
    assert worker.stats.handled == 1


@pytest.mark.slow
async def test_the_heartbeat_stops_at_the_time_limit_and_a_hung_message_is_given_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler that ignores its 0.1 s limit: the worker holds its message 0.1 s + 5 s."""
    bus = EventBus()
    release = asyncio.Event()
    handled: list[str] = []

    @bus.on("order.*", timeout=0.1)
    async def stubborn(event: Event) -> None:
        while not release.is_set():
            with suppress(asyncio.CancelledError):
                await release.wait()

    bus.on("invoice.*")(lambda event: handled.append(event.id))
    source = OneMessageSource(extend_interval=0.5)
    async with Worker(bus, source, concurrency=1) as worker:
        try:
            await until(lambda: "nack" in source.calls, timeout=10)
            given_up = list(source.calls)
            # Its slot is free again: with concurrency=1, the next message is handled.
            invoice = Event(name="invoice.sent")
            source.put(invoice, message_id="m-2")
            await until(lambda: handled == [invoice.id])
            await asyncio.sleep(0.6)  # longer than the heartbeat's interval
        finally:
            release.set()  # the hung handler ends; its message is not acknowledged
    extensions, last, nack = given_up[:-2], given_up[-2], given_up[-1]
    assert set(extensions) == {"extend m-1 None"}
    assert len(extensions) == 9  # every 0.5 s while 0.5 s or more is left of the 5.1 s
    assert last.startswith("extend m-1 0.")  # then up to the end of the 5.1 s exactly
    assert nack == "nack"
    assert source.calls == [*given_up, "ack"]  # m-2's ack; nothing more for m-1
    assert worker.stats.abandoned == 1
    assert worker.stats.handled == 1
    (error,) = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and r.name == "fastapi_eventbus.worker"
    ]
    assert "message m-1 (event 'order.placed' id=" in error
    assert "is still running 5.1s after its handlers started; giving it back" in error


@pytest.mark.slow
async def test_a_message_given_back_at_shutdown_is_extended_no_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found: at shutdown, a message whose handler ignored its cancellation was given back
    at once (nack, delay 0), but its heartbeat ran on and extended it again every interval,
    hiding the message it had just given back (and, once the source closed, logging
    'could not extend' WARNINGs) for as long as the handler ran. Giving it back now stops
    its heartbeat."""
    bus = EventBus(handler_timeout=None, shutdown_timeout=1)  # only shutdown cancels it
    release = asyncio.Event()

    @bus.on("order.*")
    async def stubborn(event: Event) -> None:
        while not release.is_set():
            with suppress(asyncio.CancelledError):
                await release.wait()

    source = OneMessageSource(extend_interval=0.1)
    asyncio.get_running_loop().call_later(40, release.set)  # in case stop() is not bounded
    with caplog.at_level(logging.WARNING, logger="fastapi_eventbus.worker"):
        async with Worker(bus, source, shutdown_timeout=0.1) as worker:
            await until(lambda: "extend m-1 None" in source.calls)
            await worker.stop()  # abandoned ~6 s later; the bus then waits 1 s for it
            await asyncio.sleep(0.3)  # three intervals more, the handler still running
            release.set()
    given_back = source.calls.index("nack")
    assert source.calls[given_back:] == ["nack"], source.calls[given_back:]
    assert worker.stats.abandoned == 1
    assert not [r for r in caplog.records if "could not extend" in r.getMessage()]


async def test_a_message_that_waited_for_its_group_is_extended_at_once_when_its_turn_comes() -> (
    None
):
    """Found: a message of a group waits (its heartbeat extending it) for the one before it;
    when its turn came, the handlers' heartbeat first extended it a full interval later. A
    turn coming just before the wait's next beat left about two intervals (the whole
    visibility timeout) between two extensions: the message could expire, and come again,
    while its handlers ran. The handlers' heartbeat now extends it at once after a wait."""
    interval = 0.4
    extended: dict[str, list[float]] = {}

    class Grouped(MemorySource):
        async def receive(self, max_messages: int) -> list[ReceivedMessage]:
            received = await super().receive(max_messages)
            for message in received:
                extended[message.message_id] = [asyncio.get_running_loop().time()]
            return [replace(message, order_key="g") for message in received]

        async def extend(self, message: ReceivedMessage, seconds: float | None = None) -> None:
            extended[message.message_id].append(asyncio.get_running_loop().time())

    bus = EventBus()

    @bus.on("order.*")
    async def step(event: Event) -> None:  # the first ends just before the wait's 2nd beat
        await asyncio.sleep(interval * (1.9 if event.payload["n"] == 0 else 1.5))

    source = Grouped(name="fifo", extend_interval=interval)
    for n in range(2):
        source.put(Event(name="order.placed", payload={"n": n}), message_id=f"m{n}")
    async with Worker(bus, source) as worker:
        await until(lambda: worker.stats.handled == 2)
    times = extended["m1"]  # received, then each extension
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert max(gaps) < interval * 1.5, gaps  # before: about 1.9 intervals after the wait
    assert len(gaps) >= 3, gaps  # received, the wait's beat, then the handlers' ones


async def test_no_heartbeat_without_an_extend_interval() -> None:
    calls: list[str] = []
    source = OneMessageSource(extend_interval=None)
    async with Worker(slow_bus(calls, seconds=0.2), source) as worker:
        await until(lambda: worker.stats.handled == 1)
    assert source.calls == ["ack"]


async def test_a_source_extends_nothing_by_default() -> None:
    class Plain(Source):
        async def receive(self, max_messages: int) -> list[ReceivedMessage]:
            return []

        async def ack(self, message: ReceivedMessage) -> None:
            pass

        async def nack(self, message: ReceivedMessage, delay: float | None = None) -> None:
            pass

    plain = Plain()
    assert plain.extend_interval is None
    await plain.extend(ReceivedMessage(body={}, message_id="m", receipt="r"), 30)


# -- Pub/Sub --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [9, 601, 30.0, True])
def test_pubsub_ack_deadline_must_be_an_int_from_10_to_600(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="ack_deadline must be an int from 10 to 600"):
        PubSubSource("projects/shop/subscriptions/orders", ack_deadline=value)


def test_pubsub_ack_deadline_sets_the_interval() -> None:
    source = PubSubSource("projects/shop/subscriptions/orders", ack_deadline=60)
    assert (source.ack_deadline, source.extend_interval) == (60, 30.0)
    assert PubSubSource("projects/shop/subscriptions/orders").extend_interval is None


async def test_pubsub_extend_needs_seconds_without_an_ack_deadline() -> None:
    source = PubSubSource("projects/shop/subscriptions/orders")
    with pytest.raises(ConfigurationError, match="no ack_deadline"):
        await source.extend(ReceivedMessage(body={}, message_id="m", receipt="r"))


async def pulled(emulator: Emulator, **options: Any) -> tuple[Channel, PubSubSource, str]:
    """A fresh channel with one event, pulled by a started source (closed by the caller)."""
    channel = emulator.channel()  # the subscription's ack deadline: the default 10 s
    publisher = EventBus()
    publisher.forward("order.*", PubSubForwarder(channel.topic, emulator_host=emulator.host))
    await publisher.publish("order.placed", {"n": 1})
    await publisher.close()
    path = f"projects/{PROJECT}/subscriptions/{channel.subscription}"
    source = PubSubSource(path, emulator_host=emulator.host, **options)
    await source.start()
    (message,) = await source.receive(1)
    return channel, source, message.receipt


@pytest.mark.slow
async def test_pubsub_ack_deadlines_outlast_the_subscriptions(pubsub_emulator: Emulator) -> None:
    """Three messages, 10 s subscriptions: only the one not extended comes back after 10 s."""
    control, plain, _ = await pulled(pubsub_emulator)
    extended, by_hand, receipt = await pulled(pubsub_emulator)
    deadline, with_deadline, _ = await pulled(pubsub_emulator, ack_deadline=60)
    message = ReceivedMessage(body={}, message_id="m", receipt=receipt)
    try:
        await by_hand.extend(message, 60)
        await asyncio.sleep(11)
        assert len(await asyncio.to_thread(control.pull, 1, 5.0)) == 1  # redelivered
        assert await asyncio.to_thread(extended.pull, 1, 1.0) == []
        assert await asyncio.to_thread(deadline.pull, 1, 1.0) == []
        await by_hand.extend(message, 0)  # the deadline now: redelivered at once
        assert len(await asyncio.to_thread(extended.pull, 1, 5.0)) == 1
    finally:
        for source in (plain, by_hand, with_deadline):
            await source.close()
