"""Test helpers: see what was emitted and handled without mocking anything.

```python
from fastapi_eventbus.testing import capture

def test_create_cat(client):
    with capture(bus) as events:
        client.post("/cats")
    assert events.names == ["cat.created"]
```

If a handler fails inside the block, leaving it raises `HandlerFailuresError`
listing the failed calls: a broken handler turns the test red without an
assertion. ``capture(bus, raise_failures=False)`` records failures in
`Capture.failures` instead, for tests about failures.

``capture(bus, handle=False)`` records what is emitted but runs no handler,
for testing an endpoint on its own. To swap the bus an endpoint receives,
override `get_bus` with another bus's `EventBus.dependency`:

    app.dependency_overrides[get_bus] = EventBus(disabled=True).dependency
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from ._bus import EventBus, observers_of
from ._events import Event
from .exceptions import HandlerFailuresError
from .forwarders import Forwarder

__all__ = ["Capture", "HandledEvent", "RecordingForwarder", "capture"]


@dataclass(frozen=True, slots=True)
class HandledEvent:
    """One handler call: the event, the handler's qualified name, and what it raised."""

    event: Event
    """The event the handler was called with."""
    handler: str
    """The handler's qualified name (``module.function``)."""
    error: BaseException | None
    """What the handler raised, or None if it returned."""


@dataclass(slots=True)
class Capture:
    """What a bus emitted and handled while a `capture` block was open."""

    mute: bool = False
    """When true, emitted events are recorded but not handled."""
    emitted: list[Event] = field(default_factory=list)
    """Every event accepted by ``emit``/``publish``, in order."""
    handled: list[HandledEvent] = field(default_factory=list)
    """Every handler call, in order, with its error if it raised."""

    @property
    def names(self) -> list[str]:
        """Names of the emitted events, in order."""
        return [event.name for event in self.emitted]

    @property
    def failures(self) -> list[HandledEvent]:
        """The handler calls that raised."""
        return [call for call in self.handled if call.error is not None]

    def handlers_for(self, name: str) -> list[str]:
        """Qualified names of the handlers that ran for events named *name*."""
        return [call.handler for call in self.handled if call.event.name == name]

    def on_emit(self, event: Event) -> None:
        """Called by the bus for every accepted event."""
        self.emitted.append(event)

    def on_handled(self, event: Event, handler: str, error: BaseException | None) -> None:
        """Called by the bus after every handler call."""
        self.handled.append(HandledEvent(event, handler, error))


@contextmanager
def capture(
    bus: EventBus, *, handle: bool = True, raise_failures: bool = True
) -> Iterator[Capture]:
    """Record what *bus* emits and handles inside the ``with`` block.

    With ``handle=False``, events are validated and recorded but no handler
    runs (and nothing is forwarded).

    Raises:
        HandlerFailuresError: On leaving the block, if a handler failed inside it
            (unless *raise_failures* is false, or the block raised already).
    """
    recorder = Capture(mute=not handle)
    observers = observers_of(bus)
    observers.append(recorder)
    try:
        yield recorder
    finally:
        observers.remove(recorder)
    if raise_failures and (failures := recorder.failures):
        raise HandlerFailuresError(_describe(failures), failures) from failures[0].error


def _describe(failures: list[HandledEvent]) -> str:
    lines = [
        f"- {call.handler} failed for event {call.event.name!r} (id={call.event.id}): "
        f"{type(call.error).__name__}: {call.error}"
        for call in failures
    ]
    return (
        f"{len(failures)} handler call(s) failed inside capture(); pass "
        "raise_failures=False to assert on Capture.failures instead:\n" + "\n".join(lines)
    )


class RecordingForwarder(Forwarder):
    """A forwarder that keeps what it is sent, for tests: ``bus.forward("*", recorder)``."""

    loop_bound = False  # nothing tied to an event loop: fine with a bare TestClient
    """Nothing here is tied to an event loop: it works with a bare ``TestClient(app)``."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name=name)
        self.batches: list[list[Event]] = []
        """Every `send` call's events, one list per call."""
        self.started = 0
        """How many times `start` ran."""
        self.closed = 0
        """How many times `close` ran."""

    @property
    def events(self) -> list[Event]:
        """Every event sent, in order."""
        return [event for batch in self.batches for event in batch]

    async def send(self, events: Sequence[Event]) -> None:
        """Record *events* as one batch."""
        self.batches.append(list(events))

    async def start(self) -> None:
        """Count starts."""
        self.started += 1

    async def close(self) -> None:
        """Count closes."""
        self.closed += 1
