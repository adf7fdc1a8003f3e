"""The lifespan `EventBus.install` wraps around the application's own."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from ._core import Core
from ._deadline import CANCEL_GRACE, finish_within, within
from ._hooks import ensure_readable_logs, logger
from ._signals import on_stop_signal
from .forwarders._base import Forwarder

_WARNED: weakref.WeakSet[Core] = weakref.WeakSet()


def check_serving(core: Core) -> None:
    """A request came, and the installed lifespan is not running: if the bus keeps events
    to send later (a spool, an outbox), warn once that nothing will send them."""
    if (core.spool is None and core.outbox is None) or core in _WARNED:
        return
    _WARNED.add(core)
    kept = " and ".join(
        what
        for what, there in (("spool", core.spool), ("outbox", core.outbox))
        if there is not None
    )
    logger.warning(
        "a request reached the app, but the bus's lifespan is not running (Starlette does not "
        "run the lifespan of an app mounted in another, nor does a TestClient used without "
        "`with`): nothing sends what its %s keeps, the events whose first delivery failed, "
        "and shutdown will not wait for events in flight. Run the app's lifespan: for a "
        "mounted app, from the outer app's (`async with sub_app.router.lifespan_context("
        "sub_app): yield`)",
        kept,
    )


def draining_lifespan(
    original: Callable[[Any], AbstractAsyncContextManager[Any]],
    core: Core,
    close: Callable[[], Awaitable[object]],
) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
    """Wrap *original*: after its startup, start the forwarders; at shutdown, *close*
    (`EventBus.close`: drain the in-flight events, close the forwarders).

    A forwarder that fails to start is logged at WARNING, not raised: the app
    serves anyway, and the forwarder is started again before its first send;
    unless it has ``verify_on_start``, whose failure stops the startup. A start
    still running at the forwarder's ``send_timeout`` is cancelled, with an ERROR.
    """

    async def start(forwarder: Forwarder) -> None:
        if forwarder.verify_on_start:  # its failure stops the application's startup
            await forwarder.start_checked()
            return
        seconds = forwarder.send_timeout  # a start that never returns must not hold startup
        try:
            started, _ = await within(forwarder.ensure_started(), seconds)
        except Exception as exc:
            logger.warning(
                "forwarder %s failed to start at application startup (%r); it will be "
                "started again before its first send",
                forwarder.name,
                exc,
            )
            return
        if not started:
            logger.error(
                "forwarder %s did not start within %gs (its send_timeout) at application "
                "startup: cancelled, and left running if it ignores that; it will be started "
                "again before its first send",
                forwarder.name,
                seconds,
            )

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Mapping[str, Any] | None]:
        async with original(app) as state:
            resender: asyncio.Task[None] | None = None
            relay: asyncio.Task[None] | None = None
            core.app = app  # publish() and handle() use it: the app running now
            core.shutdown.reopen()
            core.lifespan_state = dict(state or {})
            ensure_readable_logs()
            if lifespans_around(app, lifespan):
                logger.warning(
                    "the app's lifespan was wrapped after bus.install(app) (include_router of "
                    "a router with a lifespan): its shutdown runs before the bus drains, and "
                    "its state does not reach handlers; call bus.install(app) last"
                )
            stop_watching = on_stop_signal(core.shutdown.begin)
            try:
                forwarders = {id(f): f for f in core.forwarders.items()}  # each once
                # Every start runs to its end (so that close() finds them all settled)
                # before a failed start-up check stops the startup.
                started = await asyncio.gather(
                    *(start(f) for f in forwarders.values()), return_exceptions=True
                )
                for outcome in started:
                    if isinstance(outcome, BaseException):
                        raise outcome
                if core.spool is not None:  # what a previous run left is sent first
                    resender = asyncio.create_task(core.sender.resend_forever())
                if core.outbox is not None:  # what a crash left is relayed first
                    relay = asyncio.create_task(core.outbox.relay_forever())
                core.serving = True
                yield state
            finally:
                core.serving = False
                stop_watching()
                for task, what in ((resender, "the spool's resend"), (relay, "the outbox relay")):
                    if task is None:
                        continue
                    if await finish_within(task, 0):
                        if not task.cancelled() and (error := task.exception()) is not None:
                            logger.error("%s had failed", what, exc_info=error)  # a bug
                    else:
                        logger.error(
                            "shutdown: %s still ran %gs after it was cancelled (a forwarder "
                            "with no send_timeout ignores its cancellation); left running, its "
                            "events stay where they are kept, for the next process",
                            what,
                            CANCEL_GRACE,
                        )
                await close()

    return lifespan


def lifespans_around(app: Any, ours: object) -> list[object]:
    """The lifespans merged into *app*'s since `install` (``include_router``), but the
    default ones (a router without a lifespan). FastAPI runs each inside the one it merges
    it with: it shuts down before ours drains. A wrapper of another kind, outside ours,
    shuts down after it: harmless."""
    around: list[object] = []
    context = getattr(getattr(app, "router", None), "lifespan_context", ours)
    while context is not ours:
        merged = getattr(context, "__wrapped__", None)  # FastAPI's `_merge_lifespan_context`
        code, cells = getattr(merged, "__code__", None), getattr(merged, "__closure__", None)
        pairs = zip(code.co_freevars, cells, strict=True) if code is not None and cells else ()
        parts = {name: cell.cell_contents for name, cell in pairs}
        if "original_context" not in parts or "nested_context" not in parts:
            return around  # wrapped some other way
        if type(parts["nested_context"]).__name__ != "_DefaultLifespan":
            around.append(parts["nested_context"])
        context = parts["original_context"]
    return around
