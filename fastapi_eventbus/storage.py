"""The storage contract: where events for forwarders wait until their broker has them.

The bus writes an event there at ``emit``, before the caller goes on; sends it
through its forwarder after the response; and settles the outcome: sent events
leave, refused ones are dead-lettered, failed rounds are counted and retried
later through `Storage.claim`, by this process or another one sharing the
storage. `fastapi_eventbus.spool.Spool` (an SQLite file) is one implementation;
``EventBus(spool=...)`` takes any object with these methods.

The bus calls, in order of an event's life:

| When | Call |
| --- | --- |
| ``emit``/``publish``, once per matching forwarder | `Storage.add` |
| after a send | `Storage.settle` |
| the endpoint (or emitting handler) raised | `Storage.forget`: never send them |
| every ``resend_interval`` seconds | `Storage.claim` (a lease), a send, `Storage.settle` |
| shutdown | `Storage.release`: what this process holds is due again at once |
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ._events import Event

if TYPE_CHECKING:
    from ._batch import Batch
    from ._core import Core

__all__ = ["Outbox", "Settled", "SpooledEvent", "Storage"]


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    """An event in storage, waiting for its forwarder or dead-lettered."""

    forwarder: str
    """The name of the forwarder it goes through."""
    event: Event
    """The event, as emitted."""
    created: float
    """When it was spooled (Unix time)."""
    attempts: int
    """Failed delivery rounds so far."""
    error: str | None = None
    """The last failure (pending), or why it was dead-lettered (dead)."""
    readable: bool = True
    """False for a row that does not hold an `Event` (damaged, or written by another
    version): *event* is then a stand-in with the row's id, its time and, if it can
    be read, its name, but no payload; *error* says what is wrong. Such a row is
    never sent: `Spool.claim` dead-letters it."""


@dataclass(frozen=True, slots=True)
class Settled:
    """What `Storage.settle` did beyond the normal: events that used up their attempts."""

    spent: tuple[Event, ...] = ()
    """Events moved to the dead-letter table because their rounds ran out: report them."""
    reason: str = ""
    """Why, for the report (the last failure and the number of rounds)."""


@runtime_checkable
class Storage(Protocol):
    """Where events for forwarders wait until their broker has them (see the module)."""

    @property
    def name(self) -> str:
        """What log lines call this storage (a file's path, a database's URL)."""
        ...

    @property
    def resend_interval(self) -> float:
        """Seconds between two `claim` rounds while the application runs."""
        ...

    def add(self, entries: Iterable[tuple[str, Event]]) -> None:
        """Store each ``(forwarder name, event)`` pair, durably, before returning.

        Raises `fastapi_eventbus.SpoolError` if it cannot: ``emit`` then raises it.
        """
        ...

    def claim(
        self, limit: int = 500, *, unreadable: list[SpooledEvent] | None = None
    ) -> list[SpooledEvent]:
        """Lease up to *limit* events that are due to be sent again, oldest first.

        No other process gets them while the lease runs. An entry that cannot be
        read is dead-lettered instead, and appended to *unreadable*, never raised:
        one bad entry does not stop the others.
        """
        ...

    def settle(
        self,
        forwarder: str,
        events: Sequence[Event],
        dead: Sequence[tuple[Event, str]] = (),
        unsent: Sequence[Event] = (),
        error: str = "",
    ) -> Settled:
        """Record how a send of *events* through *forwarder* went.

        *dead* (with their reasons) were refused for good: dead-letter them.
        *unsent* failed this round (*error*): count the round and make them due
        again later, with backoff; those that used up their attempts are
        dead-lettered and returned in `Settled`. The rest were sent: remove them.
        """
        ...

    def forget(self, events: Iterable[Event]) -> None:
        """Remove *events* for every forwarder: they were discarded, never to be sent."""
        ...

    def release(self) -> int:
        """Make what this process holds due again at once (shutdown); how many."""
        ...


class Outbox(Protocol):
    """What ``EventBus(outbox=...)`` takes (`fastapi_eventbus.outbox.SQLAlchemyOutbox`)."""

    @property
    def name(self) -> str:
        """What log lines call it."""

    def attach(self, core: Core) -> None:
        """Become the outbox of the bus behind *core*."""

    def join(self, session: object, event: Event, batch: Batch | None) -> None:
        """Add *event* to *session*'s transaction (``emit(..., session=)``)."""

    async def relay_forever(self) -> None:
        """Deliver what is due, forever (the installed lifespan runs it)."""

    async def release(self) -> int:
        """Make what this process holds due at once (shutdown)."""
