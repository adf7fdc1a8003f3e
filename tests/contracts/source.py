"""`SourceContract`: what every worker `Source` must do, as tests to subclass per broker.

```python
class TestMySource(SourceContract):
    @pytest.fixture
    def make_source(self, queue: str) -> MakeSource:
        return lambda: MySource(queue, wait_time=1)

    @pytest.fixture
    def send(self, queue: str) -> Send:
        return lambda events: forward_to(queue, events)
```

A source's receive should return within a second or two when nothing comes:
the "nothing more" checks poll for `SourceContract.quiet` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

import pytest

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.wire import pubsub_data
from fastapi_eventbus.worker import ReceivedMessage, Source, Worker
from tests._support import until

MakeSource = Callable[[], Source]
"""A new source on this test's queue, not started (an in-memory one may return itself)."""
Send = Callable[[Sequence[Event]], Awaitable[None]]
"""Put events on this test's queue as its forwarder would."""

TRACED = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


def orders(count: int) -> list[Event]:
    """*count* events, the first with a trace context."""
    return [
        Event(name="order.placed", payload={"n": n}, trace_context=TRACED if n == 0 else {})
        for n in range(count)
    ]


async def receive(source: Source, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
    """Receive until *count* messages came (fail after *timeout* seconds)."""
    messages: list[ReceivedMessage] = []
    deadline = time.monotonic() + timeout
    while len(messages) < count:
        assert time.monotonic() < deadline, f"received {len(messages)} of {count}"
        messages.extend(await source.receive(count - len(messages)))
    return messages


async def nothing_more(source: Source, seconds: float) -> None:
    """Check that nothing is received for *seconds*."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        extra = await source.receive(source.max_messages)
        assert not extra, f"unexpected message(s): {[m.message_id for m in extra]}"


@pytest.mark.anyio
class SourceContract:
    """The checklist of a `Source`: subclass it and provide the fixtures."""

    quiet: float = 1.5
    """Seconds of receiving nothing that mean nothing more comes."""

    @pytest.fixture
    def make_source(self) -> MakeSource:
        """Sources on a fresh queue of this test."""
        raise NotImplementedError

    @pytest.fixture
    def send(self) -> Send:
        """Sends events to the queue of `make_source`'s sources."""
        raise NotImplementedError

    async def test_it_receives_and_reads_what_was_sent(
        self, make_source: MakeSource, send: Send
    ) -> None:
        events = orders(3)
        await send(events)
        async with make_source() as source:
            messages = await receive(source, len(events))
            by_id = {event.id: event for event in events}
            for message in messages:
                assert message.message_id
                assert isinstance(message.receipt, str)
                assert message.receive_count in (None, 1)
                decoded = source.decode(message)
                sent = by_id.pop(decoded.id)
                assert (decoded.name, decoded.payload, decoded.time) == (
                    sent.name,
                    sent.payload,
                    sent.time,
                )
                assert decoded.trace_context == sent.trace_context
                assert source.trace_context(message) == sent.trace_context
                assert source.message_size(message) >= len(pubsub_data(sent))
            assert not by_id
            for message in messages:
                await source.ack(message)

    async def test_receive_returns_at_most_max_messages(
        self, make_source: MakeSource, send: Send
    ) -> None:
        await send(orders(3))
        async with make_source() as source:
            assert source.max_messages >= 1
            first = await receive(source, 1)
            assert len(first) == 1
            rest = await receive(source, 2)
            for message in first + rest:
                await source.ack(message)

    async def test_an_ack_removes_the_message_for_good(
        self, make_source: MakeSource, send: Send
    ) -> None:
        await send(orders(2))
        async with make_source() as source:
            for message in await receive(source, 2):
                await source.ack(message)
        async with make_source() as source:  # close kept the acks
            await nothing_more(source, self.quiet)

    async def test_a_nack_gives_the_message_back(self, make_source: MakeSource, send: Send) -> None:
        (event,) = orders(1)
        await send([event])
        async with make_source() as source:
            (first,) = await receive(source, 1)
            await source.nack(first, 0)
            (again,) = await receive(source, 1)
            assert source.decode(again).id == event.id
            assert again.message_id == first.message_id
            assert again.receive_count in (None, 2)
            await source.ack(again)
            await nothing_more(source, self.quiet)

    async def test_extend_keeps_the_message_or_does_nothing(
        self, make_source: MakeSource, send: Send
    ) -> None:
        await send(orders(1))
        async with make_source() as source:
            (message,) = await receive(source, 1)
            await source.extend(message, 30)
            await source.ack(message)

    async def test_a_worker_handles_what_was_sent(
        self, make_source: MakeSource, send: Send
    ) -> None:
        bus, seen = EventBus(), list[str]()
        bus.on("order.*")(lambda event: seen.append(event.id))
        events = orders(2)
        await send(events)
        source = make_source()
        assert source.name
        assert isinstance(source.name, str)
        async with Worker(bus, source) as worker:
            await until(lambda: worker.stats.handled == len(events))
        assert sorted(seen) == sorted(event.id for event in events)
