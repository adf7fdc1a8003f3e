"""The forwarders of one bus, and the storage their events wait in."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any

from ._deadline import within
from ._events import Event
from ._hooks import DiscardedEvents, OnDiscard, call_hook, contained, logger, passes_through
from ._patterns import PatternIndex
from ._tracing import Tracing
from .exceptions import ConfigurationError, SpoolError
from .forwarders._base import DeadLetter, DeliveryOutcome, Forwarder
from .storage import SpooledEvent, Storage


class Sender:
    """Sends events through the forwarders that match them, settling them in the storage.

    One per bus (`fastapi_eventbus._core.Core.sender`): the flush loop hands it
    each round's events, and the installed lifespan has it send again what the
    storage holds (after a crash or a broker outage).
    """

    def __init__(self, storage: Storage | None, on_discard: OnDiscard | None = None) -> None:
        self.forwarders: PatternIndex[Forwarder] = PatternIndex()
        self.storage = storage
        """Where events for forwarders wait until sent; None: in memory only."""
        self.on_discard = on_discard
        """The bus's hook, told of stored events no forwarder of this bus can report: those
        of a forwarder it does not have, once the storage gives up on them."""
        self.tracing: Tracing | None = None
        """The bus's span hooks (set with the bus's, by `fastapi_eventbus.otel`)."""

    def start(self, events: Sequence[Event]) -> list[tuple[asyncio.Future[Any], list[Event]]]:
        """Start one send per forwarder with the events it matches; each send and its events."""
        selected: dict[Forwarder, list[Event]] = {}
        for event in events:
            for forwarder in self.forwarders.match(event.name):
                selected.setdefault(forwarder, []).append(event)
        return [
            (asyncio.ensure_future(self.send(forwarder, chosen)), chosen)
            for forwarder, chosen in selected.items()
        ]

    def send(self, forwarder: Forwarder, events: list[Event]) -> Coroutine[Any, Any, object]:
        """Deliver *events* through *forwarder* (traced, if tracing is on)."""
        if self.tracing is None:
            return self._deliver(forwarder, events)
        return self.tracing.deliver(forwarder, events, self._deliver)

    def send_kept(
        self, forwarder: Forwarder, events: list[Event]
    ) -> Coroutine[Any, Any, DeliveryOutcome]:
        """Deliver *events* through *forwarder* (traced, if tracing is on), returning those
        still unsent when its retries ran out: the caller's storage (an outbox) keeps
        them. Those refused for good are dead-lettered and reported, as always."""
        if self.tracing is None:
            return self._kept(forwarder, events)
        return self.tracing.deliver(forwarder, events, self._kept)

    @staticmethod
    async def _kept(forwarder: Forwarder, events: Sequence[Event]) -> DeliveryOutcome:
        try:
            return await forwarder.deliver(events, keep_unsent=True)
        except BaseException as exc:  # kept for a later round: the caller's storage has them
            if passes_through(exc):
                raise
            return DeliveryOutcome(unsent=list(events), error=_failed(forwarder, events, exc))

    async def broke(self, events: Sequence[Event], error: BaseException) -> None:
        """A send of *events* raised *error*, which the forwarder's own reporting does not
        catch (a storage's bug): an ERROR that names them. With a storage, they stay in it,
        to be sent again; without, whether they were sent is unknown: ``on_discard`` too."""
        kept = "they stay in the storage, to be sent again" if self.storage else "maybe unsent"
        ids = ", ".join(event.id for event in events)
        logger.error("sending %d event(s) failed (%s): %s", len(events), kept, ids, exc_info=error)
        if self.storage is None:
            why = f"sending them failed unexpectedly ({error!r}); maybe unsent"
            await call_hook(self.on_discard, DiscardedEvents(tuple(events), why, error))

    def named(self, name: str) -> Forwarder | None:
        """The forwarder called *name*, if this bus has one."""
        for forwarder in self.forwarders.items():
            if forwarder.name == name:
                return forwarder
        return None

    async def _deliver(self, forwarder: Forwarder, events: Sequence[Event]) -> DeliveryOutcome:
        """`Forwarder.deliver`, and with a storage, its bookkeeping of the outcome."""
        storage = self.storage
        try:
            outcome = await forwarder.deliver(events, keep_unsent=storage is not None)
        except BaseException as exc:  # never dropped with the send task's exception
            if passes_through(exc):  # a SystemExit would stop the loop out of the task
                raise
            reason = _failed(forwarder, events, exc)
            if storage is None:
                await forwarder.give_up(events, reason, exc)
                return DeliveryOutcome(dead=[(event, reason) for event in events])
            outcome = DeliveryOutcome(unsent=list(events), error=reason)
        if storage is None:
            return outcome
        try:
            settled = storage.settle(
                forwarder.name, events, outcome.dead, outcome.unsent, outcome.error
            )
            if settled.spent:
                await forwarder.give_up(settled.spent, settled.reason)
        except SpoolError as exc:  # the rows stay: sent again later, duplicates at worst
            logger.error("forwarder %s: %s", forwarder.name, exc)
        return outcome

    async def resend(self, limit: int = 500) -> int:
        """Send again the stored events that are due (see `Storage.claim`); how many."""
        storage = self.storage
        if storage is None:
            return 0
        unreadable: list[SpooledEvent] = []  # dead-lettered and logged by claim
        due = storage.claim(limit, unreadable=unreadable)
        by_name = {forwarder.name: forwarder for forwarder in self.forwarders.items()}
        for item in unreadable:  # the app hears of it as of any dead letter of the storage
            reason = item.error or "unreadable"
            if (owner := by_name.get(item.forwarder)) is not None:
                await call_hook(owner.dead_letter, DeadLetter(owner.name, (item.event,), reason))
            else:  # logged by claim; the bus's hook, as no forwarder of its can be told
                await call_hook(self.on_discard, DiscardedEvents((item.event,), reason))
        if not due:
            return len(unreadable)
        groups: dict[str, list[Event]] = {}
        for item in due:
            groups.setdefault(item.forwarder, []).append(item.event)
        sends = []
        for name, events in groups.items():
            forwarder = by_name.get(name)
            if forwarder is None:
                logger.warning(
                    "spool %s: %d event(s) for forwarder %r, which this bus does not have; "
                    "they wait for an application that does",
                    storage.name,
                    len(events),
                    name,
                )
                settled = storage.settle(
                    name, events, unsent=events, error=f"no forwarder named {name!r} here"
                )
                if settled.spent:
                    await self._given_up(name, settled.spent, settled.reason)
                continue
            logger.info("spool: sending %d event(s) again through %s", len(events), name)
            sends.append((events, self.send(forwarder, events)))
        outcomes = await asyncio.gather(*(send for _, send in sends), return_exceptions=True)
        for (events, _), outcome in zip(sends, outcomes, strict=True):
            if isinstance(outcome, BaseException):  # a bug: in a storage, say (none is the
                await self.broke(events, outcome)  # round's cancellation: gather raises that)
        return len(due) + len(unreadable)

    async def _given_up(self, forwarder: str, events: Sequence[Event], reason: str) -> None:
        """Stored events for *forwarder*, which this bus does not have, are dead-lettered:
        no application sent them in time. Reported here, as no forwarder can report them."""
        assert self.storage is not None
        ids = ", ".join(event.id for event in events)
        logger.error(
            "spool %s: %d event(s) for forwarder %r dead-lettered (no application with that "
            "forwarder sent them; %s): %s",
            self.storage.name,
            len(events),
            forwarder,
            reason,
            ids,
        )
        why = f"spooled for forwarder {forwarder!r}, which no application sent them through: "
        await call_hook(self.on_discard, DiscardedEvents(tuple(events), why + reason))

    def add(self, patterns: list[str], forwarder: Forwarder, kept: str | None) -> None:
        """Send the events matching *patterns* to *forwarder*; events *kept* (in a spool, in
        an outbox) are filed by forwarder name, which must then be unique."""
        if kept is not None:
            for other in self.forwarders.items():
                if other is not forwarder and other.name == forwarder.name:
                    raise ConfigurationError(
                        f"two forwarders are named {forwarder.name!r}: with {kept}, each "
                        f"forwarder needs its own name (name=...), which its stored events "
                        f"are filed under"
                    )
            self._check_lease(forwarder, kept)
        again = any(other is forwarder for other in self.forwarders.items())  # its patterns
        self.forwarders.add(patterns, forwarder, replacing=forwarder if again else None)  # grow

    def _check_lease(self, forwarder: Forwarder, kept: str) -> None:
        """Refuse a forwarder whose one send (all its retries) may outlast the storage's
        lease (`Spool(lease=...)`): the row would be due again while this process still
        sends it, and sent twice. Without ``send_timeout`` a send has no bound: a WARNING,
        as refusing would refuse every such forwarder."""
        lease = getattr(self.storage, "lease", None)
        if isinstance(lease, bool) or not isinstance(lease, int | float):
            return  # a storage without a lease
        if forwarder.send_timeout is None:
            logger.warning(
                "forwarder %s has no send_timeout: a send that outlasts %s's lease (%gs) is "
                "taken over and sent again while it runs; give it a send_timeout",
                forwarder.name,
                kept,
                lease,
            )
            return
        longest = forwarder.retry.longest(forwarder.send_timeout)
        if longest >= lease:
            raise ConfigurationError(
                f"forwarder {forwarder.name!r} may take {longest:g}s for one send (its "
                f"Retry.total_timeout plus send_timeout={forwarder.send_timeout:g}s), not "
                f"less than {kept}'s lease={lease:g}s: the event would be taken over and "
                "sent twice; lengthen Spool(lease=...) or shorten the forwarder's retry"
            )

    async def resend_due(self) -> int:
        """`resend` until nothing is due; how many events were tried."""
        total = 0
        while (count := await self.resend()) > 0:
            total += count
        return total

    async def resend_forever(self) -> None:
        """Call `resend` every ``resend_interval`` seconds (the installed lifespan runs this)."""
        storage = self.storage
        assert storage is not None
        while True:
            try:
                await self.resend_due()
            except SpoolError as exc:
                logger.error("%s", exc)
            except Exception:
                logger.exception("resending spooled events failed")
            await asyncio.sleep(storage.resend_interval)

    async def close(self) -> None:
        """Close every forwarder's clients, all at once; a failing close is logged, not raised.
        Each close has the forwarder's ``send_timeout`` (60 s without one): one that never
        returns must not hold the shutdown (cancelled, and left running if it ignores that)."""
        await asyncio.gather(*(_close(forwarder) for forwarder in self.forwarders.items()))


async def _close(forwarder: Forwarder) -> None:
    seconds = 60.0 if forwarder.send_timeout is None else forwarder.send_timeout
    try:
        closed, _ = await within(contained(forwarder.aclose()), seconds)
    except Exception:
        logger.exception("closing forwarder %s failed", forwarder.name)
        return
    if not closed:
        logger.error(
            "closing forwarder %s did not finish within %gs: cancelled, and left running if it "
            "ignores that; its clients may stay open",
            forwarder.name,
            seconds,
        )


def _failed(forwarder: Forwarder, events: Sequence[Event], exc: BaseException) -> str:
    """Log that *forwarder*'s `Forwarder.deliver` raised *exc* (a bug in it, or in how it
    was set up), with *events*' ids; the reason to report them with."""
    logger.error(
        "forwarder %s failed unexpectedly delivering %d event(s): %s",
        forwarder.name,
        len(events),
        ", ".join(event.id for event in events),
        exc_info=exc,
    )
    return f"the forwarder failed unexpectedly: {exc!r}"
