"""Time limits for handler calls: one timer per event loop, however many calls run.

A timer per call (``asyncio.timeout``) costs a heap push and a cancelled
handle per handler call; when calls complete without the loop running in
between (``publish`` in a loop, a request's many events), the cancelled
handles pile up in the loop's heap and each push gets slower. A `Watchdog`
keeps one timer, armed for the earliest deadline of the calls it watches;
entering and leaving a `Limit` only adds it to, and removes it from, a set.
"""

from __future__ import annotations

import asyncio
import math
import time
from types import TracebackType


class Watchdog:
    """Watches the `Limit` blocks running on one event loop; cancels those past their deadline."""

    __slots__ = ("_due", "_running", "_timer", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        """The event loop whose calls this watchdog watches."""
        self._running: set[Limit] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._due = math.inf

    def _watch(self, limit: Limit) -> None:
        self._running.add(limit)
        if limit.deadline < self._due:  # rarely: usually an earlier call set the timer already
            self._arm(limit.deadline)

    def _forget(self, limit: Limit) -> None:
        self._running.discard(limit)  # the timer stays: when it fires, it finds nothing due

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
    """A handler call bounded in time: past its deadline, the task running it is cancelled,
    and the cancellation leaves the block as `TimeoutError`.

    Code waiting on a thread (sync handlers and dependencies in the threadpool)
    stops waiting at the deadline; the thread cannot be stopped and runs to its
    end. Code that catches `asyncio.CancelledError` and goes on cannot be bounded.
    """

    __slots__ = ("_task", "_watchdog", "deadline", "expired", "handler", "seconds")

    def __init__(self, watchdog: Watchdog, seconds: float, handler: str) -> None:
        self._watchdog = watchdog
        self.seconds = seconds
        """The time allowed."""
        self.handler = handler
        """The handler's qualified name, for the `TimeoutError`'s message."""
        self.expired = False
        """Whether the deadline passed while the block ran."""
        self.deadline = math.inf
        """`time.monotonic` at the deadline (set on entering the block)."""

    def __enter__(self) -> None:
        watchdog = self._watchdog
        task = asyncio.current_task(watchdog.loop)
        assert task is not None, "a Limit is entered by a task"
        self._task = task
        self.deadline = time.monotonic() + self.seconds
        watchdog._watch(self)

    def expire(self) -> None:
        """Cancel the task running the block, once (the watchdog calls this at the deadline)."""
        if not self.expired:
            self.expired = True
            self._task.cancel()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._watchdog._forget(self)
        if not self.expired or self._task.uncancel() > 0:  # > 0: cancelled from outside too
            return
        if exc_type is None or issubclass(exc_type, asyncio.CancelledError):
            # None: the block caught the cancellation and returned; it did not finish either.
            raise TimeoutError(
                f"handler {self.handler} did not finish within {self.seconds:g}s"
            ) from exc
