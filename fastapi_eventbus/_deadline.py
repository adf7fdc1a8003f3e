"""Time limits for handler calls: one timer per event loop, however many calls run.

A timer per call (``asyncio.timeout``) costs a heap push and a cancelled
handle per handler call; when calls complete without the loop running in
between (``publish`` in a loop, a request's many events), the cancelled
handles pile up in the loop's heap and each push gets slower. A `Watchdog`
keeps one timer, armed for the earliest deadline of the calls it watches;
entering and leaving a `Limit` (one per dispatch, entered for each handler call) only
adds it to, and removes it from, a set.
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

    One per dispatch of an event (not per call: entering and leaving is all a call
    pays): ``with limit.of(seconds, handler): ...`` for each call.

    Code waiting on a thread (sync handlers and dependencies in the threadpool)
    stops waiting at the deadline; the thread cannot be stopped and runs to its
    end. Code that catches `asyncio.CancelledError` and goes on cannot be bounded.
    """

    __slots__ = ("_task", "_watchdog", "deadline", "expired", "handler", "seconds")

    def __init__(self, watchdog: Watchdog) -> None:
        self._watchdog = watchdog
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
        """`time.monotonic` at the current call's deadline (set on entering the block)."""

    def of(self, seconds: float, handler: str) -> Limit:
        """Bound the next call (the ``with`` block) to *seconds*, naming *handler*."""
        self.seconds = seconds
        self.handler = handler
        return self

    def __enter__(self) -> None:
        watchdog = self._watchdog
        self.expired = False
        self.deadline = deadline = time.monotonic() + self.seconds
        watchdog._running.add(self)  # `_watch`, inlined: this runs for every handler call
        if deadline < watchdog._due:  # rarely: usually an earlier call set the timer already
            watchdog._arm(deadline)

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
        self._watchdog._running.discard(self)  # the timer stays: it finds nothing due
        if not self.expired or self._task.uncancel() > 0:  # > 0: cancelled from outside too
            return
        if exc_type is None or issubclass(exc_type, asyncio.CancelledError):
            # None: the block caught the cancellation and returned; it did not finish either.
            raise TimeoutError(
                f"handler {self.handler} did not finish within {self.seconds:g}s"
            ) from exc
