"""One trace from the request, through a real queue, to a worker: moto's SQS and Pub/Sub's emulator.

A request emits two events; each has a local handler (one fails) and both are
forwarded. A worker receives them and runs its own handlers; the ``order.paid``
handler fails on its first delivery, so that message is given back and comes
again. Every span of all that is in the request's trace.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from fastapi_eventbus import Event, EventBus, SourceError, _deadline, get_bus
from fastapi_eventbus.forwarders import Forwarder
from fastapi_eventbus.forwarders.pubsub import PubSubForwarder
from fastapi_eventbus.otel import MESSAGING_SYSTEM, instrument_bus
from fastapi_eventbus.testing import MemorySource, RecordingForwarder
from fastapi_eventbus.worker import (
    Backoff,
    PubSubSource,
    ReceivedMessage,
    Source,
    Worker,
)
from tests._otel import (
    Breaking,
    Spans,
    instrumented,
    is_error,
    linked_ids,
    parent_id,
    sid,
    tid,
    traceparent,
)
from tests._pubsub import PROJECT, Emulator
from tests._support import until
from tests.forwarders._fanout import bus_with_rule, eventbridge_forwarder
from tests.forwarders._moto import Moto
from tests.worker._helpers import create_queue

pytestmark = pytest.mark.slow


@dataclass
class Broker:
    """One way across: the web app's forwarder and the worker's source, and their names."""

    system: str
    destination: str
    """The forwarder's destination (queue or topic) in send spans."""
    source_name: str
    """The source's name (queue or subscription) in the worker's spans."""
    destination_attribute: str
    forwarder: Callable[[], Forwarder]
    source: Callable[[], Source]


@pytest.fixture(params=["sqs", "pubsub"])
def broker(request: pytest.FixtureRequest) -> Broker:
    if request.param == "sqs":
        moto: Moto = request.getfixturevalue("moto")
        queue_url = asyncio.run(create_queue(moto, "traced"))
        name = queue_url.rsplit("/", 1)[-1]
        return Broker(
            "aws_sqs",
            name,
            name,
            "messaging.destination.name",
            lambda: moto.forwarder(queue_url),
            lambda: moto.source(queue_url, visibility_backoff=Backoff(initial=0)),
        )
    emulator: Emulator = request.getfixturevalue("pubsub_emulator")
    channel = emulator.channel()
    return Broker(
        "gcp_pubsub",
        channel.topic.rsplit("/", 1)[-1],
        channel.subscription,
        "messaging.destination.subscription.name",
        lambda: PubSubForwarder(channel.topic, emulator_host=emulator.host),
        lambda: PubSubSource(
            f"projects/{PROJECT}/subscriptions/{channel.subscription}",
            emulator_host=emulator.host,
        ),
    )


def number() -> int:
    return 7


def web_app(spans: Spans, broker: Broker) -> FastAPI:
    bus = EventBus()
    instrument_bus(bus, tracer_provider=spans.provider)
    bus.forward("order.*", broker.forwarder())
    app = FastAPI()
    bus.install(app)

    @bus.on("order.placed")
    async def count_order(event: Event, n: Annotated[int, Depends(number)]) -> None:
        pass

    @bus.on("order.paid")
    async def notify_sales(event: Event, n: Annotated[int, Depends(number)]) -> None:
        raise RuntimeError("chat webhook down")

    @app.post("/orders")
    async def place(events: Annotated[EventBus, Depends(get_bus)]) -> dict[str, str]:
        placed = events.emit("order.placed", {"id": 1})
        paid = events.emit("order.paid", {"id": 1})
        return {"placed": placed.id, "paid": paid.id}

    return app


def worker_bus(spans: Spans) -> EventBus:
    bus = EventBus()
    instrument_bus(bus, tracer_provider=spans.provider)
    deliveries: dict[str, int] = {}

    @bus.on("order.placed")
    async def ship(event: Event, n: Annotated[int, Depends(number)]) -> None:
        pass

    @bus.on("order.paid")
    async def book_payment(event: Event) -> None:
        deliveries[event.id] = deliveries.get(event.id, 0) + 1
        if deliveries[event.id] == 1:
            raise RuntimeError("ledger locked")

    return bus


def test_one_trace_from_the_request_through_the_queue_to_the_worker(broker: Broker) -> None:
    spans = Spans()
    with instrumented(web_app(spans, broker), spans) as app, TestClient(app) as client:
        ids = client.post("/orders").json()

    async def consume() -> None:
        async with Worker(worker_bus(spans), broker.source()) as worker:
            await until(lambda: worker.stats.handled == 2, timeout=40)  # a nack: up to ~11 s
            await until(lambda: len(spans.named(f"ack {broker.source_name}")) == 2)

    asyncio.run(consume())

    server = spans.one("POST /orders")
    assert {tid(span) for span in spans.all} == {tid(server)}, "one trace end to end"
    emits = {name: spans.one(f"emit {name}") for name in ("order.placed", "order.paid")}
    assert all(parent_id(emit) == sid(server) for emit in emits.values())

    # In the web process: the forwarder's send, a child of the first emit linked to both.
    send = spans.one(f"send {broker.destination}")
    assert send.kind is SpanKind.PRODUCER
    assert parent_id(send) == sid(emits["order.placed"])
    assert linked_ids(send) == [sid(emits["order.placed"]), sid(emits["order.paid"])]
    assert (send.attributes or {})["messaging.system"] == broker.system
    assert (send.attributes or {})["messaging.batch.message_count"] == 2
    local = [s for s in spans.all if s.kind is SpanKind.CONSUMER and s.name.startswith("process o")]
    assert {(s.name, (s.attributes or {})["messaging.system"], is_error(s)) for s in local} == {
        ("process order.placed", MESSAGING_SYSTEM, False),
        ("process order.paid", MESSAGING_SYSTEM, True),
    }

    # In the worker: one process span per delivery, a child of the message's emit (and linked).
    deliveries = spans.named(f"process {broker.source_name}")
    assert len(deliveries) == 3  # order.placed once, order.paid twice
    by_event: dict[str, list[ReadableSpan]] = {}
    for delivery in deliveries:
        attributes = delivery.attributes or {}
        assert delivery.kind is SpanKind.CONSUMER
        assert attributes["messaging.system"] == broker.system
        assert attributes[broker.destination_attribute] == broker.source_name
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.message.id"]
        name = str(attributes["fastapi_eventbus.event.name"])
        assert attributes["fastapi_eventbus.event.id"] == ids[name.split(".")[1]]
        assert parent_id(delivery) == sid(emits[name])
        assert linked_ids(delivery) == [sid(emits[name])]
        assert delivery.parent is not None
        assert delivery.parent.is_remote
        by_event.setdefault(name, []).append(delivery)

    (placed,) = by_event["order.placed"]
    first, second = sorted(by_event["order.paid"], key=lambda span: span.start_time or 0)
    assert not is_error(placed)
    assert not is_error(second)
    assert is_error(first)
    assert first.status.description == "1 handler(s) failed; the message goes back for redelivery"
    assert (first.attributes or {})["error.type"] == "RuntimeError"
    assert first.events == ()  # the exception is on the handler's span, not twice

    def steps(delivery: ReadableSpan) -> list[tuple[str, SpanKind, bool]]:
        return sorted((s.name, s.kind, is_error(s)) for s in spans.children(delivery))

    source = broker.source_name
    assert steps(placed) == [
        (f"ack {source}", SpanKind.CLIENT, False),
        ("process order.placed", SpanKind.INTERNAL, False),
    ]
    assert steps(first) == [
        (f"nack {source}", SpanKind.CLIENT, False),
        ("process order.paid", SpanKind.INTERNAL, True),
    ]
    assert steps(second) == [
        (f"ack {source}", SpanKind.CLIENT, False),
        ("process order.paid", SpanKind.INTERNAL, False),
    ]
    (failed_handler,) = [s for s in spans.children(first) if s.kind is SpanKind.INTERNAL]
    assert str((failed_handler.attributes or {})["code.function.name"]).endswith("book_payment")
    assert [event.name for event in failed_handler.events] == ["exception"]


# -- producers whose messages carry no trace attributes: the context is in the event ----------


def test_eventbridge_to_sqs_is_one_trace_from_the_request_to_the_worker(moto: Moto) -> None:
    """Found: an EventBridge rule's SQS message has no message attributes, and the worker read
    its span's parent from those alone: its ``process`` span began a new trace (no parent, no
    link), while the event it decoded carried the emit's context in the ``detail`` CloudEvent."""
    spans = Spans()
    queue_url = asyncio.run(create_queue(moto, "bridged"))
    event_bus = asyncio.run(bus_with_rule(moto, queue_url, {"detail-type": ["order.placed"]}))
    bus = EventBus()
    instrument_bus(bus, tracer_provider=spans.provider)
    bus.forward("order.*", eventbridge_forwarder(moto, event_bus))
    app = FastAPI()
    bus.install(app)

    @app.post("/orders")
    async def place(events: Annotated[EventBus, Depends(get_bus)]) -> None:
        events.emit("order.placed", {"id": 1})

    with instrumented(app, spans), TestClient(app) as client:
        client.post("/orders").raise_for_status()
    asyncio.run(consume(worker_bus(spans), moto.source(queue_url), spans))

    name = queue_url.rsplit("/", 1)[-1]
    server, emit = spans.one("POST /orders"), spans.one("emit order.placed")
    process = spans.one(f"process {name}")
    assert {tid(span) for span in spans.all} == {tid(server)}, "one trace end to end"
    assert parent_id(process) == sid(emit)
    assert linked_ids(process) == [sid(emit)]
    assert parent_id(spans.one("process order.placed")) == sid(process)


@pytest.mark.parametrize("broker", ["sqs", "pubsub"])
def test_a_structured_cloudevent_s_traceparent_member_is_the_worker_span_s_parent(
    broker: str, request: pytest.FixtureRequest
) -> None:
    """Found: a structured CloudEvent carrying ``traceparent`` as a member (the CloudEvents
    tracing extension; on Pub/Sub with ``Content-Type: application/cloudevents+json``) gave
    its event that context, but the worker's ``process`` span a new trace: the worker read
    the span's parent from the message attributes alone."""
    spans = Spans()
    with spans.provider.get_tracer("producer").start_as_current_span("send"):
        pass  # another producer's span: the event's traceparent
    cloudevent = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "/shop",
        "type": "order.placed",
        "data": {"id": 1},
        "traceparent": traceparent(spans.one("send")),
    }
    body = json.dumps(cloudevent)
    if broker == "sqs":
        moto: Moto = request.getfixturevalue("moto")
        queue_url = asyncio.run(create_queue(moto, "structured"))
        asyncio.run(send_body(moto, queue_url, body))
        source: Source = moto.source(queue_url)
        name = queue_url.rsplit("/", 1)[-1]
    else:
        emulator: Emulator = request.getfixturevalue("pubsub_emulator")
        channel = emulator.channel()
        message = {
            "data": base64.b64encode(body.encode()).decode(),
            "attributes": {"Content-Type": "application/cloudevents+json"},
        }
        url = emulator.rest(f"topics/{channel.topic.rsplit('/', 1)[-1]}:publish")
        httpx.post(url, json={"messages": [message]}).raise_for_status()
        source = PubSubSource(
            f"projects/{PROJECT}/subscriptions/{channel.subscription}",
            emulator_host=emulator.host,
        )
        name = channel.subscription
    asyncio.run(consume(worker_bus(spans), source, spans))

    process = spans.one(f"process {name}")
    assert parent_id(process) == sid(spans.one("send"))
    assert tid(process) == tid(spans.one("process order.placed")) == tid(spans.one("send"))


async def send_body(moto: Moto, queue_url: str, body: str) -> None:
    """Send *body* to *queue_url* as another producer would: no message attributes."""
    async with moto.client() as sqs:
        await sqs.send_message(QueueUrl=queue_url, MessageBody=body)


async def consume(bus: EventBus, source: Source, spans: Spans) -> None:
    """Run a worker until its one message is handled and acknowledged."""
    async with Worker(bus, source) as worker:
        await until(lambda: worker.stats.handled == 1, timeout=20)
        await until(lambda: [s for s in spans.all if s.name.startswith("ack ")])


# -- the worker's spans for messages that do not go well, with an in-memory source ---------


class AckFails(MemorySource):
    """A `MemorySource` whose acknowledgements fail."""

    async def ack(self, message: ReceivedMessage) -> None:
        raise SourceError("receipt handle expired")


def settled(source: MemorySource) -> tuple[list[str], list[str]]:
    """The ids of the messages *source* had acknowledged, and given back."""
    return (
        [message.message_id for message in source.acked],
        [message.message_id for message, _ in source.nacked],
    )


async def run_until_processed(bus: EventBus, source: MemorySource, spans: Spans) -> None:
    """Run a worker until its one message's span has ended (after settling it)."""
    async with Worker(bus, source):
        await until(lambda: spans.named("process inbox"))


@pytest.mark.anyio
async def test_an_undecodable_message_has_a_failed_span_of_its_own() -> None:
    spans = Spans()
    bus = EventBus()
    instrument_bus(bus, tracer_provider=spans.provider)
    source = MemorySource(name="inbox", max_deliveries=1)  # given back: dead, not redelivered
    source.put({"Body": "not json"}, message_id="m-1")
    await run_until_processed(bus, source, spans)
    assert settled(source) == ([], ["m-1"])
    process = spans.one("process inbox")
    assert process.parent is None  # no trace context to continue: a trace of its own
    assert is_error(process)
    assert process.status.description == "not an event"
    assert (process.attributes or {})[
        "error.type"
    ] == "fastapi_eventbus.exceptions.MessageDecodeError"
    assert (process.attributes or {})["messaging.system"] == "memory"
    assert [s.name for s in spans.children(process)] == ["nack inbox"]


@pytest.mark.anyio
async def test_a_failed_acknowledgement_fails_the_settle_span() -> None:
    spans = Spans()
    bus = EventBus()
    bus.on("order.placed")(lambda event: None)  # handled: the message is acknowledged
    instrument_bus(bus, tracer_provider=spans.provider)
    emitted = EventBus()
    instrument_bus(emitted, tracer_provider=spans.provider)
    recorder = RecordingForwarder()
    emitted.forward("*", recorder)
    event = await emitted.publish("order.placed")
    source = AckFails(name="inbox")
    source.put(recorder.events[0], message_id="m-2")
    for _ in range(2):  # two deliveries given back: the worker gets the third
        (delivery,) = await source.receive(1)
        await source.nack(delivery)
    await run_until_processed(bus, source, spans)
    process, ack = spans.one("process inbox"), spans.one("ack inbox")
    assert parent_id(process) == sid(spans.one("emit order.placed"))
    assert (process.attributes or {})["fastapi_eventbus.event.id"] == event.id
    assert (process.attributes or {})["fastapi_eventbus.message.receive_count"] == 3
    assert not is_error(process)  # the handlers succeeded; the broker will deliver it again
    assert parent_id(ack) == sid(process)
    assert ack.kind is SpanKind.CLIENT
    assert is_error(ack)
    assert [e.name for e in ack.events] == ["exception"]


@pytest.mark.anyio
async def test_a_message_cancelled_at_shutdown_has_a_failed_span_and_a_give_back() -> None:
    spans = Spans()
    bus = EventBus()
    instrument_bus(bus, tracer_provider=spans.provider)
    started = asyncio.Event()

    @bus.on("order.placed")
    async def slow(event: Event) -> None:
        started.set()
        await asyncio.sleep(3600)

    source = MemorySource(name="inbox", max_deliveries=1)  # given back: dead, not redelivered
    source.put(Event(name="order.placed"), message_id="m-3")
    async with Worker(bus, source, shutdown_timeout=0.05):
        await started.wait()
    assert settled(source) == ([], ["m-3"])
    process = spans.one("process inbox")
    assert is_error(process)
    assert process.status.description == "cancelled at shutdown; given back"
    assert (process.attributes or {})["error.type"] == "asyncio.exceptions.CancelledError"
    assert (process.attributes or {})["fastapi_eventbus.event.name"] == "order.placed"
    assert sorted((s.name, is_error(s)) for s in spans.children(process)) == [
        ("nack inbox", False),
        ("process order.placed", True),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("at", ["start", "end"])
@pytest.mark.parametrize("prefix", ["process inbox", "ack ", "nack ", "process order"])
async def test_a_span_processor_that_raises_changes_nothing_the_worker_does(
    caplog: pytest.LogCaptureFixture, prefix: str, at: str
) -> None:
    """Found: when the ``ack`` span could not start, the acknowledgement was never awaited,
    so a handled message came back and ran again until the broker dead-lettered it (a
    WARNING blamed the broker); when the message's ``process`` span could not start, no
    message was handled, and the stats counted no failure."""
    spans = Spans()
    spans.provider.add_span_processor(Breaking(prefix, at))
    bus = EventBus()
    instrument_bus(bus, tracer_provider=spans.provider)
    calls: list[str] = []

    @bus.on("order.*")
    async def flaky(event: Event) -> None:
        calls.append(event.name)
        if event.name == "order.paid" and calls.count("order.paid") == 1:
            raise RuntimeError("once")  # given back (nack), then handled

    source = MemorySource(name="inbox")
    source.put(Event(name="order.placed"), message_id="m-1")
    source.put(Event(name="order.paid"), message_id="m-2")
    with caplog.at_level(logging.WARNING, "fastapi_eventbus"):
        async with Worker(bus, source) as worker:
            await asyncio.wait_for(source.join(), 10)
    assert sorted(calls) == ["order.paid", "order.paid", "order.placed"]
    assert sorted(settled(source)[0]) == ["m-1", "m-2"]
    assert settled(source)[1] == ["m-2"]
    assert (worker.stats.handled, worker.stats.failed, worker.stats.settle_errors) == (2, 1, 0)
    assert any("tracing failed" in record.getMessage() for record in caplog.records)


@pytest.mark.anyio
async def test_an_abandoned_message_s_span_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found: a message whose handlers ran past their time allowance was given back (an
    ERROR), and when they ended, its ``process`` span ended with no error: a success."""
    monkeypatch.setattr(_deadline, "MIN_OVERTIME", 0.2)  # the allowance: 0.1 s + 0.2 s
    spans = Spans()
    bus = EventBus()
    instrument_bus(bus, tracer_provider=spans.provider)

    @bus.on("order.placed", timeout=0.1)
    async def stubborn(event: Event) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:  # ignores its time limit for a while
            await asyncio.sleep(0.5)

    source = MemorySource(Event(name="order.placed"), name="inbox", max_deliveries=1)
    async with Worker(bus, source, shutdown_timeout=3):
        await until(lambda: spans.named("process inbox"), timeout=5)
    process = spans.one("process inbox")
    assert is_error(process)
    assert "time allowance" in (process.status.description or "")
    assert settled(source)[0] == []  # given back, never acknowledged
