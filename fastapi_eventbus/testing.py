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

`RecordingForwarder` keeps what a bus forwards; `MemorySource` is a queue a
`Worker` receives from, to test a worker's handlers without a broker.
"""

from __future__ import annotations

import asyncio
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import wire
from ._bus import EventBus, in_flight, observers_of
from ._events import Event
from ._settings import check_seconds
from .exceptions import ConfigurationError, HandlerFailuresError, SourceError
from .forwarders import Forwarder
from .worker import ReceivedMessage, Source

__all__ = ["Capture", "HandledEvent", "MemorySource", "RecordingForwarder", "capture"]


@dataclass(frozen=True, slots=True)
class HandledEvent:
    """One handler call: the event, the handler's qualified name, and what it raised."""

    event: Event
    """The event the handler was called with."""
    handler: str
    """The handler's qualified name (``module.function``)."""
    error: BaseException | None
    """What the handler raised, or None if it returned."""


@dataclass(slots=True, eq=False)  # each block's own: removed by identity, even when nested
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

    Warns:
        RuntimeWarning: On leaving the block, if events emitted in it are still being
            handled or forwarded, *raise_failures* or not: their failures would be unseen.
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
    running = in_flight(bus) if recorder.emitted else set()
    if late := [event.id for event in recorder.emitted if event.id in running]:
        warnings.warn(  # what their handlers do next is not seen: a failure would pass
            f"capture() ended while {len(late)} event(s) emitted in it were still being "
            f"handled or forwarded ({', '.join(late)}): a failure of theirs would not be "
            "seen; wait for them inside the block (e.g. `await bus.drain()`)",
            RuntimeWarning,
            stacklevel=3,
        )


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


class MemorySource(Source):
    """An in-memory queue for a `Worker`: a broker for tests, without a broker.

    Put events in with `put` (encoded as the forwarders encode them) and run
    a worker on the source; `join` waits until every message is settled.
    It redelivers like a broker: `nack` gives a message back (after a delay),
    `ack` removes it, and a message nacked on its *max_deliveries*-th delivery
    moves to `dead` instead, as a broker's redrive policy would.

    ```python
    import asyncio

    from fastapi_eventbus import Event, EventBus
    from fastapi_eventbus.testing import MemorySource
    from fastapi_eventbus.worker import Worker

    async def main() -> list[str]:
        bus, seen = EventBus(), list[str]()
        bus.on("order.*")(lambda event: seen.append(event.name))
        source = MemorySource(Event(name="order.placed"))
        async with Worker(bus, source):
            await source.join()
        return seen

    assert asyncio.run(main()) == ["order.placed"]
    ```

    A message is in flight from `receive` until it is settled (there is no
    visibility timeout: `extend` only checks the receipt). Settling a receipt
    that is not in flight raises `SourceError`, as a broker refuses an expired
    receipt handle. `close` gives unsettled and delayed messages back at once,
    like a broker's connection ending. Use it from one event loop's thread.

    Args:
        *messages: Messages to `put` at once.
        name: A name for logs and traces.
        max_deliveries: The deliveries after which a nacked message goes to
            `dead` (None: redelivered forever).
        nack_delay: Seconds before a message nacked with ``delay=None`` comes back.
        max_messages: The most messages one `receive` returns.
        wait_time: Seconds `receive` waits for a message before returning none.
        extend_interval: Seconds between the worker's `extend` calls (None: none).
    """

    messaging_system = "memory"
    """The ``messaging.system`` of the worker's spans."""

    def __init__(
        self,
        *messages: Event | Mapping[str, Any],
        name: str = "memory",
        max_deliveries: int | None = None,
        nack_delay: float = 0.0,
        max_messages: int = 10,
        wait_time: float = 1.0,
        extend_interval: float | None = None,
    ) -> None:
        if max_deliveries is not None and (
            isinstance(max_deliveries, bool) or not isinstance(max_deliveries, int)
        ):
            raise ConfigurationError(f"max_deliveries must be an int >= 1, got {max_deliveries!r}")
        if max_deliveries is not None and max_deliveries < 1:
            raise ConfigurationError(f"max_deliveries must be an int >= 1, got {max_deliveries!r}")
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise ConfigurationError(f"max_messages must be an int >= 1, got {max_messages!r}")
        check_seconds("extend_interval", extend_interval, positive=True, optional=True)
        if not nack_delay >= 0 or not wait_time >= 0:
            raise ConfigurationError(
                f"nack_delay and wait_time must be >= 0, got {nack_delay!r} and {wait_time!r}"
            )
        self.name = name
        self.max_deliveries = max_deliveries
        """Deliveries after which a nacked message goes to `dead` (None: no limit)."""
        self.nack_delay = nack_delay
        """Seconds before a message nacked with ``delay=None`` is delivered again."""
        self.max_messages = max_messages
        self.wait_time = wait_time
        """Seconds `receive` waits for a message before returning none."""
        self.extend_interval = extend_interval
        self.acked: list[ReceivedMessage] = []
        """Every acknowledged delivery, in order."""
        self.nacked: list[tuple[ReceivedMessage, float | None]] = []
        """Every delivery given back, with the delay the worker asked for, in order."""
        self.dead: list[ReceivedMessage] = []
        """Messages nacked on their *max_deliveries*-th delivery: the dead-letter queue."""
        self._ready: deque[_Stored] = deque()
        self._in_flight: dict[str, _Stored] = {}
        self._delayed: dict[_Stored, asyncio.TimerHandle] = {}
        self._waiters: set[asyncio.Future[None]] = set()
        self._count = 0
        self._receipts = 0
        for message in messages:
            self.put(message)

    def __repr__(self) -> str:
        return f"<MemorySource {self.name!r} pending={self.pending}>"

    @property
    def pending(self) -> int:
        """Messages not settled for good: waiting, delayed or in flight."""
        return len(self._ready) + len(self._delayed) + len(self._in_flight)

    @property
    def in_flight(self) -> int:
        """Messages received and not settled yet."""
        return len(self._in_flight)

    def put(self, message: Event | Mapping[str, Any], *, message_id: str | None = None) -> str:
        """Queue *message*; return its message id (*message_id*, or a new one).

        An `Event` is encoded as `SQSForwarder` sends it (the CloudEvent body,
        the trace context as message attributes), which the `Source` defaults
        read. A mapping is queued as the ``body`` of the `ReceivedMessage` as is:
        another shape, or a message that is not an event.
        """
        if isinstance(message, Event):
            attributes = {
                key: {"DataType": "String", "StringValue": value}
                for key, value in wire.trace_attributes(message).items()
            }
            body: Mapping[str, Any] = {
                "Body": wire.sqs_body(message),
                "MessageAttributes": attributes,
            }
        elif isinstance(message, Mapping):
            body = message
        else:
            raise TypeError(f"put takes an Event or a mapping, got {type(message).__name__}")
        self._count += 1
        stored = _Stored(body, message_id or f"{self.name}-{self._count}")
        self._ready.append(stored)
        self._notify()
        return stored.message_id

    async def join(self) -> None:
        """Wait until no message is pending: each one acknowledged or dead.

        Raises:
            RuntimeError: A message keeps failing and has no end (``max_deliveries=None``):
                after 100 deliveries, instead of waiting forever.
        """
        while self.pending:
            stored = [*self._ready, *self._delayed, *self._in_flight.values()]
            if self.max_deliveries is None and (
                endless := [s.message_id for s in stored if s.deliveries >= _ENDLESS_DELIVERIES]
            ):
                raise RuntimeError(
                    f"{self.name}: message(s) {', '.join(endless)} delivered "
                    f"{_ENDLESS_DELIVERIES} times without being acknowledged, and they would go "
                    "on forever: give the source a max_deliveries to have them dead-lettered"
                )
            await self._changed(None)

    async def receive(self, max_messages: int) -> list[ReceivedMessage]:
        """Take up to *max_messages* waiting messages, waiting up to `wait_time` for one."""
        if not self._ready:
            await self._changed(self.wait_time)
        batch: list[ReceivedMessage] = []
        while self._ready and len(batch) < max_messages:
            stored = self._ready.popleft()
            stored.deliveries += 1
            self._receipts += 1  # unique, as a broker's: two messages may share an id
            receipt = f"{stored.message_id}/{stored.deliveries}/{self._receipts}"
            batch.append(
                ReceivedMessage(stored.body, stored.message_id, receipt, stored.deliveries)
            )
            self._in_flight[receipt] = stored
        return batch

    async def ack(self, message: ReceivedMessage) -> None:
        """Remove *message* for good."""
        self._settle(message)
        self.acked.append(message)
        self._notify()

    async def nack(self, message: ReceivedMessage, delay: float | None = None) -> None:
        """Deliver *message* again after *delay* seconds (None: `nack_delay`), or make it dead."""
        stored = self._settle(message)
        self.nacked.append((message, delay))
        seconds = self.nack_delay if delay is None else delay
        if self.max_deliveries is not None and stored.deliveries >= self.max_deliveries:
            self.dead.append(message)
        elif seconds <= 0:
            self._ready.append(stored)
        else:
            loop = asyncio.get_running_loop()
            self._delayed[stored] = loop.call_later(seconds, self._release, stored)
        self._notify()

    async def extend(self, message: ReceivedMessage, seconds: float | None = None) -> None:
        """Nothing to extend (no visibility timeout); `SourceError` if *message* is not in
        flight."""
        if message.receipt not in self._in_flight:
            raise SourceError(f"{self.name}: message {message.message_id} is not in flight")

    async def close(self) -> None:
        """Give unsettled and delayed messages back at once, for a next `receive`."""
        for stored, timer in list(self._delayed.items()):
            timer.cancel()
            self._release(stored)
        self._ready.extend(self._in_flight.values())
        self._in_flight.clear()
        self._notify()

    def _settle(self, message: ReceivedMessage) -> _Stored:
        stored = self._in_flight.pop(message.receipt, None)
        if stored is None:
            raise SourceError(
                f"{self.name}: receipt {message.receipt!r} of message {message.message_id} "
                "is not in flight (settled already, or from another delivery)"
            )
        return stored

    def _release(self, stored: _Stored) -> None:
        self._delayed.pop(stored, None)
        self._ready.append(stored)
        self._notify()

    def _notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def _changed(self, timeout: float | None) -> None:
        """Wait until a message is put, settled or released (or *timeout* seconds)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)


_ENDLESS_DELIVERIES = 100
"""Deliveries of one message after which `MemorySource.join` stops waiting for it."""


@dataclass(eq=False, slots=True)
class _Stored:
    """A message in a `MemorySource`: what each delivery carries, and how many there were."""

    body: Mapping[str, Any]
    message_id: str
    deliveries: int = 0
