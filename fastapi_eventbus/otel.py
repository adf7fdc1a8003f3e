"""OpenTelemetry tracing for the bus (extra ``otel``): one trace from the request to the worker.

```python
from fastapi_eventbus.otel import instrument_bus

instrument_bus(bus)  # the global tracer provider, or tracer_provider=...
```

Spans follow the OpenTelemetry messaging semantic conventions:

- ``emit <event>`` (PRODUCER, ``create``): one per emitted or published event,
  in the caller's trace (the request's). Its context becomes the event's
  ``trace_context``: forwarders put it in the message attributes
  ``traceparent``/``tracestate``, never in the payload.
- ``process <event>`` (CONSUMER, ``process``): one per local handler call, a
  child of the event's emit span even though the request's server span ended
  before handlers ran, with a link to it. A handler run by
  `EventBus.handle` inside a current span (the worker's) is an INTERNAL child
  of that span instead. Events a handler emits are children of its span.
- ``send <queue or topic>`` (PRODUCER, ``send``): one per forwarder delivery
  (a flush's matching events, retries included), a child of the first event's
  emit span, linked to every event's emit span.
- In the worker, ``process <queue or subscription>`` (CONSUMER): one per
  received message, a child of the message's emit span (so the trace goes on
  from the request), linked to it too; handlers are INTERNAL children; ``ack``
  / ``nack`` (CLIENT, ``settle``) spans for acknowledging or giving it back.

Nothing here is imported by ``import fastapi_eventbus``; without
`instrument_bus` the bus makes no tracing calls at all.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from ._bus import EventBus, is_request_bus, set_tracing, tracing_of
from ._events import set_trace_context
from ._tracing import Consumed
from .exceptions import ConfigurationError, MissingExtraError

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import (
        Link,
        Span,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
        TraceState,
    )
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - the extra is installed in the test environment
    raise MissingExtraError("otel", "opentelemetry-api") from exc

if TYPE_CHECKING:
    from collections.abc import Mapping

    from opentelemetry.context import Context
    from opentelemetry.util.types import AttributeValue

    from ._events import Event
    from .forwarders._base import DeliveryOutcome, Forwarder
    from .worker._source import ReceivedMessage, Source

__all__ = ["MESSAGING_SYSTEM", "instrument_bus", "is_instrumented", "uninstrument_bus"]

MESSAGING_SYSTEM = "fastapi_eventbus"
"""``messaging.system`` of the spans of in-process delivery (emit, local handlers)."""

_PROPAGATOR = TraceContextTextMapPropagator()

logger = logging.getLogger("fastapi_eventbus.otel")


def instrument_bus(bus: EventBus, *, tracer_provider: trace.TracerProvider | None = None) -> None:
    """Trace *bus*: emits, local handlers, forwarder sends and worker steps.

    Call it once where the bus is created (a worker that imports the app gets it
    too). *tracer_provider* defaults to the global one (``trace.set_tracer_provider``),
    looked up when spans start, so the order of setup does not matter. Calling it
    again replaces the provider.
    """
    if not isinstance(bus, EventBus):
        raise ConfigurationError(f"instrument_bus() takes an EventBus, got {bus!r}")
    if is_request_bus(bus):
        raise ConfigurationError(
            "instrument_bus() needs the application bus, not a request's (from get_bus)"
        )
    from . import __version__

    tracer = trace.get_tracer("fastapi_eventbus", __version__, tracer_provider)
    set_tracing(bus, _BusTracing(tracer))


def uninstrument_bus(bus: EventBus) -> None:
    """Stop tracing *bus* (no-op if it was not instrumented)."""
    set_tracing(bus, None)


def is_instrumented(bus: EventBus) -> bool:
    """Whether `instrument_bus` is in effect for *bus*."""
    return isinstance(tracing_of(bus), _BusTracing)


def _creation_context(trace_context: Mapping[str, str], *, remote: bool) -> SpanContext | None:
    """The emit span's context carried by an event or message, if valid.

    A remote context (from a broker: untrusted) goes through the W3C propagator's
    checks; a local one was written by `_BusTracing.emitted` in this process, so
    it is only split, which is several times cheaper.
    """
    if remote:
        if not trace_context:
            return None
        extracted = trace.get_current_span(_PROPAGATOR.extract(trace_context)).get_span_context()
        return extracted if extracted.is_valid else None
    header = trace_context.get("traceparent")
    if header is None:
        return None
    try:
        _, trace_id, span_id, flags = header.split("-")
        parsed = int(trace_id, 16), int(span_id, 16), TraceFlags(int(flags, 16))
    except ValueError:
        return None
    state = trace_context.get("tracestate")
    return SpanContext(  # emitted in this process: a local parent, as samplers expect
        parsed[0],
        parsed[1],
        is_remote=False,
        trace_flags=parsed[2],
        trace_state=TraceState.from_header([state]) if state else None,
    )


def _as_parent(span_context: SpanContext | None) -> Context | None:
    if span_context is None:
        return None
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context))


def _error_type(error: BaseException) -> str:
    cls = type(error)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _fail(
    span: Span, error: BaseException | None, description: str | None = None, record: bool = True
) -> None:
    """Mark *span* failed: ``error.type``, ERROR status, and (*record*) the exception event."""
    if error is not None:
        if record:
            span.record_exception(error)
        span.set_attribute("error.type", _error_type(error))
        description = description or f"{type(error).__name__}: {error}"
    else:
        span.set_attribute("error.type", "_OTHER")
    span.set_status(Status(StatusCode.ERROR, description))


class _BusTracing:
    """The `fastapi_eventbus._tracing.Tracing` hooks, on one tracer."""

    __slots__ = ("_logged", "_tracer")

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._logged: dict[str, float] = {}

    def _failed(self, step: str, error: Exception) -> None:
        """A span of *step* could not start or end: a span processor, exporter or sampler
        raised (the SDK does not catch them). The bus goes on untraced there, as tracing is
        never a reason for an event not to be handled or sent: a WARNING at most once a
        minute per step."""
        now = time.monotonic()
        if now - self._logged.get(step, -math.inf) >= 60.0:
            self._logged[step] = now
            logger.warning(
                "tracing failed at the %s span (%r): going on without it (logged once a minute)",
                step,
                error,
                exc_info=error,
            )

    def _end(self, span: Span, step: str) -> None:
        try:
            span.end()
        except Exception as exc:
            self._failed(step, exc)

    # -- in-process ---------------------------------------------------------------

    def emitted(self, event: Event) -> Callable[[BaseException | None], None] | None:
        try:
            return self._emitted(event)
        except Exception as exc:  # the event goes on untraced
            self._failed("emit", exc)
            return None

    def _emitted(self, event: Event) -> Callable[[BaseException | None], None]:
        span = self._tracer.start_span(
            f"emit {event.name}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": MESSAGING_SYSTEM,
                "messaging.operation.name": "emit",
                "messaging.operation.type": "create",
                "messaging.destination.name": event.name,
                "messaging.message.id": event.id,
            },
        )
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
        if carrier:  # before anyone sees the event (see Tracing.emitted)
            set_trace_context(event, carrier)

        def done(error: BaseException | None) -> None:
            """End the span after the emit's checks; failed if one refused the event."""
            if error is not None:
                try:
                    _fail(span, error)
                except Exception as exc:
                    self._failed("emit", exc)
            self._end(span, "emit")

        return done

    def start_handler(self, event: Event, handler: str, local: bool) -> Any:
        try:
            return self._start_handler(event, handler, local)
        except Exception as exc:  # the handler runs untraced
            self._failed("process", exc)
            return None

    def _start_handler(self, event: Event, handler: str, local: bool) -> Any:
        creation = _creation_context(event.trace_context, remote=not local)
        attributes: dict[str, AttributeValue] = {
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.destination.name": event.name,
            "messaging.message.id": event.id,
            "code.function.name": handler,
        }
        links = [Link(creation)] if creation is not None else None
        if not local and trace.get_current_span().get_span_context().is_valid:
            # EventBus.handle inside a span (the worker's consumer span): a step of it,
            # still linked to where the event was emitted.
            span = self._tracer.start_span(
                f"process {event.name}", kind=SpanKind.INTERNAL, attributes=attributes, links=links
            )
        else:
            span = self._tracer.start_span(
                f"process {event.name}",
                context=_as_parent(creation),
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                links=links,
            )
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token

    def end_handler(self, token: Any, error: BaseException | None) -> None:
        if token is None:  # its span could not start
            return
        span, context_token = token
        otel_context.detach(context_token)
        try:
            if error is not None:
                _fail(span, error)
        except Exception as exc:
            self._failed("process", exc)
        self._end(span, "process")

    async def deliver(
        self,
        forwarder: Forwarder,
        events: Sequence[Event],
        send: Callable[[Forwarder, Sequence[Event]], Awaitable[DeliveryOutcome]],
    ) -> DeliveryOutcome:
        creations = [
            context
            for event in events
            if (context := _creation_context(event.trace_context, remote=False)) is not None
        ]
        attributes: dict[str, AttributeValue] = {
            "messaging.system": forwarder.messaging_system,
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            "messaging.destination.name": forwarder.destination,
            "messaging.batch.message_count": len(events),
        }
        if len(events) == 1:
            attributes["messaging.message.id"] = events[0].id
        try:
            span = self._tracer.start_span(
                f"send {forwarder.destination}",
                context=_as_parent(creations[0] if creations else None),
                kind=SpanKind.PRODUCER,
                attributes=attributes,
                links=[Link(context) for context in creations],
            )
        except Exception as exc:  # sent untraced
            self._failed("send", exc)
            return await send(forwarder, events)
        context_token = otel_context.attach(trace.set_span_in_context(span))
        try:
            outcome = await send(forwarder, events)
        except BaseException as exc:  # the bus's delivery raises nothing but a cancellation
            _fail(span, exc)
            raise
        else:
            if outcome.dead:
                span.set_attribute("fastapi_eventbus.dead_lettered", len(outcome.dead))
            if outcome.unsent:
                span.set_attribute("fastapi_eventbus.spooled", len(outcome.unsent))
            if outcome.lost:
                what = "dead-lettered" if not outcome.unsent else "not delivered"
                _fail(span, None, f"{outcome.lost} of {len(events)} event(s) {what}")
        finally:
            otel_context.detach(context_token)
            self._end(span, "send")
        return outcome

    # -- worker -------------------------------------------------------------------

    @contextmanager
    def consuming(self, source: Source, message: ReceivedMessage) -> Iterator[Consumed]:
        consumed = Consumed()
        try:
            span = self._consumer_span(source, message)
        except Exception as exc:  # processed untraced
            self._failed("process", exc)
            yield consumed
            return
        context_token = otel_context.attach(trace.set_span_in_context(span))
        raised = False
        try:
            yield consumed
        except BaseException as exc:  # cancelled at shutdown, or a bug
            raised = True
            if consumed.failure is None:
                consumed.failure, consumed.error = f"{type(exc).__name__}: {exc}", exc
            raise
        finally:
            otel_context.detach(context_token)
            if consumed.event is not None:
                span.set_attribute("fastapi_eventbus.event.name", consumed.event.name)
                span.set_attribute("fastapi_eventbus.event.id", consumed.event.id)
            if consumed.failure is not None:
                # A handler's exception is already on the handler's span.
                record = raised or consumed.event is None
                _fail(span, consumed.error, consumed.failure, record)
            self._end(span, "process")

    def _consumer_span(self, source: Source, message: ReceivedMessage) -> Span:
        creation = _creation_context(source.trace_context(message), remote=True)
        attributes: dict[str, AttributeValue] = {
            "messaging.system": source.messaging_system,
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            source.destination_attribute: source.name,
            "messaging.message.id": message.message_id,
        }
        if message.receive_count is not None:
            attributes["fastapi_eventbus.message.receive_count"] = message.receive_count
        return self._tracer.start_span(
            f"process {source.name}",
            context=_as_parent(creation),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=[Link(creation)] if creation is not None else None,
        )

    @contextmanager
    def settling(
        self, source: Source, message: ReceivedMessage, action: Literal["ack", "nack"]
    ) -> Iterator[None]:
        try:
            span = self._tracer.start_span(
                f"{action} {source.name}",
                kind=SpanKind.CLIENT,
                attributes={
                    "messaging.system": source.messaging_system,
                    "messaging.operation.name": action,
                    "messaging.operation.type": "settle",
                    source.destination_attribute: source.name,
                    "messaging.message.id": message.message_id,
                },
            )
        except Exception as exc:  # settled untraced
            self._failed(action, exc)
            yield
            return
        context_token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield
        except BaseException as exc:
            _fail(span, exc)
            raise
        finally:
            otel_context.detach(context_token)
            self._end(span, action)
