"""Each source reads what it received: event, size and trace context, as the generic reading does.

`SQSSource` and `PubSubSource` know their broker's message shape and read it
without guessing (`fastapi_eventbus._brokers`); a custom `Source` that overrides
nothing falls back to `fastapi_eventbus.wire`'s generic functions. Either way the
worker gets what `decode_message`, `message_size` and `message_trace_context`
give for the same message.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from fastapi_eventbus import Event, EventBus, MessageDecodeError
from fastapi_eventbus.wire import (
    DEFAULT_SOURCE,
    decode_message,
    message_size,
    message_trace_context,
    pubsub_attributes,
    pubsub_data,
    sqs_body,
    trace_attributes,
)
from fastapi_eventbus.worker import PubSubSource, ReceivedMessage, Source, SQSSource, Worker

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACED = {"traceparent": TRACEPARENT, "tracestate": "vendor=é"}

EVENTS = [
    Event(name="order.placed", payload={"id": 1, "note": "café ☕"}),
    Event(name="order.placed", payload=None, source="//shop", trace_context=TRACED),
    Event(name="user.created", payload=[1, 2, {"deep": True}], trace_context=TRACED),
]


def sqs_message(event: Event) -> dict[str, Any]:
    """*event* as ``ReceiveMessage`` returns it, with its trace context in message attributes."""
    return {
        "MessageId": "m1",
        "ReceiptHandle": "r1",
        "Body": sqs_body(event),
        "Attributes": {"ApproximateReceiveCount": "1"},
        "MessageAttributes": {
            name: {"DataType": "String", "StringValue": value}
            for name, value in trace_attributes(event).items()
        },
    }


def pubsub_message(event: Event) -> dict[str, Any]:
    """*event* as `PubSubSource` receives it: the data (bytes) and the attributes."""
    return {"data": pubsub_data(event), "attributes": pubsub_attributes(event)}


def sqs_source() -> SQSSource:
    return SQSSource("https://sqs.eu-west-1.amazonaws.com/123456789012/orders")


def pubsub_source() -> PubSubSource:
    return PubSubSource("projects/shop/subscriptions/orders-worker", emulator_host="localhost:1")


class PlainSource(Source):
    """A user's source that reads nothing itself: the `Source` defaults apply."""

    async def receive(self, max_messages: int) -> list[ReceivedMessage]:
        return []

    async def ack(self, message: ReceivedMessage) -> None:
        pass

    async def nack(self, message: ReceivedMessage, delay: float | None = None) -> None:
        pass


SOURCES: list[tuple[Callable[[], Source], Callable[[Event], dict[str, Any]]]] = [
    (sqs_source, sqs_message),
    (pubsub_source, pubsub_message),
    (PlainSource, sqs_message),
    (PlainSource, pubsub_message),
]
IDS = ["sqs", "pubsub", "custom-sqs", "custom-pubsub"]


def same_event(decoded: Event, sent: Event) -> bool:
    """Whether *decoded* is *sent* as it travelled (no source: the default source)."""
    fields = ("id", "name", "payload", "time")
    return [getattr(decoded, f) for f in fields] == [getattr(sent, f) for f in fields] and (
        decoded.source == (sent.source or DEFAULT_SOURCE)
    )


def received(body: Mapping[str, Any]) -> ReceivedMessage:
    return ReceivedMessage(body, "m1", "r1")


@pytest.mark.parametrize(("make_source", "shape"), SOURCES, ids=IDS)
@pytest.mark.parametrize("event", EVENTS, ids=["plain", "traced", "list"])
def test_a_source_reads_what_the_generic_functions_read(
    make_source: Callable[[], Source], shape: Callable[[Event], dict[str, Any]], event: Event
) -> None:
    source, body = make_source(), shape(event)
    message = received(body)
    decoded = source.decode(message)
    assert decoded == decode_message(body)
    assert same_event(decoded, event)
    assert decoded.trace_context == trace_attributes(event)
    assert source.message_size(message) == message_size(body) > 0
    assert source.trace_context(message) == message_trace_context(body) == trace_attributes(event)


@pytest.mark.parametrize(
    ("make_source", "body"),
    [
        (sqs_source, {"Body": "not json"}),
        (sqs_source, {"Body": '{"specversion": "1.0"}'}),
        (sqs_source, {"Body": sqs_body(EVENTS[0]), "MessageAttributes": "nonsense"}),
        (pubsub_source, {"data": b"{", "attributes": {}}),
        (pubsub_source, {"data": "not base64!", "attributes": {}}),
        (pubsub_source, {"data": b"1", "attributes": "nonsense"}),
        (PlainSource, {"neither": "shape"}),
    ],
)
def test_what_is_not_an_event_is_refused_alike(
    make_source: Callable[[], Source], body: dict[str, Any]
) -> None:
    source, message = make_source(), received(body)
    generic: Event | str
    try:
        generic = decode_message(body)
    except MessageDecodeError as exc:
        generic = str(exc)
    own: Event | str
    try:
        own = source.decode(message)
    except MessageDecodeError as exc:
        own = str(exc)
    assert own == generic
    assert source.message_size(message) == message_size(body)
    assert source.trace_context(message) == message_trace_context(body)


def test_forged_trace_attributes_are_ignored_alike() -> None:
    event = EVENTS[0]
    too_long = {"DataType": "String", "StringValue": "0" * 300}
    sqs = {**sqs_message(event), "MessageAttributes": {"traceparent": too_long, "x": too_long}}
    attributes = {**pubsub_attributes(event), "traceparent": "0" * 300, "tracestate": 7}
    pubsub = {"data": pubsub_data(event), "attributes": attributes}
    for source, body in ((sqs_source(), sqs), (pubsub_source(), pubsub)):
        message = received(body)
        assert source.trace_context(message) == message_trace_context(body) == {}
        assert source.decode(message).trace_context == {}
        assert source.message_size(message) == message_size(body)


def test_base64_data_counts_its_decoded_bytes() -> None:
    """A Pub/Sub pull item (base64 data) reads the same through the default and the source."""
    event = EVENTS[1]
    inner = {
        "data": base64.b64encode(pubsub_data(event)).decode(),
        "attributes": pubsub_attributes(event),
    }
    size = len(pubsub_data(event)) + sum(
        len(k.encode()) + len(v.encode()) for k, v in pubsub_attributes(event).items()
    )
    for source, body in ((pubsub_source(), inner), (PlainSource(), {"message": inner})):
        message = received(body)
        assert source.message_size(message) == size
        assert same_event(source.decode(message), event)
        assert source.trace_context(message) == TRACED


class TextSource(Source):
    """A source of another format, one event name per message: it overrides the reading."""

    def __init__(self, *names: str) -> None:
        self.pending = [ReceivedMessage({"text": n}, f"m{i}", f"r{i}") for i, n in enumerate(names)]
        self.acked: list[str] = []
        self.nacked: list[str] = []

    def decode(self, message: ReceivedMessage) -> Event:
        return Event(name=message.body["text"], trace_context=self.trace_context(message))

    def message_size(self, message: ReceivedMessage) -> int:
        return len(message.body["text"])

    def trace_context(self, message: ReceivedMessage) -> dict[str, str]:
        return {"traceparent": TRACEPARENT}

    async def receive(self, max_messages: int) -> list[ReceivedMessage]:
        batch, self.pending = self.pending[:max_messages], self.pending[max_messages:]
        if not batch:
            await asyncio.sleep(0.05)
        return batch

    async def ack(self, message: ReceivedMessage) -> None:
        self.acked.append(message.message_id)

    async def nack(self, message: ReceivedMessage, delay: float | None = None) -> None:
        self.nacked.append(message.message_id)


@pytest.mark.anyio
async def test_the_worker_uses_what_its_source_reads() -> None:
    """The source's size decides ``max_message_bytes``; its event reaches the handlers."""
    bus = EventBus()
    seen: list[Event] = []

    @bus.on("order.*")
    def record(event: Event) -> None:
        seen.append(event)

    source = TextSource("order.placed", "order.far-too-long-to-decode")
    async with Worker(bus, source, max_message_bytes=20) as worker:
        for _ in range(200):
            if len(source.acked) + len(source.nacked) == 2:
                break
            await asyncio.sleep(0.01)
    assert (source.acked, source.nacked) == (["m0"], ["m1"])
    assert worker.stats.handled == worker.stats.undecodable == 1
    assert [(e.name, e.trace_context) for e in seen] == [
        ("order.placed", {"traceparent": TRACEPARENT})
    ]
