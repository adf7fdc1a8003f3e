"""Time limits for handler calls: one timer per event loop, however many calls run.

A timer per call (``asyncio.timeout``) costs a heap push and a cancelled
handle per handler call; when calls complete without the loop running in
between (``publish`` in a loop, a request's many events), the cancelled
handles pile up in the loop's heap and each push gets slower. A `Watchdog`
keeps one timer, armed for the earliest deadline of the calls it watches;
starting and stopping a call's `Limit` (one per flush of a batch, for all of its handler calls)
only adds it to, and removes it from, a set.

And waiting for handlers without hanging on one that ignores its cancellation: how long
(`allowance`), and how (`within`, `finish_within`: past the time, it is left running).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine
from typing import Any, TypeVar, overload

T = TypeVar("T")
"""What the call `within` waits for returns."""

MIN_OVERTIME = 5.0
"""The least time code waiting for handlers gives them past their time limits (`allowance`)."""


def allowance(limit: float | None) -> float | None:
    """How long to wait for handlers whose time limits add up to *limit* (None: one has
    none): *limit*, plus as much again and at least `MIN_OVERTIME` seconds, for the events
    they emit and for unwinding. Past that, a handler that ignored its cancellation is
    left running, and the waiting code (a worker, the outbox relay) goes on."""
    return None if limit is None else limit + max(limit, MIN_OVERTIME)


def cancelled() -> bool:
    """Whether the current task was asked to stop: a `asyncio.CancelledError` caught now is
    its cancellation, to let through. Otherwise the code it awaited raised one of its own (a
    handler whose own task was cancelled, a library re-raising it): an error like any other."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def uncancel() -> int:
    """Withdraw one cancellation of the current task; how many are still requested."""
    task = asyncio.current_task()
    assert task is not None
    return task.uncancel()


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The running event loop; None in a thread that runs none (a sync endpoint's)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


CANCEL_GRACE = 1.0
"""Seconds `finish_within` waits for a task to stop once it cancelled it."""

_LEFT_RUNNING: set[asyncio.Future[Any]] = set()
"""Tasks that outlived the time given them (see `within`): kept until they end."""


async def cancel_the_rest(grace: float = CANCEL_GRACE) -> set[asyncio.Task[Any]]:
    """Cancel every other task of the running loop, at an exit; those still running *grace*
    seconds later (they ignore their cancellation), which the caller exits without."""
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    if not tasks:
        return set()
    _, running = await asyncio.wait(tasks, timeout=grace)
    return running


def _leave_running(task: asyncio.Future[Any]) -> None:
    _LEFT_RUNNING.add(task)
    task.add_done_callback(_LEFT_RUNNING.discard)


async def within(call: Coroutine[Any, Any, T], seconds: float | None) -> tuple[bool, T | None]:
    """Await *call* for at most *seconds* (None: as long as it takes): ``(True, result)``,
    or ``(False, None)`` if it still runs then. It is then cancelled, and waited for
    `CANCEL_GRACE` seconds more: code that ignores its cancellation cannot be stopped, only
    left running, no longer waited for."""
    if seconds is None:
        return True, await call
    task = asyncio.ensure_future(call)
    try:
        await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task.done():
        return True, task.result()
    await finish_within(task, 0)
    return False, None


async def finish_within(task: asyncio.Future[Any], seconds: float) -> bool:
    """Wait up to *seconds* for *task*, then cancel it and wait up to `CANCEL_GRACE` more;
    whether it finished. One ignoring its cancellation is left running."""
    await asyncio.wait({task}, timeout=seconds)
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_GRACE)
    if task.done():
        return True
    _leave_running(task)
    return False


class Watchdog:
    """Watches the `Limit` blocks running on one event loop; cancels those past their deadline."""

    __slots__ = ("_due", "_running", "_timer", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        """The event loop whose calls this watchdog watches."""
        self._running: set[Limit] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._due = math.inf

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._due = due
        self._timer = self.loop.call_later(due - time.monotonic(), self._check)

    def _check(self) -> None:
        self._timer, self._due = None, math.inf
        now = time.monotonic()
        earliest = math.inf
        for limit in list(self._running):
            if limit.deadline <= now:
                limit.expire()
            elif limit.deadline < earliest:
                earliest = limit.deadline
        if earliest < math.inf:
            self._arm(earliest)


class Limit:
    """Time limits for the handler calls of one task, made one after another: past a call's
    deadline, the task is cancelled, and the cancellation leaves the block as `TimeoutError`.

    One per flush of a batch (its *task* runs them all), not per call: `start` and
    `stop` around each call are all a call pays.

    Code waiting on a thread (sync handlers and dependencies in the threadpool)
    stops waiting at the deadline; the thread cannot be stopped and runs to its
    end. Code that catches `asyncio.CancelledError` and goes on cannot be bounded.
    """

    __slots__ = ("_task", "_watchdog", "deadline", "expired", "handler", "seconds")

    def __init__(self, watchdog: Watchdog, task: asyncio.Task[Any] | None = None) -> None:
        self._watchdog = watchdog
        if task is None:  # the task the calls run in: this one
            task = asyncio.current_task(watchdog.loop)
        assert task is not None, "a Limit is used by a task"
        self._task = task
        self.seconds = math.inf
        """The time allowed to the current call."""
        self.handler = ""
        """The current call's handler (qualified name), for the `TimeoutError`'s message."""
        self.expired = False
        """Whether the deadline passed while the current call ran."""
        self.deadline = math.inf
        """`time.monotonic` at the current call's deadline (set by `start`)."""

    def start(self, seconds: float, handler: str) -> None:
        """A call of *handler* starts, bounded to *seconds*; `stop` when it ends."""
        self.seconds = seconds
        self.handler = handler
        self.expired = False
        self.deadline = deadline = time.monotonic() + seconds
        watchdog = self._watchdog
        watchdog._running.add(self)  # `_watch`, inlined: this runs for every handler call
        if deadline < watchdog._due:  # rarely: usually an earlier call set the timer already
            watchdog._arm(deadline)

    @overload
    def stop(self, raised: BaseException) -> BaseException: ...

    @overload
    def stop(self, raised: None = None) -> BaseException | None: ...

    def stop(self, raised: BaseException | None = None) -> BaseException | None:
        """The call ended, raising *raised* (None: it returned): what it ended with.

        *raised* itself (None: success), unless the deadline passed: then the
        cancellation that stopped the call, or its return after catching it, is a
        `TimeoutError`; unless the task was cancelled from outside too (*raised*).
        """
        self._watchdog._running.discard(self)  # the timer stays: it finds nothing due
        if not self.expired or self._task.uncancel() > 0:  # > 0: cancelled from outside too
            return raised
        if raised is None or isinstance(raised, asyncio.CancelledError):
            # None: the call caught the cancellation and returned; it did not finish either.
            timeout = TimeoutError(
                f"handler {self.handler} did not finish within {self.seconds:g}s"
            )
            timeout.__cause__ = raised
            return timeout
        return raised

    def expire(self) -> None:
        """Cancel the task running the call, once (the watchdog calls this at the deadline)."""
        if not self.expired:
            self.expired = True
            self._task.cancel()
