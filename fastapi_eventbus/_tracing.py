"""What the bus and the worker call when tracing is on (see `fastapi_eventbus.otel`).

Nothing here imports OpenTelemetry: the core holds an object with these
methods, or ``None`` (tracing off: one attribute check per emit and handler).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ._events import Event

if TYPE_CHECKING:
    from .forwarders._base import DeliveryOutcome, Forwarder
    from .worker._source import ReceivedMessage, Source


@dataclass(slots=True)
class Consumed:
    """What the worker learnt about a message while its span was open."""

    event: Event | None = None
    """The decoded event (None: not decoded, or not an event)."""
    failure: str | None = None
    """Why the message was not acknowledged, if it was not."""
    error: BaseException | None = None
    """The exception behind *failure*, if there was one."""


class Tracing(Protocol):
    """Span hooks for the life of an event: emitted, handled, forwarded, consumed."""

    def emitted(self, event: Event) -> Callable[[BaseException | None], None] | None:
        """Start the span of the emit of *event*; write its W3C context into
        ``event.trace_context``.

        ``event.trace_context`` is the event's own fresh, empty dict at this point.
        Returns what ends the span (None: it could not start), which the core calls
        once the emit's checks are over (the forwarders' size checks, the spool's
        write, the outbox's join): with what refused the event, if one did, which
        fails the span (an event never accepted), else with None.
        """

    def start_handler(self, event: Event, handler: str, local: bool) -> Any:
        """Start the span of one handler call and make it current.

        *local*: the event was emitted in this process (a child of its emit);
        otherwise it came from a broker (`EventBus.handle`). Returns what
        `end_handler` takes.
        """

    def end_handler(self, token: Any, error: BaseException | None) -> None:
        """End a handler span, with *error* recorded if the handler raised."""

    async def deliver(
        self,
        forwarder: Forwarder,
        events: Sequence[Event],
        send: Callable[[Forwarder, Sequence[Event]], Awaitable[DeliveryOutcome]],
    ) -> DeliveryOutcome:
        """``send(forwarder, events)`` (the bus's delivery), inside a send span."""

    def consuming(
        self, source: Source, message: ReceivedMessage
    ) -> AbstractContextManager[Consumed]:
        """The span of a worker processing one received message (current inside).

        Its parent is the trace context the source reads, ``source.trace_context(message)``.
        The worker fills in the yielded `Consumed`; the span reports it at exit.
        """

    def settling(
        self, source: Source, message: ReceivedMessage, action: Literal["ack", "nack"]
    ) -> AbstractContextManager[None]:
        """The span of acknowledging (or giving back) one message."""
