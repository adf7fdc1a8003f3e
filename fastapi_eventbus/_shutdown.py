"""Shutting a bus down on one event loop: what the installed lifespan's exit does.

At the server's stop signal, the requests' flushes get ``shutdown_timeout`` seconds
before they are stopped (`Shutdown.begin`, `Shutdown.stop_flushes`). `Shutdown.drain`
waits for what is in flight on the loop and reports by id what did not finish;
`Shutdown.release` makes what this process holds in its spool and outbox due again at
once. Once `Shutdown.close` ran, an event a thread the app left running emits into one
of the loop's finished batches is refused where it is emitted: nothing would run its
flush any more (`Shutdown.refusal`).

One bus may serve several apps at once, each on its own loop: each drains its own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ._batch import CLOSED, FAILED, Batch
from ._deadline import CANCEL_GRACE, finish_within, running_loop
from ._events import Event
from ._hooks import DiscardedEvents, call_hook, logger
from .exceptions import OutsideRequestError, SpoolError

if TYPE_CHECKING:
    from ._core import Core


class Shutdown:
    """The shutdown of one bus's batches, loop by loop (`fastapi_eventbus._core.Core.shutdown`)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self._stopping: dict[asyncio.AbstractEventLoop, asyncio.TimerHandle] = {}
        self._closed: set[asyncio.AbstractEventLoop] = set()
        self._late = threading.RLock()
        """Held by a thread's late emit (`late`) and by `close`: the emit is refused, or its
        event is in a batch `close` finds."""

    def begin(self) -> None:
        """The server was told to stop: `stop_flushes` in ``shutdown_timeout`` seconds."""
        loop = asyncio.get_running_loop()
        if loop not in self._stopping:
            timeout = self.core.settings.shutdown_timeout
            self._stopping[loop] = loop.call_later(timeout, self.stop_flushes, loop)

    def stop_flushes(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel the requests' flushes still running on *loop*: each reports its unfinished
        events. Called ``shutdown_timeout`` seconds after the server was told to stop, so
        that neither a server waiting for background tasks (uvicorn without
        ``--timeout-graceful-shutdown``) nor a hung handler holds the process."""
        for batch in list(self.core.active):
            runner = batch.runner
            if batch.loop is loop and runner is not None and not (runner.done() or batch.stopped):
                batch.stopped = True
                runner.cancel()

    def _own(self, loop: asyncio.AbstractEventLoop) -> list[Batch]:
        """The in-flight batches of *loop*, and those of closed loops (they never finish)."""
        return [
            batch
            for batch in list(self.core.active)  # a snapshot: sync handlers' emits add to it
            if batch.loop is None or batch.loop is loop or batch.loop.is_closed()
        ]

    async def drain(self, timeout: float) -> list[Event]:
        """Wait up to *timeout* seconds for the running loop's in-flight batches and jobs;
        report what did not finish (ERROR, ``on_discard``), and return it."""
        core = self.core
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        # Polling, not an asyncio.Event: a bare TestClient runs each request on its own loop.
        while time.monotonic() < deadline and (  # noqa: ASYNC110
            self._own(loop) or any(job.get_loop() is loop for job in list(core.jobs))
        ):
            await asyncio.sleep(0.005)
        jobs = [job for job in list(core.jobs) if job.get_loop() is loop]
        # Cancelled, each reports what it did not finish; one ignoring it is left running.
        stopped = await asyncio.gather(*(finish_within(job, 0) for job in jobs))
        if stuck := [job for job, ended in zip(jobs, stopped, strict=True) if not ended]:
            core.jobs.difference_update(stuck)  # not this bus's any more: not waited for again
            logger.error(
                "shutdown: %d job(s) still ran %gs after they were cancelled (a handler with "
                "no time limit ignores its cancellation); left running (an outbox's rows are "
                "due again at once: another process may deliver them meanwhile): %s",
                len(stuck),
                CANCEL_GRACE,
                "; ".join(sorted(_named(job) for job in stuck)),
            )
        batches = self._own(loop)
        unfinished = [event for batch in batches for event in batch.unfinished()]
        for batch in batches:  # reported here, so not again if their task is cancelled
            batch.events.clear()
            batch.current = None
            for task, _ in batch.sends:
                if not task.get_loop().is_closed():
                    task.cancel()
            batch.sends.clear()
            core.finished(batch)
            core.active.discard(batch)
        if (stopping := self._stopping.pop(loop, None)) is not None:
            stopping.cancel()  # the bus may serve again (another app, a new lifespan)
        if unfinished:
            spooled = "; those for forwarders stay in the spool" if core.spool else ""
            logger.error(
                "shutdown: %d event(s) did not finish within %.1fs%s: %s",
                len(unfinished),
                timeout,
                spooled,
                ", ".join(e.id for e in unfinished),
            )
            reason = f"shutdown did not finish within {timeout}s{spooled}"
            await call_hook(core.settings.on_discard, DiscardedEvents(tuple(unfinished), reason))
        return unfinished

    async def release(self) -> None:
        """What this process holds in its spool and outbox is due again at once."""
        core = self.core
        if core.spool is not None:
            try:
                core.spool.release()
            except SpoolError as exc:
                logger.error("%s", exc)
        if core.outbox is not None:
            try:
                await core.outbox.release()
            except Exception as exc:
                logger.error("outbox %s: could not release its rows: %r", core.outbox.name, exc)

    async def close(self) -> None:
        """The app on the running loop has shut down (`EventBus.close`): see `refusal`.

        An event emitted into a finished batch (by a thread or a task the app left running)
        after `drain` looked, and before this, would wait for a flush the closing loop may
        never run: it is reported (ERROR, ``on_discard``). A thread's emit under way waits
        for this, or this for it (`late`).
        """
        loop = asyncio.get_running_loop()
        locked = self._late.acquire(timeout=_LATE_WAIT)  # blocks the loop: emits are short
        try:
            self._closed = {loop for loop in self._closed if not loop.is_closed()}  # `refusal`
            self._closed.add(loop)  # tells those apart: none is kept
            waiting = [b for b in list(self.core.active) if b.loop is loop and b.state == CLOSED]
        finally:
            if locked:
                self._late.release()
        if not locked:
            logger.warning(
                "shutdown: an event emitted from a thread took over %gs; it may not be "
                "reported if the loop closes before its flush runs",
                _LATE_WAIT,
            )
        for batch in waiting:
            if batch.events:
                reason = "it was emitted while the application shut down, after the drain"
                await self.core.discard(batch, reason, forget=False, level=logging.ERROR)

    @contextmanager
    def late(self, batch: Batch) -> Iterator[None]:
        """Around an event emitted into finished *batch*: refused here (`OutsideRequestError`,
        see `refusal`); from a thread, `close` waits until it is accepted and scheduled."""
        thread = batch.loop is not None and not _running(batch.loop)
        if thread:
            self._late.acquire()
        try:
            if (why := self.refusal(batch)) is not None:
                raise OutsideRequestError(f"event refused: {why}")
            yield
        finally:
            if thread:
                self._late.release()

    def reopen(self) -> None:
        """An app starts serving on the running loop (its lifespan), which may be one closed
        before (`close`)."""
        self._closed.discard(asyncio.get_running_loop())

    def refusal(self, batch: Batch) -> str | None:
        """Why an event emitted into finished *batch* (its request or handler call over) would
        never be handled, if it would not: then `EventBus.emit` refuses it."""
        if batch.state == FAILED:
            return (
                "the sync handler call this bus was given to ran out of time: what it emitted "
                "was discarded, and it takes no more events (its thread runs on)"
            )
        loop = batch.loop
        if loop is not None and loop.is_closed():
            return "the event loop of the request this bus was given to is closed"
        if loop is not None and loop in self._closed and not _running(loop):
            return "the application has shut down (bus.close() ran on its event loop)"
        return None


_LATE_WAIT = 5.0
"""Seconds `Shutdown.close` waits for a thread's emit under way (`Shutdown.late`)."""


def _named(job: asyncio.Future[Any]) -> str:
    """What *job* does: its task's name (`Core.spawn`)."""
    return job.get_name() if isinstance(job, asyncio.Task) else repr(job)


def _running(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the caller runs on *loop* (a task: its flush is scheduled there, and runs)."""
    return running_loop() is loop  # None in a thread: after the shutdown, the loop may stop
