"""Running an event's handlers: each call through FastAPI's solver, within its time limit,
retried per its `Retry`, its failure logged and reported, the events it emitted handled."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import math
import time
from collections.abc import Callable, Collection, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from . import _di
from ._batch import CLOSED, FAILED, SCOPE_KEY, Batch
from ._deadline import Limit, Watchdog, cancelled
from ._di import Handler
from ._events import Event, event_name_of, payload_as
from ._hooks import DiscardedEvents, HandlerFailure, call_hook, logger, passes_through
from ._patterns import PatternIndex
from ._tracing import Tracing
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from ._core import Core
    from ._retry import Retry

unmatched_logger = logging.getLogger("fastapi_eventbus.unmatched")
"""Where the "matches no handler and no forwarder" warning goes (silence it by its name)."""

_UNMATCHED_NAMES_LIMIT = 1024
"""How many distinct unmatched names are remembered (each is warned about once)."""


class Inbox(Protocol):
    """What ``EventBus(inbox=...)`` takes (`fastapi_eventbus.outbox.SQLAlchemyInbox`): the
    handlers that succeeded for each event, so that a redelivery runs only the others."""

    async def handled(self, event: Event) -> Collection[str]:
        """The names of the handlers that already succeeded for *event*."""

    def calling(self, handler: str, event: Event) -> Callable[[], object] | None:
        """*handler* is about to run for *event* (a commit in it may record its success).

        May return a function, which the bus calls once that call is over (its retries
        included), whether it succeeded or not: before `record`, and before ``on_error``
        hears of a failure. A commit made after it (by a task the handler started, by the
        hook) is no longer the handler's. The function returns True if a commit during
        the call recorded the handler: a failure's log line then says that a redelivery
        will not run it again."""

    async def record(self, handler: str, event: Event) -> None:
        """*handler* succeeded for *event* (unless its own transaction recorded it).

        An inbox may also have a ``handler_name_length``: the longest handler name it
        records (a bus refuses longer ones at registration)."""


class Dispatcher:
    """The handlers of one bus, and running those of an event (`dispatch`).

    Part of its `Core` (the batches, the flush loop), which it asks to flush or
    discard the events a handler emitted.
    """

    def __init__(self, core: Core) -> None:
        self.core = core
        self.handlers: PatternIndex[Handler] = PatternIndex()
        self.tracing: Tracing | None = None
        """The bus's span hooks (set with the core's); None: tracing off."""
        self._unmatched: set[str] = set()
        self._names: set[str] = set()
        self._registered: dict[object, Handler] = {}  # by `_identity`: one handler a function
        """The registered handlers' names (`Handler.name`): unique with an inbox."""
        self._watchdog: Watchdog | None = None
        self.inbox: Inbox | None = None
        """Which handlers already succeeded for an event (``EventBus(inbox=...)``)."""

    def add(
        self,
        func: Callable[..., Any],
        patterns: list[str],
        timeout: float | None,
        retry: Retry | None,
    ) -> None:
        """Register *func* as a handler (`EventBus.on`), and the schema of its typed event.

        *timeout* None is the bus's ``handler_timeout``; ``math.inf``: no limit.
        """
        core = self.core
        if timeout is None:
            timeout = core.settings.handler_timeout
        handler = _di.new_handler(func, patterns, None if timeout == math.inf else timeout, retry)
        key = (_identity(func), handler.timeout, handler.retry)  # other options: another one
        if (known := self._registered.get(key)) is not None:
            self._registered[key] = self._add_patterns(known, handler)
            return
        if self.inbox is not None and handler.name in self._names:
            raise ConfigurationError(
                f"a handler named {handler.name} is registered already, and this bus's inbox "
                "records which handlers succeeded by name: one's success would skip the other "
                "on a redelivery. Give each its own name (a factory's handlers: set "
                "__qualname__), or register one function once, with all its patterns: "
                '@bus.on("a", "b")'
            )
        longest = getattr(self.inbox, "handler_name_length", None)  # see `Inbox`
        if longest is not None and len(handler.name) > longest:
            raise ConfigurationError(
                f"handler {handler.name[:60]}... has a name of {len(handler.name)} characters, "
                f"and this bus's inbox records handlers by name in {longest}: give it a "
                "shorter one (set __qualname__)"
            )
        model = handler.plan.event_model
        name = event_name_of(model) if model is not None else None
        if model is not None and name is not None:  # a payload valid for another schema
            core.schemas.register(name, model)  # could fail this one after the response
        self._names.add(handler.name)  # once nothing can refuse it
        self._registered[key] = handler
        self.handlers.add(handler.patterns, handler)

    def _add_patterns(self, known: Handler, again: Handler) -> Handler:
        """*known*'s function registered again with the same options (stacked ``@bus.on``, a
        loop): one handler still, with *again*'s patterns too, so that it runs once per event."""
        added = [p for p in dict.fromkeys(again.patterns) if p not in known.patterns]
        if not added:
            return known
        merged = dataclasses.replace(known, patterns=known.patterns + tuple(added))
        self.handlers.add(added, merged, replacing=known)
        return merged

    def depth_of(self, batch: Batch | None) -> int:
        """The chain depth of an event published into *batch*; without one (on the
        application bus), in a handler's call: one deeper than the event it handles."""
        if batch is not None:
            return batch.depth
        handling = _di.CURRENT_EVENT.get(None)
        return 0 if handling is None else int(handling[1].depth) + 1

    def time_limit(self, name: str, retried: bool = False) -> float | None:
        """Seconds the handlers of event *name* may take together (`EventBus.time_limit`);
        *retried*: with the tries of each handler's `Retry` (an outbox's delivery)."""
        total = 0.0
        for handler in self.handlers.match(name):
            if (timeout := handler.timeout) is None:
                return None
            retry = handler.retry
            total += retry.longest(timeout) if retried and retry is not None else timeout
        return total

    async def dispatch(
        self, event: Event, batch: Batch, local: bool = True, redelivered: bool = False
    ) -> list[HandlerFailure]:
        """Run every handler matching *event*, one after the other, isolating failures.

        Events a handler emits (through ``Depends(get_bus)``) go to a child batch,
        handled right after that handler returns, or discarded if it raised.
        Returns the failures (already logged and passed to ``on_error``).
        *local* is False for an event that came from a broker: for tracing, and
        its handlers are not retried here (the broker's redelivery is the retry).
        A *redelivered* event (a worker's, an outbox's) may have been handled
        before: with an inbox, the handlers that succeeded then are skipped, and
        each success is recorded.
        """
        failures: list[HandlerFailure] = []
        handlers = self.handlers.match(event.name)
        if not handlers and (not local or not self.core.forwarders.match(event.name)):
            await self._no_match(event, local)
        inbox = self.inbox if redelivered and handlers else None
        if inbox is not None:
            handlers = await _not_yet_handled(inbox, event, handlers)
        token = _di.CURRENT_EVENT.set((event, batch))
        limit = batch.limit  # made for the first handler call with a time limit
        observers = self.core.observers  # the list itself: one `capture` adds is seen
        try:
            for handler in handlers:
                plan = handler.plan
                if plan.uses_solver:  # read at every call, as FastAPI reads them per request
                    overrides = _di.has_overrides(batch.provider)
                    child = batch.child() if plan.may_emit or overrides else None
                else:  # no dependencies: nothing to override, nothing to give get_bus
                    overrides, child = False, None
                ended = recorded = None  # with an inbox: what ends the call, and whether
                # a commit in it recorded the handler (`Inbox.calling`)
                try:
                    error: BaseException | None = None
                    if (timeout := handler.timeout) is not None and limit is None:
                        limit = batch.limit = self._limit(batch)
                    if inbox is not None:
                        ended = inbox.calling(handler.name, event)
                    if self.tracing is None:  # `_call`, inlined: one coroutine less per call
                        try:
                            if child is None and plan.event_model is None:  # `_start`'s usual
                                call = _di.handler_call(  # case, without a call to get there
                                    plan, handler.func, event, batch.provider, overrides
                                )
                            else:
                                call = self._start(handler, event, batch, child, overrides)
                            if limit is None or timeout is None:
                                if (result := await call) is not None:  # see `_di.returned`
                                    await _di.returned(result)
                            else:  # `Limit.start` and `stop` around it, inlined as in `_call`
                                limit.start(timeout, handler.name)
                                try:
                                    if (result := await call) is not None:
                                        await _di.returned(result)
                                except BaseException as exc:
                                    if (timed_out := limit.stop(exc)) is exc:
                                        raise
                                    raise timed_out from exc
                                if (outcome := limit.stop()) is not None:
                                    raise outcome
                        except BaseException as exc:
                            if passes_through(exc):  # this task's cancellation, Ctrl-C
                                raise
                            error = exc
                    else:
                        watched = bool(inbox or observers)
                        error = await self._run(
                            handler, event, batch, child, local, overrides, limit, watched
                        )
                    if error is None and (inbox or observers) and cancelled():  # it swallowed
                        raise asyncio.CancelledError  # the task's cancellation: no success to
                        # record (a consumer's own check gives the message back: `Processor`)
                    if error is not None and handler.retry is not None and local:
                        error, child = await self._retry(handler, event, batch, child, error, limit)
                except asyncio.CancelledError as exc:  # what it emitted is reported too,
                    for observer in () if redelivered else observers:  # and `capture` hears
                        observer.on_handled(event, handler.name, exc)  # of a call cut off (a
                    await self._cancelled(handler, child)  # broker's or an outbox's event
                    raise  # is delivered again: given back, not lost)
                finally:
                    if ended is not None:
                        recorded = ended()
                if error is not None:
                    await self._failed(handler, event, error, recorded is True)
                    failures.append(HandlerFailure(event, handler.name, error))
                for observer in observers:
                    observer.on_handled(event, handler.name, error)
                if inbox is not None and error is None:
                    await _record(inbox, handler.name, event)
                if child is None:
                    continue
                if error is not None:  # what it emitted is discarded
                    reason = f"handler {handler.name} failed"
                    await self.core.discard(child, reason, error, state=_ended(handler, limit))
                elif not (child.events or child.jobs):
                    child.state = CLOSED  # a later emit (a task it started) gets its own flush
                else:
                    self.core.active.add(child)
                    await self.core.flush(child)
        finally:
            _di.CURRENT_EVENT.reset(token)
        return failures

    async def _no_match(self, event: Event, local: bool) -> None:
        """Warn, once per name, about an event that nothing handles (or forwards); tell
        ``on_discard`` of each such event this process emitted (a worker's unhandled
        messages have its ``on_unhandled``)."""
        seen = self._unmatched
        if event.name not in seen and len(seen) < _UNMATCHED_NAMES_LIMIT:
            seen.add(event.name)
            unmatched_logger.warning(
                "event %r (id=%s) matches no handler%s: check the patterns given to %s "
                "(warned once per event name; on_discard hears of each)",
                event.name,
                event.id,
                " and no forwarder" if local else "",
                "@bus.on and bus.forward" if local else "@bus.on",
            )
        if local:
            reason = "it matches no handler and no forwarder"
            await call_hook(self.core.settings.on_discard, DiscardedEvents((event,), reason))

    async def _retry(
        self,
        handler: Handler,
        event: Event,
        batch: Batch,
        child: Batch | None,
        failed: BaseException,
        limit: Limit | None,
    ) -> tuple[BaseException | None, Batch | None]:
        """Call *handler* again, per its `Retry`, after it failed with *failed*.

        Each failed attempt is logged at WARNING and the events it emitted are
        discarded; returns the last attempt's error (None: it succeeded) and
        the child batch of its chained events.
        """
        retry = handler.retry
        assert retry is not None
        attempt, started = 1, time.monotonic()
        error: BaseException | None = failed
        while error is not None:
            delay = retry.next_delay(attempt, time.monotonic() - started)
            if delay is None:
                break
            if child is not None:  # as after the last try
                reason = f"handler {handler.name} failed (attempt {attempt})"
                await self.core.discard(child, reason, error, state=_ended(handler, limit))
            tries = (
                f" of {retry.attempts}"
                if retry.attempts is not None
                else f" (trying for up to {retry.total_timeout:g}s)"
            )
            logger.warning(
                "handler %s failed for event %r (id=%s), attempt %d%s (%r); trying again in %.2fs",
                handler.name,
                event.name,
                event.id,
                attempt,
                tries,
                error,
                delay,
            )
            await asyncio.sleep(delay)
            attempt += 1
            plan = handler.plan
            overrides = _di.has_overrides(batch.provider)
            child = batch.child() if plan.uses_solver and (plan.may_emit or overrides) else None
            try:
                if self.tracing is None:
                    error = await self._call(handler, event, batch, child, overrides, limit)
                else:
                    error = await self._run(
                        handler, event, batch, child, True, overrides, limit, watched=False
                    )  # `dispatch` checks only the first call for a swallowed cancellation
            except asyncio.CancelledError:  # this try's events: `dispatch` sees only the first's
                await self._cancelled(handler, child)
                raise
        return error, child

    async def _cancelled(self, handler: Handler, child: Batch | None) -> None:
        """*handler*'s call was cancelled: report what it emitted (*child*'s events)."""
        if child is not None and child.events:
            reason = f"handler {handler.name} was cancelled"
            await self.core.discard(child, reason, forget=False, level=logging.ERROR)

    def _limit(self, batch: Batch) -> Limit:
        """The time limits of *batch*'s handler calls (in this task: the one running its
        flush), watched by the watchdog of its event loop."""
        loop = batch.loop or asyncio.get_running_loop()
        watchdog = self._watchdog
        if watchdog is None or watchdog.loop is not loop:  # a bare TestClient: a loop a request
            watchdog = self._watchdog = Watchdog(loop)
        return Limit(watchdog, batch.runner)

    async def _failed(
        self, handler: Handler, event: Event, error: BaseException, recorded: bool = False
    ) -> None:
        """Log *handler*'s failure and tell ``on_error``; *recorded*: in the inbox, by a
        commit it made before failing (its work after that commit is never done)."""
        logger.error(
            "handler %s failed for event %r (id=%s)%s",
            handler.name,
            event.name,
            event.id,
            " after a commit recorded it in the inbox: a redelivery will not run it again"
            if recorded
            else "",
            exc_info=error,
        )
        await call_hook(self.core.settings.on_error, HandlerFailure(event, handler.name, error))

    async def _run(  # with tracing
        self,
        handler: Handler,
        event: Event,
        batch: Batch,
        child: Batch | None,
        local: bool,
        overrides: bool,
        limit: Limit | None,
        watched: bool,
    ) -> BaseException | None:
        """`_call` in a handler span. *watched*: an inbox or observers would record the call,
        so that one that swallowed its flush's cancellation is cut off (see `dispatch`)."""
        tracing = self.tracing
        assert tracing is not None
        span = tracing.start_handler(event, handler.name, local)
        error: BaseException | None = None
        try:
            error = await self._call(handler, event, batch, child, overrides, limit)
            if error is None and watched and cancelled():  # it swallowed the cancellation,
                raise asyncio.CancelledError  # which `dispatch` raises: its span says so too
        except BaseException as exc:  # cancelled: the span says so, then it propagates
            error = exc
            raise
        finally:
            tracing.end_handler(span, error)
        return error

    async def _call(
        self,
        handler: Handler,
        event: Event,
        batch: Batch,
        child: Batch | None,
        overrides: bool,
        limit: Limit | None,
    ) -> BaseException | None:
        """One call of *handler* (within *limit* if it has a time limit); what it raised
        (not yet logged), or None."""
        try:
            call = self._start(handler, event, batch, child, overrides)
            if limit is None or (timeout := handler.timeout) is None:
                if (result := await call) is not None:
                    await _di.returned(result)
            else:
                limit.start(timeout, handler.name)
                try:
                    if (result := await call) is not None:
                        await _di.returned(result)
                except BaseException as exc:
                    if (timed_out := limit.stop(exc)) is exc:
                        raise
                    raise timed_out from exc
                if (outcome := limit.stop()) is not None:
                    raise outcome
        except BaseException as exc:
            if passes_through(exc):  # this task's cancellation, Ctrl-C
                raise
            return exc
        return None

    def _start(
        self, handler: Handler, event: Event, batch: Batch, child: Batch | None, overrides: bool
    ) -> Coroutine[Any, Any, object]:
        """The coroutine of one call of *handler*: its event argument, its scope (with the
        bus of *child*, if the handler may emit), solved and called by `_di.run_handler`."""
        plan = handler.plan
        arg: object = event if plan.event_model is None else payload_as(event, plan.event_model)
        scope: dict[str, Any] = {}
        if child is not None:
            scope = dict(batch.get_scope())
            scope[SCOPE_KEY] = self.core.make_view(self.core, child)
        return _di.run_handler(plan, handler.func, arg, scope, batch.provider, overrides)


async def _not_yet_handled(
    inbox: Inbox, event: Event, handlers: tuple[Handler, ...]
) -> tuple[Handler, ...]:
    """*handlers* but those the inbox says already succeeded for *event*; all of them if
    it cannot tell (they run again: at-least-once, as without an inbox)."""
    try:
        done = await inbox.handled(event)
    except Exception as exc:
        logger.warning(
            "inbox: could not read which handlers already handled event %r (id=%s), so all run: %r",
            event.name,
            event.id,
            exc,
        )
        return handlers
    if not done:
        return handlers
    skipped = [h.name for h in handlers if h.name in done]
    if skipped:
        logger.info(
            "event %r (id=%s) redelivered: skipping handler(s) that already succeeded: %s",
            event.name,
            event.id,
            ", ".join(skipped),
        )
    return tuple(h for h in handlers if h.name not in done)


async def _record(inbox: Inbox, handler: str, event: Event) -> None:
    """Record *handler*'s success; if that fails, a redelivery runs it again (logged)."""
    try:
        await inbox.record(handler, event)
    except Exception as exc:
        logger.warning(
            "inbox: could not record that handler %s handled event %r (id=%s); a redelivery "
            "would run it again: %r",
            handler,
            event.name,
            event.id,
            exc,
        )


def _identity(func: Callable[..., Any]) -> object:
    """What tells a registered function apart: itself (by identity: an object may define
    ``__eq__``), or a bound method's instance and function (a new object at each access)."""
    if inspect.ismethod(func):
        return id(func.__self__), func.__func__
    return id(func)


def _ended(handler: Handler, limit: Limit | None) -> int:
    """The state of a failed handler call's batch: `FAILED` if a sync handler's time ran out
    (its thread runs on, and what it emits then is refused at `emit`); else `CLOSED` (an
    event a task it started emits later gets a flush of its own)."""
    expired = limit is not None and limit.expired
    return FAILED if expired and not handler.plan.is_async else CLOSED
