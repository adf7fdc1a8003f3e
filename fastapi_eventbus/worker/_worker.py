"""The `Worker`: receive forwarded events from a `Source`, run the bus's handlers on them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeAlias, get_args

from fastapi_eventbus._bus import STATE_ATTR, EventBus
from fastapi_eventbus._tracing import Consumed, Tracing
from fastapi_eventbus.exceptions import ConfigurationError, MessageDecodeError, SourceError
from fastapi_eventbus.wire import decode_message, message_size

from ._source import Backoff, ReceivedMessage, Source

logger = logging.getLogger("fastapi_eventbus.worker")

OnUndecodable: TypeAlias = Literal["retry", "delete"]
"""What a worker does with a message it cannot decode (see `Worker`)."""

_RECEIVE_BACKOFF = Backoff(initial=0.5, maximum=30.0)
"""Waits between failed receive calls (jittered)."""
_GIVE_BACK_TIMEOUT = 5.0
"""Seconds allowed, at shutdown, for giving an unfinished message back to the broker."""
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
    """Messages still running when ``shutdown_timeout`` ran out (given back)."""
    settle_errors: int = 0
    """Acknowledgements (or give-backs) the broker did not take: those messages come again."""


class Worker:
    """Receives forwarded events from a `Source` and runs the bus's local handlers on them.

    Each message is decoded (`fastapi_eventbus.wire.decode_message`) and handed to
    `EventBus.handle`: the handlers get the same dependency injection as in the
    web app, the app's ``dependency_overrides`` included. The message is
    acknowledged (SQS: deleted) only when every matching handler succeeded;
    otherwise it is given back (SQS: its visibility timeout set by backoff;
    Pub/Sub: nacked), and the broker delivers it again, or moves it to its
    dead-letter queue after its maximum number of deliveries. Delivery is
    at-least-once: use ``event.id`` to deduplicate. While the handlers run, the
    worker calls `Source.extend` every `Source.extend_interval` seconds (SQS:
    ``visibility_timeout``, Pub/Sub: ``ack_deadline``), so that the broker does
    not deliver the message again meanwhile; a failed extension is logged at WARNING.

    Args:
        app: A FastAPI app with an installed bus (``bus.install(app)``), or an
            `EventBus`. With an app, the worker runs the app's lifespan around
            its work, so startup code (pools, clients) runs as in the web app.
        source: Where messages come from: `SQSSource`, `PubSubSource`, your own.
        concurrency: The most messages handled at once (and received ahead).
        shutdown_timeout: Seconds `stop` waits for messages in flight; those
            still running then are cancelled and given back for redelivery.
        on_undecodable: A message that is not an event is logged at ERROR and
            then, with ``"retry"`` (the default), given back like a failure, so
            that it reaches the broker's dead-letter queue; with ``"delete"``,
            acknowledged and dropped.
        max_message_bytes: The largest message decoded, counted as
            `fastapi_eventbus.wire.message_size` counts it (body plus attributes).
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
        max_message_bytes: int = _MAX_MESSAGE_BYTES,
    ) -> None:
        self.bus, self.app = _resolve(app)
        if not isinstance(source, Source):
            raise ConfigurationError(f"source must be a Source, got {source!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if isinstance(shutdown_timeout, bool) or not isinstance(shutdown_timeout, int | float):
            raise ConfigurationError(f"shutdown_timeout must be a number, got {shutdown_timeout!r}")
        if shutdown_timeout < 0:
            raise ConfigurationError(f"shutdown_timeout must be >= 0, got {shutdown_timeout!r}")
        if on_undecodable not in get_args(OnUndecodable):
            raise ConfigurationError(
                f"on_undecodable must be 'retry' or 'delete', got {on_undecodable!r}"
            )
        if (
            isinstance(max_message_bytes, bool)
            or not isinstance(max_message_bytes, int)
            or max_message_bytes < 1
        ):
            raise ConfigurationError(
                f"max_message_bytes must be an int >= 1, got {max_message_bytes!r}"
            )
        self.source = source
        """Where messages come from."""
        self.concurrency = concurrency
        """The most messages handled at once."""
        self.shutdown_timeout = float(shutdown_timeout)
        """Seconds `stop` waits for messages in flight."""
        self.on_undecodable: OnUndecodable = on_undecodable
        """What happens to a message that is not an event: ``"retry"`` or ``"delete"``."""
        self.max_message_bytes = max_message_bytes
        """The largest message decoded."""
        self.stats = WorkerStats()
        """What the worker has done so far."""
        self._slots = asyncio.Semaphore(concurrency)
        self._in_flight: set[asyncio.Task[None]] = set()
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
                await self._consume()
        finally:
            self._done.set()
        logger.info("worker stopped: %s", self.stats)

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
        task = asyncio.create_task(self._process(message))
        self._in_flight.add(task)
        task.add_done_callback(self._processed)

    def _processed(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slots.release()
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("processing a message failed unexpectedly", exc_info=error)

    async def _process(self, message: ReceivedMessage) -> None:
        tracing = self.bus._core.tracing
        if tracing is None:
            await self._settle(message, await self._given_back_if_cancelled(message, None))
            return
        with tracing.consuming(self.source, message) as consumed:
            handled = await self._given_back_if_cancelled(message, consumed)
            await self._settle(message, handled, tracing)

    async def _given_back_if_cancelled(
        self, message: ReceivedMessage, consumed: Consumed | None
    ) -> bool:
        try:
            async with self._heartbeat(message):
                return await self._handle(message, consumed)
        except asyncio.CancelledError as exc:
            tracing = self.bus._core.tracing if consumed is not None else None
            if consumed is not None:
                consumed.failure, consumed.error = "cancelled at shutdown; given back", exc
            await self._give_back(message, tracing)
            raise

    @asynccontextmanager
    async def _heartbeat(self, message: ReceivedMessage) -> AsyncIterator[None]:
        """Extend *message*'s visibility (ack deadline) in the background inside the block."""
        interval = self.source.extend_interval
        if interval is None:
            yield
            return
        beats = asyncio.create_task(self._keep_invisible(message, interval))
        try:
            yield
        finally:
            beats.cancel()
            await asyncio.wait({beats})

    async def _keep_invisible(self, message: ReceivedMessage, interval: float) -> None:
        """Call `Source.extend` every *interval* seconds; a failure is logged, then retried."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.source.extend(message)
            except Exception as exc:
                logger.warning(
                    "could not extend the visibility of message %s on %s (%s); "
                    "it may be delivered again while its handlers run",
                    message.message_id,
                    self.source.name,
                    exc,
                )

    async def _handle(self, message: ReceivedMessage, consumed: Consumed | None) -> bool:
        """Decode and handle *message*; whether to acknowledge it."""
        size = message_size(message.body)
        if size > self.max_message_bytes:
            error = MessageDecodeError(
                f"{size} bytes, over max_message_bytes={self.max_message_bytes}"
            )
            return self._undecodable(message, consumed, "too large to decode", error)
        try:
            event = decode_message(message.body)
        except MessageDecodeError as exc:
            return self._undecodable(message, consumed, "not an event", exc)
        if consumed is not None:
            consumed.event = event
        try:
            failures = await self.bus.handle(event)
        except Exception as exc:
            logger.exception("handling event %r (id=%s) failed", event.name, event.id)
            failures = None
            if consumed is not None:
                consumed.error = exc
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

    def _undecodable(
        self,
        message: ReceivedMessage,
        consumed: Consumed | None,
        failure: str,
        error: MessageDecodeError,
    ) -> bool:
        """Log *message*, which will not be handled; whether to acknowledge it (the policy)."""
        self.stats.undecodable += 1
        delete = self.on_undecodable == "delete"
        logger.error(
            "message %s from %s is %s (%s); %s",
            message.message_id,
            self.source.name,
            failure,
            error,
            "deleting it" if delete else "giving it back: the dead-letter queue will take it",
        )
        if consumed is not None:
            consumed.failure, consumed.error = failure, error
        return delete

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
        with suppress(Exception):
            async with asyncio.timeout(_GIVE_BACK_TIMEOUT):
                if tracing is None:
                    await self.source.nack(message, delay=0)
                else:
                    with tracing.settling(self.source, message, "nack"):
                        await self.source.nack(message, delay=0)

    async def _finish(self, timeout: float) -> None:
        """Wait up to *timeout* seconds for messages in flight; cancel (give back) the rest."""
        tasks = set(self._in_flight)
        if not tasks:
            return
        logger.info("waiting up to %.1fs for %d message(s) in flight", timeout, len(tasks))
        try:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
        except asyncio.CancelledError:  # stopped at once: do not leave them running
            await self._abandon(tasks)
            raise
        if pending:
            logger.warning("%d message(s) did not finish within %.1fs", len(pending), timeout)
            await self._abandon(pending)

    async def _abandon(self, tasks: set[asyncio.Task[None]]) -> None:
        """Cancel *tasks*: each gives its message back for redelivery."""
        pending = {task for task in tasks if not task.done()}
        if not pending:
            return
        self.stats.unfinished += len(pending)
        logger.warning("cancelling %d message(s); they go back for redelivery", len(pending))
        for task in pending:
            task.cancel()
        await asyncio.wait(pending)


def _resolve(target: object) -> tuple[EventBus, Any]:
    """The bus to run, and the app whose lifespan to enter (None for a bare bus)."""
    if isinstance(target, EventBus):
        if target._batch is not None:
            raise ConfigurationError("a Worker needs the application bus, not a request's bus")
        return target, None
    bus = getattr(getattr(target, "state", None), STATE_ATTR, None)
    if not isinstance(bus, EventBus) or not hasattr(getattr(target, "router", None), "routes"):
        raise ConfigurationError(
            f"a Worker needs an EventBus or an app with one installed (bus.install(app)); "
            f"got {target!r}"
        )
    return bus, target
