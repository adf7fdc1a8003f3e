"""Time limits for handler calls: one timer per event loop, however many calls run.

A timer per call (``asyncio.timeout``) costs a heap push and a cancelled
handle per handler call; when calls complete without the loop running in
between (``publish`` in a loop, a request's many events), the cancelled
handles pile up in the loop's heap and each push gets slower. A `Watchdog`
keeps one timer, armed for the earliest deadline of the calls it watches;
starting and stopping a call's `Limit` (one per flush of a batch, for all of its handler calls)
only adds it to, and removes it from, a set.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, overload


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
