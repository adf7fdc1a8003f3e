"""Knowing when the server was told to stop, before it tells the application.

uvicorn sends the lifespan's shutdown only after the requests, and their
background tasks (the bus's flushes), have finished: a flush with a backlog or
a hung handler would keep the process alive, and the bus's ``shutdown_timeout``
would never start. So the installed lifespan chains a handler of its own in
front of the server's SIGTERM and SIGINT handlers, which starts the bus's
shutdown clock and then calls the server's handler as before.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from contextlib import suppress
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def on_stop_signal(callback: Callable[[], None]) -> Callable[[], None]:
    """Call *callback* on the running loop when SIGTERM or SIGINT arrives; returns the undo.

    The previous handlers still run, after *callback* is scheduled. Outside the
    main thread (a ``TestClient``'s lifespan), signals cannot be handled: nothing
    is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return _nothing
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        with suppress(RuntimeError):  # the loop is closed already: nothing left to stop
            loop.call_soon_threadsafe(callback)
        before = previous.get(signum)
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:  # what the signal would have done: end the process
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for signum in STOP_SIGNALS:
        previous[signum] = signal.signal(signum, handler)

    def undo() -> None:
        for signum, before in previous.items():
            if signal.getsignal(signum) is handler:  # not replaced since: put the old one back
                signal.signal(signum, before)

    return undo


def _nothing() -> None:
    return None
