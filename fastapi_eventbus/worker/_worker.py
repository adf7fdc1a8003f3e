"""The `Worker`: receive forwarded events from a `Source`, run the bus's handlers on them."""

from __future__ import annotations

import asyncio
import logging
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any, Self

from fastapi_eventbus._bus import EventBus, is_request_bus
from fastapi_eventbus._deadline import cancelled
from fastapi_eventbus._settings import check_int, check_seconds
from fastapi_eventbus.exceptions import BusNotInstalledError, ConfigurationError, SourceError

from ._delivery import (
    GIVE_BACK_TIMEOUT,
    HeldMessage,
    OnUndecodable,
    OnUnhandled,
    Processor,
    WorkerStats,
    check_policies,
    listed,
    named,
)
from ._source import Backoff, ReceivedMessage, Source

logger = logging.getLogger("fastapi_eventbus.worker")

_RECEIVE_BACKOFF = Backoff(initial=0.5, maximum=30.0)
"""Waits between failed receive calls (jittered)."""
_CANCEL_GRACE = GIVE_BACK_TIMEOUT + 1.0
"""Seconds a message cancelled at shutdown has to stop (and give itself back) before it is
reported as still running and left behind."""
_MAX_MESSAGE_BYTES = 10_000_000
"""The default ``max_message_bytes``: the larger of the brokers' own limits (Pub/Sub 10 MB,
SQS 1 MiB), so that a worker takes every message a forwarder can send by default."""


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
        shutdown_timeout: Seconds `stop` waits for messages in flight (and for a
            receive call under way, if its source says cancelling it would leave
            what it receives invisible: `Source.receive_outlives_cancel`); those
            still running then are cancelled and given back for redelivery. One
            that does not stop within a few seconds more is reported at ERROR and
            left running: `stop` does not wait for it.
        on_undecodable: A message that is not an event is logged at ERROR and
            then, with ``"retry"`` (the default), given back like a failure, so
            that it reaches the broker's dead-letter queue (with a dead-letter
            policy; without one it keeps coming back, and the log line says so);
            with ``"delete"``, acknowledged and dropped.
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
        # 0 would be a busy loop of extend calls while each message's handlers run.
        check_seconds(
            f"{source!r}.extend_interval", source.extend_interval, positive=True, optional=True
        )
        check_policies(on_undecodable, on_unhandled, max_message_bytes)
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
        self._processor = Processor(self, self._watch)
        self._slots = asyncio.Semaphore(concurrency)
        self._in_flight: dict[asyncio.Task[None], HeldMessage] = {}
        self._abandoned: dict[asyncio.Task[None], HeldMessage] = {}
        """Abandoned messages whose tasks still run: their slots are free already."""
        self._giving_back: set[asyncio.Task[None]] = set()
        """Give-backs under way (of abandoned messages, of what a receive brought as the
        worker stopped), each bounded in time: stopping waits for them."""
        self._let_go = asyncio.Event()
        """Set when a message in flight is given up (`_abandon`)."""
        self._last: dict[str, asyncio.Future[bool]] = {}
        """Of each order key: the future of the last message received with it."""
        self._stopping = asyncio.Event()
        self._receiving = False
        """Whether a `Source.receive` call is under way."""
        self._order_unknown = False
        """Whether `Source.ordered` is None (learned at a receive): checked after each."""
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
                self._warn_if_order_unguarded()
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
            "deleted" if self.on_unhandled == "delete" else "given back, to come again",
            self.on_unhandled,
        )

    def _warn_if_order_unguarded(self) -> None:
        """At start, and after each receive while the source does not know yet (then once
        it learns that it orders them: the default `PubSubSource` on an ordered subscription)."""
        ordered = self.source.ordered
        self._order_unknown = ordered is None
        if not ordered or self.source.extend_interval is not None:
            return
        logger.warning(
            "%s keeps each group's messages in order, and the worker has no heartbeat "
            "(--visibility-timeout, --ack-deadline): a message waiting for the one before it "
            "keeps only the visibility timeout (ack deadline) it was received with, which must "
            "then cover the handlers of its whole group; else it comes again, out of order",
            self.source.name,
        )

    def in_flight(self) -> list[str]:
        """The messages being handled now, each its id and event, for a report."""
        return [str(held) for held in list(self._in_flight.values())]

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
            stopping.cancel()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            if timeout <= 0 or not self._cancel_would_hide(receiver):  # else let the poll
                await self._stop_receiving(receiver)  # under way return meanwhile
            try:
                await asyncio.wait({stopping})
                await self._finish(timeout)  # the receive call under way ends meanwhile
                if not receiver.done() and (left := deadline - loop.time()) > 0:
                    await asyncio.wait({receiver}, timeout=left)
            finally:
                await self._stop_receiving(receiver)
                if self._giving_back:
                    await asyncio.wait(set(self._giving_back))
        if not receiver.cancelled() and (error := receiver.exception()) is not None:
            raise error

    def _cancel_would_hide(self, receiver: asyncio.Task[None]) -> bool:
        """Whether *receiver* is in a receive call that cancelling would not end on the broker
        (a long poll: `Source.receive_outlives_cancel`), which would then hide what it takes:
        `_consume` lets it return (and give back at once what it brought) if time allows."""
        return not receiver.done() and self._receiving and self.source.receive_outlives_cancel

    async def _stop_receiving(self, receiver: asyncio.Task[None]) -> None:
        """Cancel the receive loop; say so if that cancels a call the broker goes on with."""
        if self._cancel_would_hide(receiver):
            logger.warning(
                "stopping while a receive call on %s is under way: what the broker hands it "
                "stays invisible until its visibility timeout (ack deadline)",
                self.source.name,
            )
        receiver.cancel()
        await asyncio.wait({receiver})

    async def _receive_loop(self) -> None:
        failures = 0
        while True:
            count = await self._reserve()
            self._receiving = True
            try:
                messages = await self.source.receive(count)
            except (Exception, asyncio.CancelledError) as exc:
                self._receiving = False
                self._release(count)
                if isinstance(exc, asyncio.CancelledError) and cancelled():
                    raise  # stopped: not a failure of the source
                if isinstance(exc, SourceError) and not exc.transient:
                    logger.error("worker stopping: %s", exc)
                    raise
                if self._stopping.is_set():  # stopped meanwhile: no retry
                    return
                failures += 1
                await self._back_off(exc, failures)
                continue
            self._receiving = False
            if self._order_unknown:
                self._warn_if_order_unguarded()
            if self._stopping.is_set():  # stopped while receiving: none of them starts
                self._release(count)
                await self._give_back_received(messages)
                return
            if failures:
                logger.info("receiving from %s again", self.source.name)
                failures = 0
            self._release(count - len(messages))
            for index, message in enumerate(messages):
                if index >= count:  # a source returned more than asked for
                    try:
                        await self._slots.acquire()
                    except asyncio.CancelledError:  # stopped: the rest go back unhandled,
                        await self._give_back_received(messages[index:])  # not left unseen
                        raise
                self._start(message)

    async def _give_back_received(self, messages: Sequence[ReceivedMessage]) -> None:
        """Give *messages*, received as the worker stopped, back at once, unhandled."""
        if not messages:
            return
        logger.warning(
            "%d message(s) received as the worker stopped go back unhandled: %s",
            len(messages),
            ", ".join(named(message) for message in messages),
        )
        await asyncio.wait({self._hand_back(message, 0) for message in messages})

    def _hand_back(self, message: ReceivedMessage, delay: float | None) -> asyncio.Task[None]:
        """Give *message* back after *delay* seconds, in a task that stopping waits for."""
        task = asyncio.create_task(self._processor.hand_back(message, delay))
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)
        return task

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

    async def _back_off(self, exc: BaseException, failures: int) -> None:
        delay = _RECEIVE_BACKOFF.jittered(failures)
        logger.warning(
            "receiving from %s failed (%s); retrying in %.1fs",
            self.source.name,
            str(exc) or type(exc).__name__,
            delay,
            exc_info=None if isinstance(exc, SourceError) else exc,
        )
        await asyncio.sleep(delay)

    # -- messages -------------------------------------------------------------------

    def _start(self, message: ReceivedMessage) -> None:
        """`_spawn` *message*; if that fails (a source's malformed message, a bug), that
        message alone fails: its slot is freed, an ERROR names it, and it is given back."""
        try:
            self._spawn(message)
        except Exception:
            self._slots.release()
            logger.exception(
                "message %s from %s could not be started; giving it back",
                named(message),
                self.source.name,
            )
            self._hand_back(message, None)

    def _spawn(self, message: ReceivedMessage) -> None:
        """Process *message* in a task of its own, holding the slot reserved for it."""
        self.stats.received += 1
        held = HeldMessage(message)
        if any(
            h.message.message_id == message.message_id and not h.settling
            for h in self._in_flight.values()
        ):
            logger.warning(
                "message %s from %s came again while it is being handled: its visibility "
                "timeout (ack deadline) ran out first, and its handlers run twice at once; "
                "give the source a longer one, or a heartbeat (--visibility-timeout, "
                "--ack-deadline)",
                message.message_id,
                self.source.name,
            )
        if (key := message.order_key) is not None:  # after the one before it in its group
            held.after = self._last.get(key)
            held.settled = self._last[key] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._processor.process(held))
        self._in_flight[task] = held
        task.add_done_callback(self._processed)

    def _processed(self, task: asyncio.Task[None]) -> None:
        """*task* is done: free its slot (unless abandoned), report an unexpected failure."""
        held = self._in_flight.pop(task, None)
        if held is None:  # abandoned earlier: its slot is free already
            held = self._abandoned.pop(task)
        else:
            if held.timer is not None:
                held.timer.cancel()
            self._slots.release()
        self._settle_order(held)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error(
                "processing message %s failed unexpectedly; it comes again when its "
                "visibility timeout (ack deadline) ends",
                held,
                exc_info=error,
            )

    def _settle_order(self, held: HeldMessage) -> None:
        """*held* is settled (or given up): the next message of its group may start."""
        settled = held.settled
        if settled is None or settled.done():  # no order key, or settled already (abandoned)
            return
        settled.set_result(held.handled and not held.abandoned)
        key = held.message.order_key
        if key is not None and self._last.get(key) is settled:
            del self._last[key]

    # -- time limits ----------------------------------------------------------------

    def _watch(self, held: HeldMessage, hold: float | None) -> None:
        """Abandon *held* if its task still runs *hold* seconds from now."""
        task = asyncio.current_task()
        if hold is None or task is None:
            return
        loop = asyncio.get_running_loop()
        held.timer = loop.call_later(hold, self._overdue, task, hold)

    def _overdue(self, task: asyncio.Task[None], hold: float) -> None:
        """*task*'s time is up: abandon its message if it still runs."""
        held = self._in_flight.get(task)
        if held is None or task.done():
            return
        why = f"is still running {hold:g}s after its handlers started"
        cause = "a handler ignores its time limit, or the events they emitted take that long"
        self._abandon(task, held, why, cause, None)

    def _abandon(
        self,
        task: asyncio.Task[None],
        held: HeldMessage,
        why: str,
        cause: str,
        delay: float | None,
    ) -> None:
        """Give *held* back while *task* runs on; free its slot; report it at ERROR."""
        self._abandoned[task] = self._in_flight.pop(task)
        self._let_go.set()  # `_settled` waits for it no more
        self._slots.release()
        held.abandoned = True
        if held.beats is not None:  # given back: extending it again would hide it again
            held.beats.cancel()
        self._settle_order(held)
        self.stats.abandoned += 1
        logger.error(
            "message %s from %s %s; giving it back and leaving it running (%s)",
            held,
            self.source.name,
            why,
            cause,
        )
        self._hand_back(held.message, delay)

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
                pending = await self._settled(tasks, timeout)
            except asyncio.CancelledError:  # stopped at once: do not leave them running
                await self._cancel(tasks)
                if self._giving_back:  # before the source closes, each bounded in time
                    await asyncio.wait(set(self._giving_back))
                raise
            if pending:
                logger.warning("%d message(s) did not finish within %.1fs", len(pending), timeout)
        await self._cancel(pending)
        if self._giving_back:
            await asyncio.wait(set(self._giving_back))  # each bounded by GIVE_BACK_TIMEOUT

    async def _settled(
        self, tasks: set[asyncio.Task[None]], timeout: float
    ) -> set[asyncio.Task[None]]:
        """Wait up to *timeout* seconds until each of *tasks* is done or given up (`_abandon`:
        left running, no longer the worker's to wait for); those still in flight then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (waiting := {t for t in tasks if t in self._in_flight and not t.done()}) and (
            left := deadline - loop.time()
        ) > 0:
            self._let_go.clear()
            let_go = asyncio.ensure_future(self._let_go.wait())
            try:
                await asyncio.wait({*waiting, let_go}, timeout=left, return_when=FIRST_COMPLETED)
            finally:
                let_go.cancel()
        return waiting

    async def _cancel(self, tasks: Iterable[asyncio.Task[None]]) -> None:
        """Cancel *tasks*, each of which gives its message back; abandon those still running
        `_CANCEL_GRACE` seconds later. Cancel the abandoned ones too, without waiting."""
        left = {task: held for task, held in self._abandoned.items() if not task.done()}
        for task in left:
            task.cancel()
        if left:
            logger.warning(
                "cancelling %d abandoned message(s), without waiting for them: %s",
                len(left),
                listed(left.values()),
            )
        pending = {task for task in tasks if not task.done() and task in self._in_flight}
        if not pending:
            return
        # Those settling already are handled (or failed): their cancelled settlement is
        # counted and logged as a settle error, once (`Processor._settle`).
        unfinished = [self._in_flight[t] for t in pending if not self._in_flight[t].settling]
        if unfinished:
            self.stats.unfinished += len(unfinished)
            logger.warning(
                "cancelling %d message(s); they go back for redelivery: %s",
                len(unfinished),
                listed(unfinished),
            )
        for task in pending:
            task.cancel()
        _, running = await asyncio.wait(pending, timeout=_CANCEL_GRACE)
        why = f"did not stop within {_CANCEL_GRACE:g}s of being cancelled at shutdown"
        cause = "a handler ignores cancellation"
        for task in running:
            if (held := self._in_flight.get(task)) is not None:
                self._abandon(task, held, why, cause, 0)


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
