"""Stopping a worker while its long poll waits (moto's server holds a poll as SQS does)."""

from __future__ import annotations

import asyncio
import time

import pytest

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.testing import MemorySource
from fastapi_eventbus.worker import Backoff, ReceivedMessage, Worker
from tests.forwarders._moto import Moto
from tests.worker._helpers import counts, create_queue, peek

pytestmark = pytest.mark.anyio


async def test_stop_during_a_long_poll_leaves_no_message_to_the_poll_it_dropped(
    moto: Moto, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: `stop` cancelled the ``ReceiveMessage`` under way. Cancelling closes the
    connection, not the poll: the server keeps it until its ``WaitTimeSeconds`` end and hands
    it the next message sent, which then stays in flight, unseen and unlogged, until its
    visibility timeout (60 s here, and one receive counted toward its dead-letter queue).
    The worker now lets the poll return (within ``shutdown_timeout``) and gives back at once
    what it brought."""
    queue_url = await create_queue(moto, "orders", {"VisibilityTimeout": "60"})
    bus = EventBus()
    bus.on("order.*")(lambda event: None)
    source = moto.source(queue_url, wait_time_seconds=3, visibility_backoff=Backoff(initial=0))
    worker = Worker(bus, source, shutdown_timeout=10)
    async with worker:
        await asyncio.sleep(0.5)  # the worker's poll is waiting on the server
        stopping = asyncio.create_task(worker.stop())
        await asyncio.sleep(0.2)
        forwarder = moto.forwarder(queue_url)
        sender = EventBus()
        sender.forward("order.*", forwarder)
        started = time.monotonic()
        await sender.publish("order.placed", {"n": 1})  # while the worker stops
        await sender.close()
        await stopping
    assert time.monotonic() - started < 5  # bounded by the poll's 3 s, not the 10 s
    assert worker.stats.received == 0  # never handled
    await asyncio.sleep(0.3)
    assert await counts(moto, queue_url) == (1, 0)  # visible at once, not in flight for 60 s
    (message,) = await peek(moto, queue_url)
    assert (
        f"1 message(s) received as the worker stopped go back unhandled: {message['MessageId']}"
        in caplog.messages
    )


async def test_a_receive_that_does_not_return_in_time_is_cancelled_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Waiting for the poll under way is bounded by ``shutdown_timeout``; past it, the call
    is cancelled, and a WARNING says what that may leave invisible."""

    class Stalled(MemorySource):
        receive_outlives_cancel = True

        async def receive(self, max_messages: int) -> list[ReceivedMessage]:
            await asyncio.Event().wait()
            return []

    bus = EventBus()
    bus.on("order.*")(lambda event: None)
    started = time.monotonic()
    async with Worker(bus, Stalled(name="source"), shutdown_timeout=0.3):
        await asyncio.sleep(0.1)
    assert time.monotonic() - started < 2
    assert (
        "stopping while a receive call on source is under way: what the broker hands it "
        "stays invisible until its visibility timeout (ack deadline)"
    ) in caplog.messages


async def test_what_a_poll_brings_just_before_the_time_is_up_is_still_given_back() -> None:
    """Found: a poll returning shortly before ``shutdown_timeout`` ran out had its give-back
    cut off with the receive loop, though a WARNING said the message went back: it stayed
    invisible until its visibility timeout, and no count or line said so."""

    class LatePoll(MemorySource):
        receive_outlives_cancel = True
        stopping = asyncio.Event()

        async def receive(self, max_messages: int) -> list[ReceivedMessage]:
            if not self.stopping.is_set():
                await asyncio.sleep(0.05)  # nothing until the stop
                return []
            await asyncio.sleep(0.4)  # the poll under way ends 0.1 s before the time is up
            self.put(Event(name="order.placed"), message_id="m1")
            return await super().receive(max_messages)

        async def nack(self, message: ReceivedMessage, delay: float | None = None) -> None:
            await asyncio.sleep(0.3)  # a give-back taking longer than the time left
            await super().nack(message, delay)

    bus = EventBus()
    bus.on("order.*")(lambda event: None)
    source = LatePoll(name="source")
    async with Worker(bus, source, shutdown_timeout=0.5) as worker:
        await asyncio.sleep(0.1)
        source.stopping.set()
        await asyncio.sleep(0.06)  # the next poll is under way
    assert [(m.message_id, delay) for m, delay in source.nacked] == [("m1", 0)]
    assert worker.stats.received == 0
