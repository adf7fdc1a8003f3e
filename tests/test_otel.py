"""OpenTelemetry: emit and handler spans in the request's trace, with the real SDK.

The forwarder (send) spans are here with a recording forwarder; the whole path
through a real queue and a worker is in ``tests/worker/test_tracing.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import SpanKind, StatusCode

from fastapi_eventbus import ConfigurationError, Event, EventBus, InvalidEventError, get_bus
from fastapi_eventbus.exceptions import SpoolError
from fastapi_eventbus.forwarders import Delivery, Forwarder, Retry
from fastapi_eventbus.otel import (
    MESSAGING_SYSTEM,
    instrument_bus,
    is_instrumented,
    uninstrument_bus,
)
from fastapi_eventbus.spool import Spool
from fastapi_eventbus.testing import RecordingForwarder, capture
from fastapi_eventbus.wire import sqs_body
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

pytestmark = pytest.mark.anyio

HAS_NATIVE_TELEMETRY = importlib.util.find_spec("fastapi.telemetry") is not None

Bus = Annotated[EventBus, Depends(get_bus)]


@pytest.fixture
def spans() -> Spans:
    return Spans()


def number() -> int:
    return 7


def shop(bus: EventBus, seen: list[tuple[str, int]], app: FastAPI | None = None) -> FastAPI:
    """``POST /orders`` emits two events; each has a handler with a ``Depends``; one fails."""
    app = app or FastAPI()
    bus.install(app)

    @bus.on("order.placed")
    async def reserve_stock(event: Event, n: Annotated[int, Depends(number)]) -> None:
        seen.append((event.name, n))

    @bus.on("order.paid")
    def send_receipt(event: Event, n: Annotated[int, Depends(number)]) -> None:
        seen.append((event.name, n))
        raise RuntimeError("mail server down")

    @app.post("/orders")
    async def place(events: Bus) -> dict[str, str]:
        placed = events.emit("order.placed", {"id": 1})
        events.emit("order.paid", {"id": 1})
        return {"id": placed.id}

    return app


def check_request_trace(spans: Spans, server: ReadableSpan, seen: list[tuple[str, int]]) -> None:
    """The shop's trace: emits under the request, each handler under its emit, after it."""
    assert seen == [("order.placed", 7), ("order.paid", 7)]
    placed, paid = spans.one("emit order.placed"), spans.one("emit order.paid")
    reserve, receipt = spans.one("process order.placed"), spans.one("process order.paid")
    for span in (placed, paid, reserve, receipt):
        assert tid(span) == tid(server), span.name
    assert placed.kind is paid.kind is SpanKind.PRODUCER
    assert reserve.kind is receipt.kind is SpanKind.CONSUMER
    assert parent_id(reserve) == sid(placed)
    assert linked_ids(reserve) == [sid(placed)]
    assert parent_id(receipt) == sid(paid)
    assert linked_ids(receipt) == [sid(paid)]
    # Handled after the response: the server span had ended before the handlers began.
    assert server.end_time is not None
    assert reserve.start_time is not None
    assert server.end_time <= reserve.start_time
    assert placed.attributes == {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.name": "emit",
        "messaging.operation.type": "create",
        "messaging.destination.name": "order.placed",
        "messaging.message.id": placed.attributes and placed.attributes["messaging.message.id"],
    }
    assert dict(reserve.attributes or {}) == {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": "order.placed",
        "messaging.message.id": (placed.attributes or {})["messaging.message.id"],
        "code.function.name": "tests.test_otel.shop.<locals>.reserve_stock",
    }
    assert reserve.status.status_code is StatusCode.UNSET
    assert is_error(receipt)
    assert receipt.status.description == "RuntimeError: mail server down"
    assert (receipt.attributes or {})["error.type"] == "RuntimeError"
    (exception,) = receipt.events
    assert exception.name == "exception"
    assert (exception.attributes or {})["exception.message"] == "mail server down"


def test_with_fastapi_instrumentor(spans: Spans) -> None:
    bus, seen = EventBus(), list[tuple[str, int]]()
    instrument_bus(bus, tracer_provider=spans.provider)
    app = shop(bus, seen)
    with instrumented(app, spans), TestClient(app) as client:
        event_id = client.post("/orders").json()["id"]
    server = spans.one("POST /orders")
    assert server.kind is SpanKind.SERVER
    check_request_trace(spans, server, seen)
    placed = spans.one("emit order.placed")
    assert parent_id(placed) == sid(server)
    assert (placed.attributes or {})["messaging.message.id"] == event_id


@pytest.mark.skipif(not HAS_NATIVE_TELEMETRY, reason="this FastAPI has no built-in telemetry")
def test_with_fastapis_built_in_telemetry(spans: Spans) -> None:
    bus, seen = EventBus(), list[tuple[str, int]]()
    instrument_bus(bus, tracer_provider=spans.provider)
    native = FastAPI(telemetry={"tracer_provider": spans.provider})  # type: ignore[call-arg,unused-ignore]
    app = shop(bus, seen, native)
    with TestClient(app) as client:
        client.post("/orders")
    server = spans.one("POST /orders")
    assert server.kind is SpanKind.SERVER
    check_request_trace(spans, server, seen)
    # FastAPI runs the flush inside its background-task span; handlers still hang off their emit.
    background = [s for s in spans.all if s.name == "fastapi.background_task"]
    assert background
    assert all(parent_id(s) == sid(server) for s in background)
    endpoint = spans.one("fastapi.endpoint")
    assert parent_id(spans.one("emit order.placed")) == sid(endpoint)


def test_chained_events_stay_in_the_trace(spans: Spans) -> None:
    bus = EventBus()
    instrument_bus(bus, tracer_provider=spans.provider)
    app = FastAPI()
    bus.install(app)

    @bus.on("order.placed")
    async def bill(event: Event, events: Bus) -> None:
        events.emit("invoice.created", {"for": event.id})

    @bus.on("invoice.created")
    async def archive(event: Event) -> None:
        pass

    @app.post("/orders")
    async def place(events: Bus) -> None:
        events.emit("order.placed")

    with instrumented(app, spans), TestClient(app) as client:
        client.post("/orders")
    server, bill_span = spans.one("POST /orders"), spans.one("process order.placed")
    chained_emit = spans.one("emit invoice.created")
    archive_span = spans.one("process invoice.created")
    assert parent_id(chained_emit) == sid(bill_span)
    assert parent_id(archive_span) == sid(chained_emit)
    assert {tid(s) for s in spans.all} == {tid(server)}


async def test_publish_without_a_request(spans: Spans) -> None:
    bus = EventBus()
    instrument_bus(bus, tracer_provider=spans.provider)
    handled: list[str] = []

    @bus.on("report.*")
    async def note(event: Event) -> None:
        handled.append(event.trace_context["traceparent"])

    tracer = spans.provider.get_tracer("script")
    with tracer.start_as_current_span("nightly job") as job:
        event = await bus.publish("report.ready")
    emit, process = spans.one("emit report.ready"), spans.one("process report.ready")
    assert parent_id(emit) == job.get_span_context().span_id
    assert parent_id(process) == sid(emit)
    assert handled == [traceparent(emit)] == [event.trace_context["traceparent"]]
    # With no current span, the emit starts a trace of its own.
    await bus.publish("report.late")
    assert parent_id(spans.one("emit report.late")) is None
    assert parent_id(spans.one("process report.late")) == sid(spans.one("emit report.late"))


async def test_handle_of_a_received_event_continues_its_trace(spans: Spans) -> None:
    bus = EventBus()
    instrument_bus(bus, tracer_provider=spans.provider)

    @bus.on("order.placed")
    async def ship(event: Event) -> None:
        pass

    # An event as a worker decodes it: the producer's context in its trace_context.
    producer = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    received = Event(name="order.placed", trace_context={"traceparent": producer})
    assert await bus.handle(received) == []
    alone = spans.one("process order.placed")
    assert alone.kind is SpanKind.CONSUMER
    assert tid(alone) == 0x0AF7651916CD43DD8448EB211C80319C
    assert parent_id(alone) == 0xB7AD6B7169203331
    assert linked_ids(alone) == [0xB7AD6B7169203331]
    assert alone.parent is not None
    assert alone.parent.is_remote
    spans.exporter.clear()
    # Inside a consumer's span (the worker's), handlers are steps of it.
    with spans.provider.get_tracer("worker").start_as_current_span("process orders") as outer:
        await bus.handle(received)
    step = spans.one("process order.placed")
    assert step.kind is SpanKind.INTERNAL
    assert parent_id(step) == outer.get_span_context().span_id


async def test_forwarded_events_carry_their_emit_context(spans: Spans) -> None:
    bus = EventBus()
    instrument_bus(bus, tracer_provider=spans.provider)
    recorder = RecordingForwarder(name="orders")
    bus.forward("order.*", recorder)
    app = FastAPI()
    bus.install(app)

    @app.post("/orders")
    async def place(events: Bus) -> None:
        events.emit("order.placed", {"id": 1})
        events.emit("order.paid", {"id": 1})

    with instrumented(app, spans), TestClient(app) as client:
        client.post("/orders")
    placed, paid = spans.one("emit order.placed"), spans.one("emit order.paid")
    send = spans.one("send orders")
    assert send.kind is SpanKind.PRODUCER
    assert tid(send) == tid(spans.one("POST /orders"))
    assert parent_id(send) == sid(placed)
    assert linked_ids(send) == [sid(placed), sid(paid)]
    assert dict(send.attributes or {}) == {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.destination.name": "orders",
        "messaging.batch.message_count": 2,
    }
    assert [e.trace_context for e in recorder.events] == [
        {"traceparent": traceparent(placed)},
        {"traceparent": traceparent(paid)},
    ]
    body = sqs_body(recorder.events[0])
    assert "traceparent" not in body
    assert traceparent(placed) not in body


class Sized(Forwarder):
    """A broker whose messages carry the trace context as attributes, counted in their size."""

    def __init__(self, limit: int) -> None:
        super().__init__(name="sized", max_message_bytes=limit)
        self.sent: list[Event] = []

    def encoded_size(self, event: Event) -> int:
        trace = sum(len(key) + len(value) for key, value in event.trace_context.items())
        return len(event.payload) + trace

    async def send(self, events: Sequence[Event]) -> None:
        self.sent.extend(events)


async def test_the_emit_time_size_check_counts_the_trace_context(spans: Spans) -> None:
    """Found: the check ran before tracing gave the event its ``traceparent``: an event that
    fits only without it passed ``emit``, and the broker refused it after the response."""
    untraced, traced = EventBus(), EventBus()
    instrument_bus(traced, tracer_provider=spans.provider)
    plain, attributed = Sized(100), Sized(100)
    untraced.forward("x", plain)
    traced.forward("x", attributed)
    await untraced.publish("x", "p" * 90)  # 90 bytes: fits
    with pytest.raises(InvalidEventError, match="would be a 156-byte message, over the 100"):
        await traced.publish("x", "p" * 90)  # and a 66-byte traceparent attribute
    await traced.publish("x", "p" * 30)
    assert [attributed.encoded_size(event) for event in attributed.sent] == [96]
    assert [plain.encoded_size(event) for event in plain.sent] == [90]


class FullSpool(Spool):
    """A spool on a full disk until *full* is cleared: its writes are refused."""

    full = True

    def add(self, entries: Iterable[tuple[str, Event]]) -> None:
        if self.full:
            raise SpoolError("cannot write to the spool: database or disk is full")
        super().add(entries)


@pytest.mark.parametrize("refusal", ["size", "spool"])
async def test_an_emit_refused_at_emit_has_a_failed_span(
    spans: Spans, refusal: str, tmp_path: Path
) -> None:
    """Found: an event refused at ``emit`` (a payload over a forwarder's size limit, a spool
    write that failed) raised to the caller, and its ``emit`` span ended with no error and the
    event's id: the record of a success, for an event that was never accepted."""
    error: type[Exception]
    if refusal == "size":
        bus, big, error = EventBus(), "p" * 200, InvalidEventError
        bus.forward("x", Sized(100))
    else:
        spool = FullSpool(tmp_path / "spool.sqlite3")
        bus, big, error = EventBus(spool=spool), "p", SpoolError
        bus.forward("x", RecordingForwarder(name="recorder"))
    instrument_bus(bus, tracer_provider=spans.provider)
    with pytest.raises(error):
        await bus.publish("x", big)
    (refused,) = spans.named("emit x")
    assert is_error(refused)
    assert (refused.attributes or {})["error.type"] == f"{error.__module__}.{error.__name__}"
    assert [event.name for event in refused.events] == ["exception"]
    if refusal == "spool":
        spool.full = False
    await bus.publish("x", "p")
    accepted = spans.named("emit x")[1]
    assert not is_error(accepted)
    assert accepted.end_time is not None


async def test_a_handler_that_swallows_its_flush_s_cancellation_has_a_failed_span(
    spans: Spans,
) -> None:
    """Found: a handler that caught its flush's cancellation and returned was reported cut
    off (``capture`` heard a `CancelledError`; an inbox records no success), while its span
    ended with no error: a success."""
    bus = EventBus()
    instrument_bus(bus, tracer_provider=spans.provider)
    started = asyncio.Event()

    @bus.on("job")
    async def stubborn(event: Event) -> None:
        started.set()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed
            await asyncio.sleep(10)

    with capture(bus, raise_failures=False) as captured:
        task = asyncio.create_task(bus.publish("job"))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [type(handled.error) for handled in captured.handled] == [asyncio.CancelledError]
    span = spans.one("process job")
    assert is_error(span)
    assert (span.attributes or {})["error.type"] == "asyncio.exceptions.CancelledError"


class Refusing(Forwarder):
    messaging_system = "webhook"

    async def send(self, events: object) -> Delivery:
        return Delivery(rejected=list(events), reason="410 Gone")  # type: ignore[call-overload]


async def test_a_dead_lettered_send_has_error_status(spans: Spans) -> None:
    bus = EventBus()
    instrument_bus(bus, tracer_provider=spans.provider)
    bus.forward("order.*", Refusing(name="hooks", retry=Retry(attempts=1)))
    await bus.publish("order.placed")
    send = spans.one("send hooks")
    assert is_error(send)
    assert send.status.description == "1 of 1 event(s) dead-lettered"
    assert (send.attributes or {})["messaging.system"] == "webhook"
    assert (send.attributes or {})["fastapi_eventbus.dead_lettered"] == 1
    assert (send.attributes or {})["messaging.message.id"]


async def test_an_unsampled_request_records_nothing_but_passes_the_decision_on() -> None:
    spans = Spans(sampler=ParentBased(ALWAYS_OFF))
    bus = EventBus()
    instrument_bus(bus, tracer_provider=spans.provider)
    handled: list[str] = []

    @bus.on("order.*")
    async def ship(event: Event) -> None:
        handled.append(event.name)

    event = await bus.publish("order.placed")
    assert handled == ["order.placed"]
    assert spans.all == []
    flags = int(event.trace_context["traceparent"].rsplit("-", 1)[1], 16)
    assert flags & 0x01 == 0  # not sampled: the decision travels downstream too


async def test_instrumenting_can_be_undone_and_checks_its_argument(spans: Spans) -> None:
    bus = EventBus()
    assert not is_instrumented(bus)
    instrument_bus(bus, tracer_provider=spans.provider)
    assert is_instrumented(bus)
    uninstrument_bus(bus)
    assert not is_instrumented(bus)
    event = await bus.publish("order.placed")
    assert event.trace_context == {}
    assert spans.all == []
    with pytest.raises(ConfigurationError, match="takes an EventBus"):
        instrument_bus(FastAPI())  # type: ignore[arg-type]


def test_a_request_bus_cannot_be_instrumented(spans: Spans) -> None:
    bus = EventBus()
    app = FastAPI()
    bus.install(app)
    errors: list[str] = []

    @app.get("/")
    async def index(events: Bus) -> None:
        try:
            instrument_bus(events)
        except ConfigurationError as exc:
            errors.append(str(exc))

    with TestClient(app) as client:
        client.get("/")
    assert errors == ["instrument_bus() needs the application bus, not a request's (from get_bus)"]


def test_an_uninstrumented_bus_adds_nothing_to_an_instrumented_app(spans: Spans) -> None:
    bus, seen = EventBus(), list[tuple[str, int]]()
    app = shop(bus, seen)
    forwarded = RecordingForwarder()
    bus.forward("order.*", forwarded)
    with instrumented(app, spans), TestClient(app) as client:
        client.post("/orders")
    assert len(seen) == 2
    assert not [s for s in spans.all if s.name.startswith(("emit ", "process ", "send "))]
    assert [e.trace_context for e in forwarded.events] == [{}, {}]


def test_importing_the_package_does_not_import_the_tracing_module() -> None:
    code = (
        "import sys, fastapi_eventbus, fastapi_eventbus.worker, fastapi_eventbus.forwarders;"
        "sys.exit('fastapi_eventbus.otel' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_missing_extra_is_named() -> None:
    # FastAPI may import opentelemetry itself: hide a module only the tracing module needs.
    code = (
        "import sys, fastapi_eventbus\n"
        "sys.modules['opentelemetry.trace.propagation.tracecontext'] = None\n"
        "try:\n"
        "    import fastapi_eventbus.otel\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "pip install 'fastapi-eventbus-di[otel]'" in out.stdout, out.stderr


def current_span_id() -> int:
    return trace.get_current_span().get_span_context().span_id


async def test_spans_a_handler_starts_are_its_children_sync_or_async(spans: Spans) -> None:
    bus = EventBus()
    instrument_bus(bus, tracer_provider=spans.provider)
    tracer = spans.provider.get_tracer("app")
    dependency_saw: list[int] = []

    @bus.on("order.placed")
    async def in_the_loop(event: Event, span_id: Annotated[int, Depends(current_span_id)]) -> None:
        dependency_saw.append(span_id)
        with tracer.start_as_current_span("async work"):
            pass

    @bus.on("order.placed")
    def in_a_thread(event: Event) -> None:
        with tracer.start_as_current_span("sync work"):
            pass

    await bus.publish("order.placed")
    first, second = spans.named("process order.placed")
    assert (first.attributes or {})["code.function.name"] == (
        "tests.test_otel.test_spans_a_handler_starts_are_its_children_sync_or_async"
        ".<locals>.in_the_loop"
    )
    assert dependency_saw == [sid(first)]  # dependencies run inside the handler's span
    assert parent_id(spans.one("async work")) == sid(first)
    assert parent_id(spans.one("sync work")) == sid(second)


@pytest.mark.parametrize("at", ["start", "end"])
@pytest.mark.parametrize("prefix", ["emit ", "process ", "send "])
def test_a_span_processor_that_raises_changes_nothing_the_bus_does(
    spans: Spans, caplog: pytest.LogCaptureFixture, prefix: str, at: str
) -> None:
    """Found: a span that could not start or end changed what the bus did. At ``send``, the
    forwarder never ran, and the events were lost with no log line or hook (with a spool, kept
    and never counted as an attempt). At ``process``, no handler of the batch ran, or the
    handler after the span's was skipped and the event it chained left pending, all reported as
    "the flush was cancelled". At ``emit``, the request failed with a 500."""
    spans.provider.add_span_processor(Breaking(prefix, at))
    reports: list[object] = []
    bus = EventBus(on_error=reports.append, on_discard=reports.append)
    instrument_bus(bus, tracer_provider=spans.provider)
    recorder = RecordingForwarder(name="orders")
    bus.forward("order.*", recorder)
    ran: list[tuple[str, str]] = []

    @bus.on("order.*")
    async def first(event: Event, events: Bus) -> None:
        ran.append(("first", event.name))
        events.emit("mail.send", {"to": event.payload["id"]})

    @bus.on("order.*", "mail.send")
    def second(event: Event) -> None:
        ran.append(("second", event.name))

    app = FastAPI()
    bus.install(app)

    @app.post("/orders")
    async def place(events: Bus) -> list[str]:
        return [events.emit(name, {"id": 1}).id for name in ("order.placed", "order.paid")]

    with caplog.at_level(logging.WARNING, "fastapi_eventbus"), TestClient(app) as client:
        response = client.post("/orders")
    assert response.status_code == 200
    assert [event.id for event in recorder.events] == response.json()
    handled = [("first", "order.placed"), ("first", "order.paid"), ("second", "order.placed")]
    handled += [("second", "order.paid"), ("second", "mail.send"), ("second", "mail.send")]
    assert sorted(ran) == sorted(handled)
    assert reports == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    warned = [r.getMessage() for r in caplog.records if "tracing failed" in r.getMessage()]
    assert warned
    assert f"span processor broke {at}ing '{prefix}" in warned[0]
