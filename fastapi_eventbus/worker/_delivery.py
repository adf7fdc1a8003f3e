"""What a `Worker` does with one message: decode it, handle it under a heartbeat, settle it.

The `Worker` owns the running: receiving, concurrency slots, time limits and shutdown.
This module owns one message's way from receipt to acknowledgement: a `Processor`
decodes it, applies the worker's policies, runs the bus's handlers while keeping the
message invisible (`Source.extend`), and acknowledges it or gives it back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias, get_args

from fastapi_eventbus._bus import EventBus, report_discarded, tracing_of
from fastapi_eventbus._deadline import allowance, cancelled
from fastapi_eventbus._events import Event
from fastapi_eventbus._hooks import DiscardedEvents
from fastapi_eventbus._settings import check_int
from fastapi_eventbus._tracing import Consumed, Tracing
from fastapi_eventbus.exceptions import ConfigurationError, MessageDecodeError

from ._source import ReceivedMessage, Source

logger = logging.getLogger("fastapi_eventbus.worker")

OnUndecodable: TypeAlias = Literal["retry", "delete"]
"""What a worker does with a message it cannot decode (see `Worker`)."""
OnUnhandled: TypeAlias = Literal["retry", "delete"]
"""What a worker does with an event that no handler of its bus matches (see `Worker`)."""
Outcome: TypeAlias = bool | DiscardedEvents
"""Whether to acknowledge a message: True (handled), False (give it back), or the report
``on_discard`` hears once the message is deleted (a policy's ``"delete"``)."""


def check_policies(on_undecodable: object, on_unhandled: object, max_message_bytes: object) -> None:
    """`ConfigurationError` unless the arguments every consumer of messages takes (a
    `Worker`, ``lambda_sqs_handler``, ``push_router``) are valid."""
    for name, policy in (("on_undecodable", on_undecodable), ("on_unhandled", on_unhandled)):
        if policy not in get_args(OnUndecodable):
            raise ConfigurationError(f"{name} must be 'retry' or 'delete', got {policy!r}")
    check_int("max_message_bytes", max_message_bytes, 1)


GIVE_BACK_TIMEOUT = 5.0
"""Seconds allowed for giving a message back to the broker at once (shutdown, abandon)."""

SETTLE_TIMEOUT = 30.0
"""Seconds allowed for acknowledging a message, or giving it back, once handled (the SDK's
own retries included); past them, it is a failed settlement: the message comes again."""


@dataclass(slots=True)
class WorkerStats:
    """What a `Worker` has done so far (counters; read them, do not change them)."""

    received: int = 0
    """Messages received."""
    handled: int = 0
    """Messages whose handlers all succeeded (then acknowledged)."""
    failed: int = 0
    """Messages a handler failed on (given back for redelivery)."""
    undecodable: int = 0
    """Messages that were not events, or too large to decode (handled per ``on_undecodable``)."""
    unfinished: int = 0
    """Messages still running when ``shutdown_timeout`` ran out (cancelled and given back)."""
    settle_errors: int = 0
    """Acknowledgements (or give-backs) the broker did not take, or that were still under way
    when ``shutdown_timeout`` ran out: those messages come again."""
    unhandled: int = 0
    """Messages whose event no handler of the bus matches (handled per ``on_unhandled``)."""
    abandoned: int = 0
    """Messages whose handlers were still running past their time limit, or after being
    cancelled at shutdown: given back, reported at ERROR, and left running."""
    held_back: int = 0
    """Messages given back unhandled because the one before them in their group (SQS FIFO)
    was not handled: their group's order is kept."""


@dataclass(eq=False, slots=True)
class HeldMessage:
    """A message the worker holds, from its receipt until it is settled or given up."""

    message: ReceivedMessage
    """The message as its source received it."""
    event: Event | None = None
    """The decoded event, once decoded (for reports)."""
    abandoned: bool = False
    """Given back while its task still ran: the task settles nothing any more."""
    timer: asyncio.TimerHandle | None = None
    """Fires when the handlers have had their time (the worker's watch)."""
    handled: bool = False
    """Whether it is acknowledged: its handlers all succeeded, or a policy deletes it."""
    after: asyncio.Future[bool] | None = None
    """The message before it with the same `ReceivedMessage.order_key`: done once that one
    is settled, with whether it was handled. Its handlers start only then."""
    settled: asyncio.Future[bool] | None = None
    """With an order key: its own, done once it is settled; the next message's `after`."""
    settling: bool = False
    """Its acknowledgement or give-back is sent: the source may deliver it again already."""
    beats: asyncio.Task[None] | None = None
    """Its heartbeat, while one runs: given up (`Worker`'s abandoning), it is cancelled, since
    extending a message given back would hide it again."""

    def __str__(self) -> str:
        event = self.event
        name = named(self.message)
        return name if event is None else f"{name} (event {event.name!r} id={event.id})"


class Owner(Protocol):
    """What a `Processor` reads from the worker that owns it, when it needs it.

    A `Worker` is one: the processor reads its attributes at each message, never copies
    them.
    """

    bus: EventBus
    source: Source
    stats: WorkerStats
    on_undecodable: OnUndecodable
    on_unhandled: OnUnhandled
    max_message_bytes: int


Watch: TypeAlias = Callable[[HeldMessage, float | None], None]
"""The worker's timer: abandon a held message still running that many seconds from now
(None: never). Called from inside the message's task, as its handlers start."""


class Processor:
    """Takes each message a worker received from decoding to its acknowledgement.

    It decodes the message (its source's `Source.decode`, within the worker's
    ``max_message_bytes``), applies ``on_undecodable`` and ``on_unhandled``,
    runs the bus's handlers under a heartbeat, and then acknowledges the message
    or gives it back, counting everything in the worker's `WorkerStats`. Nothing
    the source raises while settling reaches the worker: it is logged and counted.
    """

    def __init__(self, owner: Owner, watch: Watch) -> None:
        self.owner = owner
        """The worker whose bus, source, stats and policies it uses."""
        self.watch = watch
        """Starts the time limit of a held message, as its handlers start."""

    async def process(self, held: HeldMessage) -> None:
        """Handle *held* and settle it, with a tracing span when tracing is on."""
        message = held.message
        tracing = tracing_of(self.owner.bus)
        if tracing is None:
            outcome = await self._given_back_if_cancelled(held, None)
            held.handled = outcome is not False
            if not held.abandoned:
                held.settling = True
                await self._settle(message, outcome)
            return
        with tracing.consuming(self.owner.source, message) as consumed:
            outcome = await self._given_back_if_cancelled(held, consumed)
            held.handled = outcome is not False
            if not held.abandoned:
                held.settling = True
                await self._settle(message, outcome, tracing)

    async def _given_back_if_cancelled(
        self, held: HeldMessage, consumed: Consumed | None
    ) -> Outcome:
        """`_handle`; cancelled, give the message back at once first.

        The cancellation's message says why (``task.cancel("...")``: a serverless entry
        point's time limit); without one, it is the worker's shutdown.
        """
        try:
            return await self._handle(held, consumed)
        except asyncio.CancelledError as exc:
            tracing = tracing_of(self.owner.bus) if consumed is not None else None
            if consumed is not None:
                why = str(exc.args[0]) if exc.args and exc.args[0] else "cancelled at shutdown"
                consumed.failure, consumed.error = f"{why}; given back", exc
            if not held.abandoned:
                held.settling = True
                await self._give_back(held.message, tracing)
            raise

    async def _handle(self, held: HeldMessage, consumed: Consumed | None) -> Outcome:
        """Decode and handle *held*'s message; whether to acknowledge it (`Outcome`)."""
        owner, message = self.owner, held.message
        if held.after is not None:  # kept invisible meanwhile; cancelled: given back
            async with self._heartbeat(held, None):
                handled_before = await asyncio.shield(held.after)  # cancelled: not the future
            if not handled_before:
                return self._held_back(held, consumed)
        decoded = self._decode(message)
        if not isinstance(decoded, Event):
            return await self._undecodable(message, consumed, *decoded)
        event = held.event = decoded
        if consumed is not None:
            consumed.event = event
        if not owner.bus.handles(event.name):
            return await self._unhandled(held, event, consumed)
        hold_for = allowance(owner.bus.time_limit(event.name))
        self.watch(held, hold_for)
        try:
            # After a wait, at once: the wait's last extension may be nearly spent.
            async with self._heartbeat(held, hold_for, at_once=held.after is not None):
                failures = await owner.bus.handle(event)
        except Exception as exc:
            logger.exception("handling event %r (id=%s) failed", event.name, event.id)
            failures = None
            if consumed is not None:
                consumed.error = exc
        finally:
            if held.timer is not None:  # the handlers are over: settling is not theirs to time
                held.timer.cancel()
        if held.abandoned:
            logger.warning("message %s finished after it was given back: not acknowledged", held)
            if consumed is not None:
                consumed.failure = "its handlers ran past their time allowance: given back"
            return False
        if cancelled():  # at shutdown, and a handler swallowed it: not finished, given back
            raise asyncio.CancelledError
        if failures == []:
            owner.stats.handled += 1
            return True
        owner.stats.failed += 1
        logger.warning(
            "event %r (id=%s) failed; message %s goes back to %s (delivery %s)",
            event.name,
            event.id,
            message.message_id,
            owner.source.name,
            message.receive_count or "?",
        )
        if consumed is not None:
            count = "a handler" if failures is None else f"{len(failures)} handler(s)"
            consumed.failure = f"{count} failed; the message goes back for redelivery"
            if failures:
                consumed.error = failures[0].exception
        return False

    def _decode(self, message: ReceivedMessage) -> Event | tuple[str, Exception]:
        """*message*'s event, or why there is none: what it is, and the error.

        Nothing raised while reading one message may affect another: an exception
        other than `MessageDecodeError` (a bug in a decoder or a source) makes the
        message undecodable too, never a failure of the worker.
        """
        source, limit = self.owner.source, self.owner.max_message_bytes
        try:
            size = source.message_size(message)
            if size > limit:
                return "too large to decode", MessageDecodeError(
                    f"{size} bytes, over max_message_bytes={limit}"
                )
            event = source.decode(message)
        except MessageDecodeError as exc:
            return "not an event", exc
        except Exception as exc:
            return "not decodable", exc
        if not isinstance(event, Event):  # e.g. a decode hook that did not take it
            kind = type(event).__name__
            return "not decodable", MessageDecodeError(
                f"{type(source).__name__}.decode returned {kind}, not an Event"
            )
        return event

    async def _undecodable(
        self,
        message: ReceivedMessage,
        consumed: Consumed | None,
        failure: str,
        error: Exception,
    ) -> Outcome:
        """Log *message*, which will not be handled; whether to acknowledge it (the
        policy): deleted, what ``on_discard`` hears once it is (`Outcome`)."""
        self.owner.stats.undecodable += 1
        delete = self.owner.on_undecodable == "delete"
        expected = isinstance(error, MessageDecodeError)
        logger.error(
            "message %s from %s is %s (%s); %s",
            named(message),
            self.owner.source.name,
            failure,
            error if expected else f"{type(error).__name__}: {error}",
            "deleting it" if delete else self._giving_back("on_undecodable"),
            exc_info=None if expected else error,
        )
        if consumed is not None:
            consumed.failure, consumed.error = failure, error
        if not delete:
            return False
        reason = (
            f"message {message.message_id} from {self.owner.source.name} is {failure}; "
            "it is deleted (on_undecodable='delete')"
        )
        return DiscardedEvents((), reason, error, message_ids=(message.message_id,))

    def _held_back(self, held: HeldMessage, consumed: Consumed | None) -> bool:
        """The message before *held* in its group went back to the broker: give *held* back
        too, unhandled, so that the group's messages are handled in their order."""
        self.owner.stats.held_back += 1
        logger.warning(
            "message %s from %s goes back unhandled, to keep the order of its group %r: "
            "the message before it went back",
            held,
            self.owner.source.name,
            held.message.order_key,
        )
        if consumed is not None:
            consumed.failure = "held back: the message before it in its group went back"
        return False

    def _giving_back(self, policy: str) -> str:
        """What giving back a message under *policy* ``"retry"`` leads to, for its log line.

        The worker cannot see the queue's or subscription's dead-letter policy: the
        line says what happens with one and without one, never that a dead-letter
        queue will take the message.
        """
        return (
            f"giving it back ({policy}='retry'): {self.owner.source.name} delivers it again, "
            "forever unless a dead-letter policy moves it"
        )

    async def _unhandled(
        self, held: HeldMessage, event: Event, consumed: Consumed | None
    ) -> Outcome:
        """Log *held*'s *event*, which no handler matches; whether to acknowledge it:
        deleted, what ``on_discard`` hears once it is (`Outcome`)."""
        self.owner.stats.unhandled += 1
        delete = self.owner.on_unhandled == "delete"
        logger.log(
            logging.WARNING if delete else logging.ERROR,
            "message %s from %s matches no handler of the bus; %s",
            held,
            self.owner.source.name,
            "deleting it (on_unhandled='delete')" if delete else self._giving_back("on_unhandled"),
        )
        if consumed is not None:
            consumed.failure = "no handler matches the event"
        if not delete:
            return False
        reason = (
            "no handler of the bus matches it; the worker deleted its message "
            "(on_unhandled='delete')"
        )
        return DiscardedEvents((event,), reason)

    # -- the heartbeat --------------------------------------------------------------

    @asynccontextmanager
    async def _heartbeat(
        self, held: HeldMessage, hold: float | None, *, at_once: bool = False
    ) -> AsyncIterator[None]:
        """Extend *held*'s visibility (ack deadline) in the background inside the block,
        for up to *hold* seconds (None: as long as the block lasts); the first time at
        once with *at_once*, else an interval from now."""
        interval = self.owner.source.extend_interval
        if interval is None:
            yield
            return
        until = None if hold is None else asyncio.get_running_loop().time() + hold
        beats = held.beats = asyncio.create_task(
            self._keep_invisible(held.message, interval, until, at_once)
        )
        try:
            yield
        finally:
            beats.cancel()
            await asyncio.wait({beats})

    async def _keep_invisible(
        self, message: ReceivedMessage, interval: float, until: float | None, at_once: bool
    ) -> None:
        """Call `Source.extend` every *interval* seconds until *until* (loop time; None:
        until cancelled); the last call extends to *until* exactly. A failure is logged,
        then retried at the next beat."""
        source = self.owner.source
        loop = asyncio.get_running_loop()
        beat = loop.time() - (interval if at_once else 0.0)
        while True:  # on the beat: a slow extension does not push the later ones back
            beat = max(beat + interval, loop.time())  # (nor bring a burst after it)
            await asyncio.sleep(beat - loop.time())
            seconds = None if until is None else until - loop.time()
            if seconds is not None and seconds <= 0:
                return
            last = seconds is not None and seconds <= interval
            try:
                await source.extend(message, seconds if last else None)
            except Exception as exc:
                logger.warning(
                    "could not extend the visibility of message %s on %s (%s); "
                    "it may be delivered again while its handlers run",
                    message.message_id,
                    source.name,
                    exc,
                )
            if last:
                return

    # -- settling -------------------------------------------------------------------

    async def _settle(
        self, message: ReceivedMessage, outcome: Outcome, tracing: Tracing | None = None
    ) -> None:
        """Acknowledge *message*, or give it back, as *outcome* says; a deleted message is
        reported to ``on_discard`` once it is. A failure here means a redelivery."""
        handled = outcome is not False
        source = self.owner.source
        settle = source.ack(message) if handled else source.nack(message)
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT):
                if tracing is None:
                    await settle
                else:
                    with tracing.settling(source, message, "ack" if handled else "nack"):
                        await settle
        except (Exception, asyncio.CancelledError) as exc:
            # The worker's own cancellation (shutdown): not finished either, reported the same.
            shutdown = isinstance(exc, asyncio.CancelledError) and cancelled()
            self.owner.stats.settle_errors += 1
            logger.warning(  # cut off at shutdown, the broker's call may still go through
                "could not %s message %s on %s (%s); it %s delivered again",
                "acknowledge" if handled else "give back",
                message.message_id,
                source.name,
                "cancelled at shutdown" if shutdown else str(exc) or type(exc).__name__,
                "may be" if shutdown else "will be",
            )
            if shutdown:
                raise
            return
        if isinstance(outcome, DiscardedEvents):  # deleted: now it is
            await report_discarded(self.owner.bus, outcome)

    async def _give_back(self, message: ReceivedMessage, tracing: Tracing | None = None) -> None:
        """At shutdown: make an unfinished message available again at once (best effort)."""
        if tracing is None:
            await self.hand_back(message, 0)
            return
        with tracing.settling(self.owner.source, message, "nack"):
            await self.hand_back(message, 0)

    async def hand_back(self, message: ReceivedMessage, delay: float | None) -> None:
        """Give *message* back after *delay* seconds (None: like a failure), bounded in time."""
        source = self.owner.source
        try:
            async with asyncio.timeout(GIVE_BACK_TIMEOUT):
                await source.nack(message, delay)
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and cancelled():
                raise
            self.owner.stats.settle_errors += 1
            logger.warning(
                "could not give back message %s on %s (%s); it comes again when its "
                "visibility timeout (ack deadline) ends",
                message.message_id,
                source.name,
                str(exc) or type(exc).__name__,
            )


def named(message: ReceivedMessage) -> str:
    """*message*'s id for a log line."""
    return message.message_id or "(with no id)"


def listed(held: Iterable[HeldMessage]) -> str:
    """*held* messages for a log line: their ids (and their events', once decoded)."""
    return ", ".join(str(message) for message in held)
