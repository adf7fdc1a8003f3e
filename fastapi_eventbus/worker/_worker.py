"""The `Worker`: receive forwarded events from a `Source`, run the bus's handlers on them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeAlias, get_args

from fastapi_eventbus._bus import EventBus, is_request_bus, tracing_of
from fastapi_eventbus._events import Event
from fastapi_eventbus._settings import check_int, check_seconds
from fastapi_eventbus._tracing import Consumed, Tracing
from fastapi_eventbus.exceptions import (
    BusNotInstalledError,
    ConfigurationError,
    MessageDecodeError,
    SourceError,
)

from ._source import Backoff, ReceivedMessage, Source

logger = logging.getLogger("fastapi_eventbus.worker")

OnUndecodable: TypeAlias = Literal["retry", "delete"]
"""What a worker does with a message it cannot decode (see `Worker`)."""
OnUnhandled: TypeAlias = Literal["retry", "delete"]
"""What a worker does with an event that no handler of its bus matches (see `Worker`)."""

_RECEIVE_BACKOFF = Backoff(initial=0.5, maximum=30.0)
"""Waits between failed receive calls (jittered)."""
_GIVE_BACK_TIMEOUT = 5.0
"""Seconds allowed for giving a message back to the broker at once (shutdown, abandon)."""
_CANCEL_GRACE = _GIVE_BACK_TIMEOUT + 1.0
"""Seconds a message cancelled at shutdown has to stop (and give itself back) before it is
reported as still running and left behind."""
_MIN_OVERTIME = 5.0
"""The least time a message gets past its handlers' time limit (see `_hold`)."""
_MAX_MESSAGE_BYTES = 10_000_000
"""The default ``max_message_bytes``: the larger of the brokers' own limits (Pub/Sub 10 MB,
SQS 1 MiB), so that a worker takes every message a forwarder can send by default."""


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
    """Acknowledgements (or give-backs) the broker did not take: those messages come again."""
    unhandled: int = 0
    """Messages whose event no handler of the bus matches (handled per ``on_unhandled``)."""
    abandoned: int = 0
    """Messages whose handlers were still running past their time limit, or after being
    cancelled at shutdown: given back, reported at ERROR, and left running."""


@dataclass(eq=False, slots=True)
class _Delivery:
    """A message the worker holds, from its receipt until it is settled or given up."""

    message: ReceivedMessage
    event: Event | None = None
    """The decoded event, once decoded (for reports)."""
    abandoned: bool = False
    """Given back while its task still ran: the task settles nothing any more."""
    timer: asyncio.TimerHandle | None = None
    """Fires when the handlers have had their time (`Worker._overdue`)."""

    def __str__(self) -> str:
        event = self.event
        name = self.message.message_id
        return name if event is None else f"{name} (event {event.name!r} id={event.id})"


class Worker:
    """Receives forwarded events from a `Source` and runs the bus's local handlers on them.

    Each message is decoded by its source (`Source.decode`) and handed to
    `EventBus.handle`: the handlers get the same dependency injection as in the
    web app, the app's ``dependency_overrides`` included. The message is
    acknowledged (SQS: deleted) only when every matching handler succeeded;
    otherwise it is given back (SQS: its visibility timeout set by backoff;
    Pub/Sub: nacked), and the broker delivers it again, or moves it to its
    dead-letter queue after its maximum number of deliveries. Delivery is
    at-least-once: use ``event.id`` to deduplicate.

    While the handlers run, the worker calls `Source.extend` every
    `Source.extend_interval` seconds (SQS: ``visibility_timeout``, Pub/Sub:
    ``ack_deadline``), so that the broker does not deliver the message again
    meanwhile; a failed extension is logged at WARNING. That heartbeat lasts as
    long as the handlers may: the sum of the time limits of the handlers the
    event matches (they run one after the other; see ``EventBus(handler_timeout=)``)
    plus as much again, at least 5 s more, for the events they emit. A message
    still running then is *abandoned*: logged at ERROR with its ids, given back
    like a failure (so that a hung message reaches the dead-letter queue), and its
    slot freed; its handlers, which ignored their time limit, are left running.
    With a handler that has no time limit (``timeout=math.inf``, or
    ``handler_timeout=None``), the heartbeat lasts until the handlers return.

    Args:
        app: A FastAPI app with an installed bus (``bus.install(app)``), or an
            `EventBus`. With an app, the worker runs the app's lifespan around
            its work, so startup code (pools, clients) runs as in the web app.
        source: Where messages come from: `SQSSource`, `PubSubSource`, your own.
        concurrency: The most messages handled at once (and received ahead).
        shutdown_timeout: Seconds `stop` waits for messages in flight; those
            still running then are cancelled and given back for redelivery. One
            that does not stop within a few seconds more is reported at ERROR and
            left running: `stop` does not wait for it.
        on_undecodable: A message that is not an event is logged at ERROR and
            then, with ``"retry"`` (the default), given back like a failure, so
            that it reaches the broker's dead-letter queue; with ``"delete"``,
            acknowledged and dropped.
        on_unhandled: An event that no handler of the bus matches (a forward-only
            app passed by mistake, a pattern with a typo) is never acknowledged as
            if it had been handled: with ``"retry"`` (the default), it is logged at
            ERROR (event name and id) and given back like a failure, so that it
            reaches the dead-letter queue; with ``"delete"``, logged at WARNING and
            acknowledged. Both count in ``stats.unhandled``.
        max_message_bytes: The largest message decoded, counted as its source's
            `Source.message_size` counts it (body plus attributes).
            A larger one is never decoded: it is logged and handled like a message
            that is not an event (``on_undecodable``). The default, 10,000,000, takes
            anything the brokers deliver; lower it to what your events need.

    Use ``await worker.run()`` (until `stop`) or ``async with worker:`` (runs in
    the background inside the block, stops gracefully at its end).
    """

    def __init__(
        self,
        app: Any,
        source: Source,
        *,
        concurrency: int = 10,
        shutdown_timeout: float = 30.0,
        on_undecodable: OnUndecodable = "retry",
        on_unhandled: OnUnhandled = "retry",
        max_message_bytes: int = _MAX_MESSAGE_BYTES,
    ) -> None:
        self.bus, self.app = _resolve(app)
        if not isinstance(source, Source):
            raise ConfigurationError(f"source must be a Source, got {source!r}")
        check_int("concurrency", concurrency, 1)
        check_seconds("shutdown_timeout", shutdown_timeout)
        for name, policy in (("on_undecodable", on_undecodable), ("on_unhandled", on_unhandled)):
            if policy not in get_args(OnUndecodable):
                raise ConfigurationError(f"{name} must be 'retry' or 'delete', got {policy!r}")
        check_int("max_message_bytes", max_message_bytes, 1)
        self.source = source
        """Where messages come from."""
        self.concurrency = concurrency
        """The most messages handled at once."""
        self.shutdown_timeout = float(shutdown_timeout)
        """Seconds `stop` waits for messages in flight."""
        self.on_undecodable: OnUndecodable = on_undecodable
        """What happens to a message that is not an event: ``"retry"`` or ``"delete"``."""
        self.on_unhandled: OnUnhandled = on_unhandled
        """What happens to an event no handler matches: ``"retry"`` or ``"delete"``."""
        self.max_message_bytes = max_message_bytes
        """The largest message decoded."""
        self.stats = WorkerStats()
        """What the worker has done so far."""
        self._slots = asyncio.Semaphore(concurrency)
        self._in_flight: dict[asyncio.Task[None], _Delivery] = {}
        self._abandoned: dict[asyncio.Task[None], _Delivery] = {}
        """Abandoned messages whose tasks still run: their slots are free already."""
        self._giving_back: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()
        self._done = asyncio.Event()
        self._ran = False
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Worker {self.source!r} concurrency={self.concurrency}>"

    # -- running --------------------------------------------------------------------

    async def run(self) -> None:
        """Receive and handle messages until `stop` is called, then shut down gracefully.

        Enters the app's lifespan and starts the source first; at the end waits
        for messages in flight (up to ``shutdown_timeout``), closes the source,
        and exits the lifespan (or closes the bus). Transient receive errors are
        logged and retried with backoff; a `SourceError` that is not transient
        (a missing queue, a denied permission) stops the worker and is raised.
        """
        if self._ran:
            raise ConfigurationError("this Worker has already run; create a new one")
        self._ran = True
        try:
            async with self._resources():
                self._ready.set()
                logger.info(
                    "worker started: receiving from %s, %d at a time", self.source, self.concurrency
                )
                self._warn_if_no_handlers()
                await self._consume()
        finally:
            self._done.set()
        logger.info("worker stopped: %s", self.stats)

    def _warn_if_no_handlers(self) -> None:
        if self.bus.handles():
            return
        logger.warning(
            "the bus has no handlers: no message can be handled; each one is %s "
            "(on_unhandled=%r). Is APP the worker's app, with its handlers registered?",
            "deleted" if self.on_unhandled == "delete" else "given back (dead-letter queue)",
            self.on_unhandled,
        )

    async def stop(self) -> None:
        """Stop receiving, finish the messages in flight, and wait until `run` has returned."""
        self._stopping.set()
        if self._ran:
            await self._done.wait()

    async def __aenter__(self) -> Self:
        task = self._task = asyncio.create_task(self.run())
        ready = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            ready.cancel()
        if task.done():
            task.result()  # the startup error, if any
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
        task, self._task = self._task, None
        if task is None:
            return
        if exc is None:
            await task
        elif not task.cancelled() and task.exception() is not None:
            logger.error("the worker failed too", exc_info=task.exception())

    @asynccontextmanager
    async def _resources(self) -> AsyncIterator[None]:
        """The app's lifespan (or, for a bare bus, `EventBus.close`), then the source."""
        async with AsyncExitStack() as stack:
            if self.app is None:
                stack.push_async_callback(self.bus.close)
            else:
                # The installed lifespan gives its state to handler calls (EventBus.install).
                await stack.enter_async_context(self.app.router.lifespan_context(self.app))
            await stack.enter_async_context(self.source)
            yield

    async def _consume(self) -> None:
        """Receive until stopped (or a fatal error), then finish what is in flight."""
        receiver = asyncio.create_task(self._receive_loop())
        stopping = asyncio.create_task(self._stopping.wait())
        timeout = self.shutdown_timeout
        try:
            await asyncio.wait({receiver, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            timeout = 0.0  # cancelled, not stopped: give unfinished messages back at once
            raise
        finally:
            receiver.cancel()
            stopping.cancel()
            await asyncio.wait({receiver, stopping})
            await self._finish(timeout)
        if not receiver.cancelled() and (error := receiver.exception()) is not None:
            raise error

    async def _receive_loop(self) -> None:
        failures = 0
        while True:
            count = await self._reserve()
            try:
                messages = await self.source.receive(count)
            except Exception as exc:
                self._release(count)
                if isinstance(exc, SourceError) and not exc.transient:
                    logger.error("worker stopping: %s", exc)
                    raise
                failures += 1
                await self._back_off(exc, failures)
                continue
            if failures:
                logger.info("receiving from %s again", self.source.name)
                failures = 0
            self._release(count - len(messages))
            for index, message in enumerate(messages):
                if index >= count:  # a source returned more than asked for
                    await self._slots.acquire()
                self._spawn(message)

    async def _reserve(self) -> int:
        """Wait for a free slot, then take as many free ones as one receive may fill."""
        await self._slots.acquire()
        count = 1
        while count < self.source.max_messages and not self._slots.locked():
            await self._slots.acquire()
            count += 1
        return count

    def _release(self, count: int) -> None:
        for _ in range(count):
            self._slots.release()

    async def _back_off(self, exc: Exception, failures: int) -> None:
        delay = _RECEIVE_BACKOFF.jittered(failures)
        logger.warning(
            "receiving from %s failed (%s); retrying in %.1fs",
            self.source.name,
            exc,
            delay,
            exc_info=None if isinstance(exc, SourceError) else exc,
        )
        await asyncio.sleep(delay)

    # -- messages -------------------------------------------------------------------

    def _spawn(self, message: ReceivedMessage) -> None:
        self.stats.received += 1
        delivery = _Delivery(message)
        task = asyncio.create_task(self._process(delivery))
        self._in_flight[task] = delivery
        task.add_done_callback(self._processed)

    def _processed(self, task: asyncio.Task[None]) -> None:
        delivery = self._in_flight.pop(task, None)
        if delivery is None:  # abandoned earlier: its slot is free already
            delivery = self._abandoned.pop(task)
        else:
            if delivery.timer is not None:
                delivery.timer.cancel()
            self._slots.release()
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error(
                "processing message %s failed unexpectedly; it comes again when its "
                "visibility timeout (ack deadline) ends",
                delivery,
                exc_info=error,
            )

    async def _process(self, delivery: _Delivery) -> None:
        message = delivery.message
        tracing = tracing_of(self.bus)
        if tracing is None:
            handled = await self._given_back_if_cancelled(delivery, None)
            if not delivery.abandoned:
                await self._settle(message, handled)
            return
        with tracing.consuming(self.source, message) as consumed:
            handled = await self._given_back_if_cancelled(delivery, consumed)
            if not delivery.abandoned:
                await self._settle(message, handled, tracing)

    async def _given_back_if_cancelled(
        self, delivery: _Delivery, consumed: Consumed | None
    ) -> bool:
        try:
            return await self._handle(delivery, consumed)
        except asyncio.CancelledError as exc:
            tracing = tracing_of(self.bus) if consumed is not None else None
            if consumed is not None:
                consumed.failure, consumed.error = "cancelled at shutdown; given back", exc
            if not delivery.abandoned:
                await self._give_back(delivery.message, tracing)
            raise

    async def _handle(self, delivery: _Delivery, consumed: Consumed | None) -> bool:
        """Decode and handle *delivery*'s message; whether to acknowledge it."""
        message = delivery.message
        decoded = self._decode(message)
        if not isinstance(decoded, Event):
            return self._undecodable(message, consumed, *decoded)
        event = delivery.event = decoded
        if consumed is not None:
            consumed.event = event
        if not self.bus.handles(event.name):
            return self._unhandled(delivery, consumed)
        hold = _hold(self.bus.time_limit(event.name))
        self._watch(delivery, hold)
        try:
            async with self._heartbeat(message, hold):
                failures = await self.bus.handle(event)
        except Exception as exc:
            logger.exception("handling event %r (id=%s) failed", event.name, event.id)
            failures = None
            if consumed is not None:
                consumed.error = exc
        if delivery.abandoned:
            logger.warning(
                "message %s finished after it was given back: not acknowledged", delivery
            )
            return False
        if failures == []:
            self.stats.handled += 1
            return True
        self.stats.failed += 1
        logger.warning(
            "event %r (id=%s) failed; message %s goes back to %s (delivery %s)",
            event.name,
            event.id,
            message.message_id,
            self.source.name,
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
        try:
            size = self.source.message_size(message)
            if size > self.max_message_bytes:
                return "too large to decode", MessageDecodeError(
                    f"{size} bytes, over max_message_bytes={self.max_message_bytes}"
                )
            return self.source.decode(message)
        except MessageDecodeError as exc:
            return "not an event", exc
        except Exception as exc:
            return "not decodable", exc

    def _undecodable(
        self,
        message: ReceivedMessage,
        consumed: Consumed | None,
        failure: str,
        error: Exception,
    ) -> bool:
        """Log *message*, which will not be handled; whether to acknowledge it (the policy)."""
        self.stats.undecodable += 1
        delete = self.on_undecodable == "delete"
        expected = isinstance(error, MessageDecodeError)
        logger.error(
            "message %s from %s is %s (%s); %s",
            message.message_id,
            self.source.name,
            failure,
            error if expected else f"{type(error).__name__}: {error}",
            "deleting it" if delete else "giving it back: the dead-letter queue will take it",
            exc_info=None if expected else error,
        )
        if consumed is not None:
            consumed.failure, consumed.error = failure, error
        return delete

    def _unhandled(self, delivery: _Delivery, consumed: Consumed | None) -> bool:
        """Log *delivery*'s event, which no handler matches; whether to acknowledge it."""
        self.stats.unhandled += 1
        delete = self.on_unhandled == "delete"
        logger.log(
            logging.WARNING if delete else logging.ERROR,
            "message %s from %s matches no handler of the bus; %s (on_unhandled=%r)",
            delivery,
            self.source.name,
            "deleting it" if delete else "giving it back: the dead-letter queue will take it",
            self.on_unhandled,
        )
        if consumed is not None:
            consumed.failure = "no handler matches the event"
        return delete

    # -- time limits ----------------------------------------------------------------

    def _watch(self, delivery: _Delivery, hold: float | None) -> None:
        """Abandon *delivery* if its task still runs *hold* seconds from now."""
        task = asyncio.current_task()
        if hold is None or task is None:
            return
        loop = asyncio.get_running_loop()
        delivery.timer = loop.call_later(hold, self._overdue, task, hold)

    def _overdue(self, task: asyncio.Task[None], hold: float) -> None:
        delivery = self._in_flight.get(task)
        if delivery is None or task.done():
            return
        why = f"is still running {hold:g}s after its handlers started"
        cause = "a handler ignores its time limit, or the events they emitted take that long"
        self._abandon(task, delivery, why, cause, None)

    def _abandon(
        self,
        task: asyncio.Task[None],
        delivery: _Delivery,
        why: str,
        cause: str,
        delay: float | None,
    ) -> None:
        """Give *delivery* back while *task* runs on; free its slot; report it at ERROR."""
        self._abandoned[task] = self._in_flight.pop(task)
        self._slots.release()
        delivery.abandoned = True
        self.stats.abandoned += 1
        logger.error(
            "message %s from %s %s; giving it back and leaving it running (%s)",
            delivery,
            self.source.name,
            why,
            cause,
        )
        giving_back = asyncio.create_task(self._hand_back(delivery.message, delay))
        self._giving_back.add(giving_back)
        giving_back.add_done_callback(self._giving_back.discard)

    async def _hand_back(self, message: ReceivedMessage, delay: float | None) -> None:
        """Give *message* back after *delay* seconds (None: like a failure), bounded in time."""
        try:
            async with asyncio.timeout(_GIVE_BACK_TIMEOUT):
                await self.source.nack(message, delay)
        except Exception as exc:
            self.stats.settle_errors += 1
            logger.warning(
                "could not give back message %s on %s (%s); it comes again when its "
                "visibility timeout (ack deadline) ends",
                message.message_id,
                self.source.name,
                str(exc) or type(exc).__name__,
            )

    @asynccontextmanager
    async def _heartbeat(self, message: ReceivedMessage, hold: float | None) -> AsyncIterator[None]:
        """Extend *message*'s visibility (ack deadline) in the background inside the block,
        for up to *hold* seconds (None: as long as the block lasts)."""
        interval = self.source.extend_interval
        if interval is None:
            yield
            return
        until = None if hold is None else asyncio.get_running_loop().time() + hold
        beats = asyncio.create_task(self._keep_invisible(message, interval, until))
        try:
            yield
        finally:
            beats.cancel()
            await asyncio.wait({beats})

    async def _keep_invisible(
        self, message: ReceivedMessage, interval: float, until: float | None
    ) -> None:
        """Call `Source.extend` every *interval* seconds until *until* (loop time; None:
        until cancelled); the last call extends to *until* exactly. A failure is logged,
        then retried at the next beat."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            seconds = None if until is None else until - loop.time()
            if seconds is not None and seconds <= 0:
                return
            last = seconds is not None and seconds <= interval
            try:
                await self.source.extend(message, seconds if last else None)
            except Exception as exc:
                logger.warning(
                    "could not extend the visibility of message %s on %s (%s); "
                    "it may be delivered again while its handlers run",
                    message.message_id,
                    self.source.name,
                    exc,
                )
            if last:
                return

    # -- settling -------------------------------------------------------------------

    async def _settle(
        self, message: ReceivedMessage, handled: bool, tracing: Tracing | None = None
    ) -> None:
        """Acknowledge *message*, or give it back; a failure here means a redelivery."""
        settle = self.source.ack(message) if handled else self.source.nack(message)
        try:
            if tracing is None:
                await settle
            else:
                with tracing.settling(self.source, message, "ack" if handled else "nack"):
                    await settle
        except Exception as exc:
            self.stats.settle_errors += 1
            logger.warning(
                "could not %s message %s on %s (%s); it will be delivered again",
                "acknowledge" if handled else "give back",
                message.message_id,
                self.source.name,
                exc,
            )

    async def _give_back(self, message: ReceivedMessage, tracing: Tracing | None = None) -> None:
        """At shutdown: make an unfinished message available again at once (best effort)."""
        if tracing is None:
            await self._hand_back(message, 0)
            return
        with tracing.settling(self.source, message, "nack"):
            await self._hand_back(message, 0)

    # -- shutdown -------------------------------------------------------------------

    async def _finish(self, timeout: float) -> None:
        """Wait up to *timeout* seconds for messages in flight; cancel (give back) the rest.

        Bounded: a message that does not stop within `_CANCEL_GRACE` seconds of being
        cancelled is reported at ERROR and left running.
        """
        tasks = set(self._in_flight)
        pending: set[asyncio.Task[None]] = set()
        if tasks:
            logger.info("waiting up to %.1fs for %d message(s) in flight", timeout, len(tasks))
            try:
                _, pending = await asyncio.wait(tasks, timeout=timeout)
            except asyncio.CancelledError:  # stopped at once: do not leave them running
                await self._cancel(tasks)
                raise
            if pending:
                logger.warning("%d message(s) did not finish within %.1fs", len(pending), timeout)
        await self._cancel(pending)
        if self._giving_back:
            await asyncio.wait(set(self._giving_back))  # each bounded by _GIVE_BACK_TIMEOUT

    async def _cancel(self, tasks: Iterable[asyncio.Task[None]]) -> None:
        """Cancel *tasks*, each of which gives its message back; abandon those still running
        `_CANCEL_GRACE` seconds later. Cancel the abandoned ones too, without waiting."""
        left = {task: delivery for task, delivery in self._abandoned.items() if not task.done()}
        for task in left:
            task.cancel()
        if left:
            logger.warning(
                "cancelling %d abandoned message(s), without waiting for them: %s",
                len(left),
                _listed(left.values()),
            )
        pending = {task for task in tasks if not task.done() and task in self._in_flight}
        if not pending:
            return
        self.stats.unfinished += len(pending)
        logger.warning(
            "cancelling %d message(s); they go back for redelivery: %s",
            len(pending),
            _listed(self._in_flight[task] for task in pending),
        )
        for task in pending:
            task.cancel()
        _, running = await asyncio.wait(pending, timeout=_CANCEL_GRACE)
        why = f"did not stop within {_CANCEL_GRACE:g}s of being cancelled at shutdown"
        cause = "a handler ignores cancellation"
        for task in running:
            if (delivery := self._in_flight.get(task)) is not None:
                self._abandon(task, delivery, why, cause, 0)


def _hold(limit: float | None) -> float | None:
    """How long a message may keep its slot and heartbeat, its handlers' *limit* given.

    The handlers' time limit (`EventBus.time_limit`), plus as much again and at
    least `_MIN_OVERTIME` seconds, for the events they emit (handled and
    forwarded before the message is acknowledged) and for unwinding. None when
    one of them has no time limit.
    """
    return None if limit is None else limit + max(limit, _MIN_OVERTIME)


def _listed(deliveries: Iterable[_Delivery]) -> str:
    return ", ".join(str(delivery) for delivery in deliveries)


def _resolve(target: object) -> tuple[EventBus, Any]:
    """The bus to run, and the app whose lifespan to enter (None for a bare bus)."""
    if isinstance(target, EventBus):
        if is_request_bus(target):
            raise ConfigurationError("a Worker needs the application bus, not a request's bus")
        return target, None
    try:
        bus = EventBus.of(target)
    except BusNotInstalledError:
        bus = None
    if bus is None or not hasattr(getattr(target, "router", None), "routes"):
        raise ConfigurationError(
            f"a Worker needs an EventBus or an app with one installed (bus.install(app)); "
            f"got {target!r}"
        )
    return bus, target
