"""The forwarder base class, its retry policy and its dead-letter path."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, ClassVar, Self, TypeAlias, TypeVar

from fastapi_eventbus._deadline import cancelled
from fastapi_eventbus._events import Event
from fastapi_eventbus._hooks import call_hook, check_hook, logger, passes_through
from fastapi_eventbus._retry import Retry
from fastapi_eventbus.exceptions import ConfigurationError, ForwarderError, InvalidEventError
from fastapi_eventbus.wire import sqs_body, utf8_size

from ._retry_log import RetryLog

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Delivery:
    """What `Forwarder.send` reports when only part of a batch went through."""

    retry: Sequence[Event] = ()
    """Events that failed for a reason a retry may fix (throttling, a 5xx)."""
    rejected: Sequence[Event] = ()
    """Events the broker refused for good (the sender's fault): dead-lettered."""
    reason: str = ""
    """What the broker said, for logs and the dead-letter callback."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Events a forwarder could not deliver. Passed to its ``dead_letter`` callback."""

    forwarder: str
    """The name of the forwarder that gave up on them."""
    events: tuple[Event, ...]
    """The events, in emission order."""
    reason: str
    """Why: what the broker said, or the last failure when the retries ran out."""
    exception: BaseException | None = None
    """The exception behind *reason*, when there is one."""

    @property
    def ids(self) -> list[str]:
        """The ids of the undelivered events."""
        return [event.id for event in self.events]


@dataclass(slots=True)
class DeliveryOutcome:
    """What `Forwarder.deliver` did with a batch: the events not sent, and why."""

    dead: list[tuple[Event, str]] = field(default_factory=list)
    """Dead-lettered events, each with the reason (already logged and passed on)."""
    unsent: list[Event] = field(default_factory=list)
    """Events kept for a later round (``keep_unsent=True`` only)."""
    error: str = ""
    """The last transient failure, when *unsent* is not empty."""

    @property
    def lost(self) -> int:
        """How many events did not reach the broker."""
        return len(self.dead) + len(self.unsent)


OnDeadLetter: TypeAlias = Callable[[DeadLetter], Awaitable[None] | None]
"""Signature of a forwarder's ``dead_letter`` callback: sync or async."""


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ForwarderError):
        return exc.transient
    return isinstance(exc, ConnectionError | TimeoutError | OSError)


def _is_transient_start_failure(exc: BaseException) -> bool:
    """Whether a retry may fix a failed `Forwarder.start`.

    Narrower than `_is_transient`: a missing or unreadable credentials file is an
    `OSError` too, and no retry brings it back.
    """
    if isinstance(exc, ForwarderError):
        return exc.transient
    return isinstance(exc, ConnectionError | TimeoutError)


class Forwarder:
    """Base class for forwarders: what sends events to a remote broker.

    Attach one with ``bus.forward("order.*", forwarder)``. On every flush, after
    the response, the bus calls `send` once with the batch of the request's events
    that match, concurrently with local handlers and other forwarders. `send`
    raises (or returns a `Delivery`) for what failed; the base class retries
    transient failures per *retry* and hands what still fails to *dead_letter*,
    always with an ERROR log line.

    `start` runs once: at application startup (the lifespan of ``bus.install``
    starts every forwarder), or else before the first send; `close` runs at
    shutdown. Clients belong to the event loop they were opened on: a
    forwarder used on another loop than the one it started on (a bare
    ``TestClient(app)``, several ``asyncio.run`` calls) logs a warning, calls
    `abandon` and runs `start` again on the new loop. A forwarder is also an
    async context manager doing `start` and `close`.

    With *verify_on_start*, `verify` follows `start` and asks the broker
    whether sends can succeed (the queue or topic exists, the region and
    credentials are right); at application startup a failure then stops the
    app with a `ForwarderError`, instead of being found at the first send.

    Args:
        retry: The retry policy for transient failures.
        dead_letter: Called with a `DeadLetter` for events that could not be delivered.
        max_message_bytes: Reject, at emit time, events whose encoded message is larger.
        name: A name for logs (default: the class name).
        verify_on_start: Run `verify` after `start`, and fail the application's
            startup if the forwarder cannot send (recommended in production).
        send_timeout: Seconds one call of `send` (or of `start` and `verify`, `close`)
            may take; past that it is cancelled and counts as a transient failure,
            retried per *retry* (None: no limit). A send that never returns would
            hold `EventBus.publish`, a request's flush and an outbox's relay; a
            start or close, the application's startup or shutdown.
    """

    messaging_system: ClassVar[str] = "fastapi_eventbus"
    """The OpenTelemetry ``messaging.system`` of send spans (``aws_sqs``, ``gcp_pubsub``...)."""

    loop_bound: ClassVar[bool] = True
    """Whether `start` opens clients tied to the running event loop (SDK sessions do).
    Set it to ``False`` in forwarders without such clients: they start once and are never
    restarted on another loop."""

    def __init__(
        self,
        *,
        retry: Retry | None = None,
        dead_letter: OnDeadLetter | None = None,
        max_message_bytes: int | None = None,
        name: str | None = None,
        verify_on_start: bool = False,
        send_timeout: float | None = 60.0,
    ) -> None:
        check_hook("dead_letter", dead_letter)
        if send_timeout is not None and (
            type(send_timeout) not in (int, float) or not 0 < send_timeout < math.inf
        ):
            raise ConfigurationError(
                f"send_timeout must be a number of seconds > 0, or None, got {send_timeout!r}"
            )
        self.send_timeout = send_timeout
        """Seconds one call of `send` or `start` may take (None: no limit)."""
        if max_message_bytes is not None and max_message_bytes < 1:
            raise ConfigurationError(f"max_message_bytes must be >= 1, got {max_message_bytes}")
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigurationError(f"retry must be a Retry instance, or None, got {retry!r}")
        self.retry = retry or Retry()
        """The retry policy for transient failures."""
        self.dead_letter = dead_letter
        """Called with a `DeadLetter` for events that could not be delivered, if set."""
        self.max_message_bytes = max_message_bytes
        """The largest message accepted at emit time, in bytes (None: no limit)."""
        self.name = name or type(self).__name__
        """The forwarder's name, for logs (and, with a spool, the key of its events)."""
        if not isinstance(verify_on_start, bool):
            raise ConfigurationError(f"verify_on_start must be a bool, got {verify_on_start!r}")
        self.verify_on_start = verify_on_start
        """Whether `start` is followed by `verify`, and a failure stops the app's startup."""
        self._retries = RetryLog()
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        """The event loop `start` last succeeded on."""
        self._start_lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    @property
    def destination(self) -> str:
        """Where events go (a queue or topic name), for traces; default: the name."""
        return self.name

    # -- what subclasses implement ----------------------------------------------

    async def send(self, events: Sequence[Event]) -> Delivery | None:
        """Send *events* (one flush's matching events, in emission order).

        Return ``None`` when all were accepted, or a `Delivery` naming those to
        retry and those rejected for good. Raise `ForwarderError` (with
        ``transient=True`` when a retry may help) when the whole batch failed.
        """
        raise NotImplementedError

    async def start(self) -> None:
        """Open clients. Called once, at application startup or before the first send.

        Called again, after `abandon`, if the forwarder is then used on another
        event loop. An exception here is retried only if it is a
        `ForwarderError` with ``transient=True``, a `ConnectionError` or a
        `TimeoutError`; anything else dead-letters the batch at once.
        """

    async def verify(self) -> None:
        """Ask the broker whether sends can succeed; raise `ForwarderError` if not.

        Called after `start` when *verify_on_start* is set: one cheap call that
        needs the same region, credentials and destination as a send (SQS:
        ``GetQueueAttributes`` on the queue; Pub/Sub: get the topic). Raise
        with ``transient=True`` when a retry may help (the broker is
        unreachable). The default does nothing.
        """

    async def close(self) -> None:
        """Close clients. Called at application shutdown, after in-flight sends finished."""

    def abandon(self) -> None:
        """Drop the clients `start` opened, without closing them. Must not await anything.

        Called when the forwarder is used on another event loop than the one it
        started on, just before `start` runs again on the new loop: clients bound
        to the old loop cannot be used or closed from there. Reset whatever
        `start` set (clients, sessions, loop-bound locks) so that `start` opens
        new ones. The default does nothing.
        """

    def encoded_size(self, event: Event) -> int:
        """Bytes of the message this forwarder would send for *event*."""
        return utf8_size(sqs_body(event))

    def may_be_one_message(self, exc: BaseException) -> bool:
        """Whether *exc*, a permanent failure of a send of several events that `check`
        passes, may be the broker refusing one message (and the whole call with it). Then
        the send is split in halves, sent on their own, so that only what fails alone is
        dead-lettered. True by default; the AWS forwarders: only for AWS's error codes
        about a value (a missing queue is every message's)."""
        return True

    def is_transient(self, exc: BaseException) -> bool:
        """Whether a retry may fix *exc*, which `send` raised.

        A `ForwarderError` says so itself (``transient``); any `OSError`, connection
        errors and timeouts included, is transient; anything else is not.
        """
        return _is_transient(exc)

    # -- what the bus calls -------------------------------------------------------

    def check(self, event: Event) -> None:
        """Raise `InvalidEventError` if *event* could never be sent (called at emit time)."""
        limit = self.max_message_bytes
        if limit is None:
            return
        try:
            size = self.encoded_size(event)
        except (ValueError, TypeError) as exc:  # UnicodeError is a ValueError
            raise InvalidEventError(
                f"event {event.name!r} cannot be encoded by forwarder {self.name}: {exc}"
            ) from exc
        if size > limit:
            raise InvalidEventError(
                f"event {event.name!r} would be a {size}-byte message, over the {limit}-byte "
                f"limit of forwarder {self.name}; send a reference to the data instead"
            )

    async def ensure_started(self) -> None:
        """Run `start` once per event loop, however many sends race to be first.

        If the forwarder started on another event loop, its clients belong to
        that loop: log a warning, `abandon` them and `start` again on this one.
        """
        loop = asyncio.get_running_loop()
        if self._started and (self._loop is loop or not self.loop_bound):
            return
        lock = self._start_lock
        if lock is None or self._lock_loop is not loop:  # an asyncio.Lock binds to one loop
            lock = self._start_lock = asyncio.Lock()
            self._lock_loop = loop
        async with lock:
            if self._started and (self._loop is loop or not self.loop_bound):
                return
            if self._started:
                self._abandon_other_loop()
            await self.start()
            if self.verify_on_start:
                await self._verify_or_close()
            self._started = True
            self._loop = loop

    async def _verify_or_close(self) -> None:
        """`verify`; if it fails, `close` what `start` opened (the next try starts again)."""
        try:
            await self.verify()
        except BaseException:
            try:
                await self.close()
            except Exception:
                logger.exception("forwarder %s: closing after a failed verify failed", self.name)
            raise

    async def start_checked(self) -> None:
        """Start and `verify`; raise `ForwarderError` naming the forwarder if that fails.

        What the lifespan of ``bus.install`` runs at application startup for a
        forwarder with *verify_on_start*, so that a missing queue or topic,
        region or credentials stop the app at once. Failures a retry may fix
        (an unreachable broker) are retried per *retry* first, each logged at
        WARNING.
        """
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._bounded(self.ensure_started(), "start")
            except Exception as exc:
                transient = _is_transient_start_failure(exc)
                elapsed = time.monotonic() - started
                wait = self.retry.next_delay(attempt, elapsed) if transient else None
                if wait is None:
                    tries = f" after {attempt} attempts" if attempt > 1 else ""
                    what = str(exc).removeprefix(f"{self.name}: ") or repr(exc)
                    raise ForwarderError(
                        f"forwarder {self.name} failed its start-up check "
                        f"(verify_on_start=True){tries}: {what}",
                        transient=transient,
                    ) from exc
                logger.warning(
                    "forwarder %s: start-up check failed (attempt %d: %s); trying again in %.2fs",
                    self.name,
                    attempt,
                    exc,
                    wait,
                )
                await asyncio.sleep(wait)
            else:
                return

    def _abandon_other_loop(self) -> None:
        logger.warning(
            "forwarder %s: used on another event loop than the one it started on (an app run "
            "without its lifespan, or several asyncio.run calls); starting it again on this "
            "loop. Its clients from the previous loop are abandoned: they cannot be closed "
            "from here. Use `with TestClient(app) as client:`, or a single event loop, to "
            "avoid this",
            self.name,
        )
        self._started = False
        self._loop = None
        self.abandon()

    async def aclose(self) -> None:
        """Run `close` if `start` ran; `abandon` instead if it ran on another event loop."""
        if not self._started:
            return
        self._started = False
        loop, self._loop = self._loop, None
        if loop is not asyncio.get_running_loop():
            logger.warning(
                "forwarder %s: closed on another event loop than the one it started on; "
                "its clients are abandoned, not closed",
                self.name,
            )
            self.abandon()
            return
        await self.close()

    async def deliver(
        self, events: Sequence[Event], *, keep_unsent: bool = False
    ) -> DeliveryOutcome:
        """Send *events* with retries; dead-letter what still fails. Never raises.

        Transient failures are retried per *retry*. The log gets at most one
        WARNING per attempt number while the forwarder's batches are being
        retried, however many batches fail together (one per request during an
        outage), and one ERROR line per dead-lettered batch, listing its ids.

        With *keep_unsent* (the bus's spool), events that still fail for a
        transient reason when the retries run out are returned in
        ``outcome.unsent`` instead of being dead-lettered: the spool sends them
        again later. Events refused for good are dead-lettered either way.
        """
        pending = list(events)
        outcome = DeliveryOutcome()
        started = time.monotonic()
        attempt = 0
        retrying = sent = False
        try:
            while True:
                attempt += 1
                pending, error = await self._attempt(pending, outcome)
                if not pending:
                    sent = error is None
                    return outcome
                wait = self.retry.next_delay(attempt, time.monotonic() - started)
                if not retrying:
                    retrying = True
                    self._retries.begin()
                if wait is None:
                    await self._give_up(pending, attempt, error, outcome, keep_unsent)
                    return outcome
                self._retries.failed(self.name, attempt, len(pending), error, wait)
                self._retries.waiting += len(pending)
                try:
                    await asyncio.sleep(wait)
                finally:
                    self._retries.waiting -= len(pending)
        finally:
            if retrying:
                self._retries.end(self.name, delivered=sent)

    async def _give_up(
        self,
        pending: list[Event],
        attempt: int,
        error: BaseException | None,
        outcome: DeliveryOutcome,
        keep_unsent: bool,
    ) -> None:
        """The retries ran out: leave *pending* to the spool, or dead-letter it."""
        reason = f"gave up after {attempt} attempt(s): {error!r}"
        if keep_unsent:
            self._retries.failed(self.name, attempt, len(pending), error, None)
            outcome.unsent.extend(pending)
            outcome.error = repr(error)
        else:
            await self._dead_letter(pending, reason, error, outcome)

    async def _attempt(
        self, pending: list[Event], outcome: DeliveryOutcome
    ) -> tuple[list[Event], BaseException | None]:
        try:
            await self._bounded(self.ensure_started(), "start")
        except Exception as exc:
            if _is_transient_start_failure(exc):
                return pending, exc
            reason = f"permanent failure: start failed: {exc!r}"
            await self._dead_letter(pending, reason, exc, outcome)
            return [], exc
        try:
            delivery = await self._bounded(self.send(pending), "send")
        except Exception as exc:
            if self.is_transient(exc):
                return pending, exc
            if len(pending) > 1:
                if refused := await self._refuse_unsendable(pending, outcome):
                    rest = [event for event in pending if event.id not in refused]
                    return await self._attempt(rest, outcome) if rest else ([], exc)
                if self.may_be_one_message(exc):
                    return await self._halves(pending, outcome)
            await self._dead_letter(pending, f"permanent failure: {exc!r}", exc, outcome)
            return [], exc
        if delivery is None:
            return [], None
        if delivery.rejected:
            rejected = list(delivery.rejected)
            await self._dead_letter(rejected, f"rejected: {delivery.reason}", None, outcome)
        error = ForwarderError(delivery.reason or "partial failure", transient=True)
        return list(delivery.retry), error

    async def _halves(
        self, pending: list[Event], outcome: DeliveryOutcome
    ) -> tuple[list[Event], BaseException | None]:
        """A send of *pending* failed for good, and `check` refuses none of them: the broker
        may refuse one message and fail the whole call (a queue's lower size limit). Each half
        is sent on its own, in order, so that only what the broker refuses alone is
        dead-lettered; what it refuses for every message (a missing queue) costs a call per
        message more."""
        middle = len(pending) // 2
        retry: list[Event] = []
        error: BaseException | None = None
        for half in (pending[:middle], pending[middle:]):
            if retry:  # behind events to try again: kept behind them (a FIFO's order)
                retry += half
                continue
            unsent, error = await self._attempt(half, outcome)
            retry += unsent
        return retry, error

    async def _bounded(self, call: Awaitable[T], what: str) -> T:
        """Await *call* within `send_timeout`; past it, a transient `ForwarderError`. So is
        a `asyncio.CancelledError` it raises that no cancellation of this task explains; any
        other `BaseException` (but Ctrl-C, this coroutine closed) is a permanent one."""
        seconds = self.send_timeout
        limit = asyncio.timeout(seconds)
        try:
            async with limit:
                return await call
        except TimeoutError as exc:
            if not limit.expired():
                raise  # the call's own timeout: transient as it is
            message = f"forwarder {self.name}: {what} did not finish within {seconds:g}s"
            raise ForwarderError(message, transient=True) from exc
        except asyncio.CancelledError as exc:
            if cancelled():
                raise
            message = f"forwarder {self.name}: {what} raised CancelledError, nothing cancelled it"
            raise ForwarderError(message, transient=True) from exc
        except BaseException as exc:  # SystemExit, a library's own: out of the send's task,
            if isinstance(exc, Exception) or passes_through(exc):  # it would stop the loop,
                raise  # or vanish with the task, its events neither sent nor reported
            raise ForwarderError(f"forwarder {self.name}: {what} raised {exc!r}") from exc

    async def _refuse_unsendable(self, events: list[Event], outcome: DeliveryOutcome) -> set[str]:
        """After a send of *events* failed for good: dead-letter, each with its own reason,
        those `check` refuses now, and return their ids; the others are sent again at once.

        An event resent later (a spool's, an outbox's) was checked by the release that
        emitted it; one this release cannot encode (a new ``message_group_id``) must not
        take the rest of its send down with it.
        """
        refused: set[str] = set()
        for event in events:
            try:
                self.check(event)
            except Exception as exc:
                refused.add(event.id)
                await self._dead_letter([event], f"permanent failure: {exc!r}", exc, outcome)
        return refused

    async def _dead_letter(
        self,
        events: Sequence[Event],
        reason: str,
        exc: BaseException | None,
        outcome: DeliveryOutcome | None = None,
    ) -> None:
        if outcome is not None:
            outcome.dead.extend((event, reason) for event in events)
        await self.give_up(events, reason, exc)

    async def give_up(
        self, events: Sequence[Event], reason: str, exc: BaseException | None = None
    ) -> None:
        """Report *events* as not delivered: one ERROR line with their ids, and the
        ``dead_letter`` callback. The bus calls it for spooled events whose rounds ran out."""
        ids = ", ".join(event.id for event in events)
        logger.error(
            "forwarder %s: %d event(s) not delivered (%s): %s", self.name, len(events), reason, ids
        )
        await call_hook(self.dead_letter, DeadLetter(self.name, tuple(events), reason, exc))

    # -- async context manager ------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.ensure_started()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class EchoForwarder(Forwarder):
    """Prints every forwarded event as its SQS CloudEvent JSON, one per line. For debugging.

    Args:
        stream: Where to write (default: standard output, looked up at each send).
        retry: The retry policy for transient failures.
        dead_letter: Called with a `DeadLetter` for events that could not be delivered.
        name: A name for logs (default: the class name).
    """

    loop_bound = False
    """Nothing here is tied to an event loop."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        retry: Retry | None = None,
        dead_letter: OnDeadLetter | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(retry=retry, dead_letter=dead_letter, name=name)
        self.stream = stream
        """Where events are written (None: standard output)."""

    async def send(self, events: Sequence[Event]) -> None:
        """Write each event to the stream (standard output by default)."""
        stream = self.stream or sys.stdout
        for event in events:
            print(sqs_body(event), file=stream, flush=True)
