"""Trace context across Google's Pub/Sub client libraries (issue 18, item 6).

Google's client libraries, with OpenTelemetry enabled, inject W3C trace context
as the message attributes ``googclient_traceparent`` and ``googclient_tracestate``
(``google.cloud.pubsub_v1.open_telemetry.context_propagation``: the W3C propagator's
keys with a ``googclient_`` prefix), and extract it from there. A message published
by such a client carries no ``traceparent``; a message published here must carry the
``googclient_`` copy for such a subscriber to continue the trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.forwarders.pubsub import PubSubForwarder
from fastapi_eventbus.otel import instrument_bus
from fastapi_eventbus.testing import MemorySource
from fastapi_eventbus.wire import (
    decode_message,
    message_size,
    message_trace_context,
    pubsub_attributes,
    pubsub_data,
    trace_attributes,
)
from fastapi_eventbus.worker import PubSubSource, ReceivedMessage, Worker
from tests._otel import Spans, parent_id, tid
from tests._support import until

PRODUCER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
PRODUCER_TRACE, PRODUCER_SPAN = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
OURS = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
EVENT = Event(name="order.placed", payload={"id": 7}, id="e-1", source="/shop")


def google_message(**trace: str) -> dict[str, Any]:
    """A binary-mode event as a Google-instrumented publisher sends it: no ``traceparent``."""
    attributes = {
        key: value
        for key, value in pubsub_attributes(EVENT).items()
        if key not in ("traceparent", "tracestate")
    }
    attributes.update({f"googclient_{key}": value for key, value in trace.items()})
    return {"data": pubsub_data(EVENT), "attributes": attributes}


def pubsub_source() -> PubSubSource:
    return PubSubSource("projects/shop/subscriptions/orders-worker", emulator_host="localhost:1")


# -- reading ----------------------------------------------------------------------------


def test_googclient_trace_context_is_read_when_traceparent_is_absent() -> None:
    message = google_message(traceparent=PRODUCER, tracestate="congo=t61rcWkgMzE")
    expected = {"traceparent": PRODUCER, "tracestate": "congo=t61rcWkgMzE"}
    assert message_trace_context(message) == expected
    assert message_trace_context({"ackId": "a", "message": message}) == expected
    assert decode_message(message).trace_context == expected
    source, received = pubsub_source(), ReceivedMessage(message, "m1", "r1")
    assert source.trace_context(received) == expected
    assert source.decode(received).trace_context == expected


def test_googclient_traceparent_alone() -> None:
    message = google_message(traceparent=PRODUCER)
    assert message_trace_context(message) == {"traceparent": PRODUCER}
    assert decode_message(message).trace_context == {"traceparent": PRODUCER}


def test_traceparent_takes_precedence_and_the_pairs_are_never_mixed() -> None:
    message = google_message(traceparent=PRODUCER, tracestate="google=1")
    message["attributes"]["traceparent"] = OURS
    assert message_trace_context(message) == {"traceparent": OURS}
    assert decode_message(message).trace_context == {"traceparent": OURS}
    message["attributes"]["tracestate"] = "ours=1"
    assert message_trace_context(message) == {"traceparent": OURS, "tracestate": "ours=1"}


def test_a_forged_googclient_traceparent_is_ignored() -> None:
    too_long = google_message(traceparent="0" * 257, tracestate="v=1")
    assert message_trace_context(too_long) == {}
    assert decode_message(too_long).trace_context == {}
    not_text: dict[str, Any] = google_message()
    not_text["attributes"]["googclient_traceparent"] = 7
    assert message_trace_context(not_text) == {}


def test_googclient_attributes_are_not_read_from_sqs() -> None:
    sqs = {
        "Body": "{}",
        "MessageAttributes": {
            "googclient_traceparent": {"DataType": "String", "StringValue": PRODUCER}
        },
    }
    assert message_trace_context(sqs) == {}


# -- writing ----------------------------------------------------------------------------


TRACED = Event(name="order.placed", trace_context={"traceparent": OURS, "tracestate": "v=1"})


def test_published_attributes_carry_the_googclient_copy() -> None:
    attributes = pubsub_attributes(TRACED)
    assert attributes["traceparent"] == attributes["googclient_traceparent"] == OURS
    assert attributes["tracestate"] == attributes["googclient_tracestate"] == "v=1"
    assert trace_attributes(TRACED) == {"traceparent": OURS, "tracestate": "v=1"}  # SQS: none
    untraced = pubsub_attributes(Event(name="x"))
    assert not [key for key in untraced if "trace" in key]


class GoogleGetter(Getter[Mapping[str, str]]):
    """What google-cloud-pubsub's ``OpenTelemetryContextGetter`` reads: ``googclient_`` + key."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get("googclient_" + key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


def test_a_google_instrumented_subscriber_continues_the_trace() -> None:
    context = TraceContextTextMapPropagator().extract(
        pubsub_attributes(TRACED), getter=GoogleGetter()
    )
    span = trace.get_current_span(context).get_span_context()
    assert span.is_valid
    assert span.is_remote
    assert span.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
    assert span.span_id == 0x00F067AA0BA902B7
    assert span.trace_state.to_header() == "v=1"


def test_message_size_checks_count_the_googclient_copy() -> None:
    forwarder = PubSubForwarder("projects/my-project/topics/orders", emulator_host="localhost:1")
    untraced = Event(name="order.placed", id="e", time=TRACED.time)
    traced = untraced.model_copy(update={"trace_context": dict(TRACED.trace_context)})
    extra = sum(
        len(f"{prefix}{key}") + len(value)
        for prefix in ("", "googclient_")
        for key, value in TRACED.trace_context.items()
    )
    assert forwarder.encoded_size(traced) == forwarder.encoded_size(untraced) + extra
    body = {"data": pubsub_data(traced), "attributes": pubsub_attributes(traced)}
    assert message_size(body) == forwarder.encoded_size(traced)


# -- a worker, with the real OpenTelemetry SDK -------------------------------------------


class MemoryPubSub(MemorySource):
    """A `MemorySource` that reads its messages as `PubSubSource` does."""

    pubsub = pubsub_source()

    def decode(self, message: ReceivedMessage) -> Event:
        return self.pubsub.decode(message)

    def trace_context(self, message: ReceivedMessage) -> dict[str, str]:
        return self.pubsub.trace_context(message)

    def message_size(self, message: ReceivedMessage) -> int:
        return self.pubsub.message_size(message)


@pytest.mark.anyio
@pytest.mark.parametrize("make_source", [MemorySource, MemoryPubSub], ids=["generic", "pubsub"])
async def test_a_worker_continues_a_googclient_trace(make_source: type[MemorySource]) -> None:
    spans = Spans()
    bus = EventBus()
    handled: list[int] = []

    @bus.on("order.placed")
    async def ship(event: Event) -> None:
        handled.append(trace.get_current_span().get_span_context().trace_id)

    instrument_bus(bus, tracer_provider=spans.provider)
    source = make_source(name="inbox")
    source.put(google_message(traceparent=PRODUCER), message_id="m-1")
    async with Worker(bus, source):
        await until(lambda: spans.named("process inbox"))
    process, handler = spans.one("process inbox"), spans.one("process order.placed")
    assert process.kind is SpanKind.CONSUMER
    assert tid(process) == tid(handler) == PRODUCER_TRACE
    assert parent_id(process) == PRODUCER_SPAN
    assert handled == [PRODUCER_TRACE]
    assert [m.message_id for m in source.acked] == ["m-1"]
