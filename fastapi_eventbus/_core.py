"""Shared state behind every view of one bus, and the flush loop."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine, MutableMapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.background import BackgroundTask, BackgroundTasks
from starlette.responses import Response

from . import _di
from ._deadline import Limit, Watchdog
from ._events import Event, SchemaRegistry, payload_as
from ._hooks import DiscardedEvents, HandlerFailure, call_hook, logger
from ._patterns import PatternIndex
from ._retry import Retry
from ._settings import Settings
from ._tracing import Tracing
from .exceptions import CapacityError, ConfigurationError, SpoolError
from .forwarders._base import DeadLetter, DeliveryOutcome, Forwarder
from .storage import SpooledEvent, Storage

SCOPE_KEY = "fastapi_eventbus.bus"
"""ASGI scope key holding the request's (or handler call's) scoped bus."""

COLLECTING, FLUSHING, CLOSED = 0, 1, 2
"""Batch states: collecting until its flush starts; closed once flushed or discarded."""

_FROM_SCOPE: Any = object()

_DISABLED_VALUES = frozenset({"1", "true", "yes", "on"})


def disabled_by_env() -> bool:
    """Whether ``FASTAPI_EVENTBUS_DISABLED`` asks for a no-op bus."""
    return os.environ.get("FASTAPI_EVENTBUS_DISABLED", "").strip().lower() in _DISABLED_VALUES


_CURRENT_EVENT: ContextVar[Event] = ContextVar("fastapi_eventbus.current_event")

unmatched_logger = logging.getLogger("fastapi_eventbus.unmatched")
"""Where the "matches no handler and no forwarder" warning goes (silence it by its name)."""

_UNMATCHED_NAMES_LIMIT = 1024
"""How many distinct unmatched names are remembered (each is warned about once)."""


async def current_event() -> Event:
    """FastAPI dependency: the `Event` being handled, in a handler or its dependencies.

    For handlers that take a typed model but still need the envelope (its
    ``id`` to deduplicate, ``time``, ``source``, trace context):
    ``event: Event = Depends(current_event)``. Works for events emitted in a
    request, published, and handled by a worker.

    Raises:
        ConfigurationError: Resolved outside a handler call (in an endpoint).
    """
    try:
        return _CURRENT_EVENT.get()
    except LookupError:
        raise ConfigurationError(
            "current_event is only available while a handler runs (in the handler "
            "and its dependencies), not in an endpoint"
        ) from None


@dataclass(frozen=True, slots=True)
class Handler:
    """A registered handler and its analysed dependency plan."""

    func: Callable[..., Any]
    plan: _di.HandlerPlan
    patterns: tuple[str, ...]
    name: str
    timeout: float | None = None
    """Seconds one call (dependencies, body, ``yield`` exits) may take; None: no limit."""
    retry: Retry | None = None
    """How often an in-process call is tried again after it failed (not in workers)."""


class Observer(Protocol):
    """Receives what the bus emits and handles (used by `fastapi_eventbus.testing`)."""

    mute: bool

    def on_emit(self, event: Event) -> None: ...

    def on_handled(self, event: Event, handler: str, error: BaseException | None) -> None: ...


class Batch:
    """The events of one request, handler call, WebSocket session or publish call."""

    __slots__ = (
        "accepted",
        "background",
        "current",
        "depth",
        "events",
        "loop",
        "make_scope",
        "provider",
        "runner",
        "scope",
        "sends",
        "state",
        "stopped",
        "task",
    )

    def __init__(
        self,
        scope: MutableMapping[str, Any] | None,
        depth: int,
        state: int = COLLECTING,
        loop: asyncio.AbstractEventLoop | None = None,
        provider: object | None = _FROM_SCOPE,
        make_scope: Callable[[], MutableMapping[str, Any]] | None = None,
    ) -> None:
        self.scope = scope
        """The request's ASGI scope; None until `get_scope` builds one (publish, handle)."""
        self.make_scope = make_scope
        self.depth = depth
        self.state = state
        self.loop = loop
        self.events: deque[Event] = deque()
        self.accepted = 0
        """Events added since the batch last finished (counted in `Core.pending`)."""
        self.current: Event | None = None
        self.task: asyncio.Task[None] | None = None
        self.sends: list[tuple[asyncio.Future[Any], list[Event]]] = []
        self.background: BackgroundTasks | None = None
        """The request's background tasks, until the first event adds the flush to them."""
        self.runner: asyncio.Task[Any] | None = None
        """The task running a request's flush, which shutdown may stop (`Core.stop_flushes`)."""
        self.stopped = False
        """Whether shutdown cancelled `runner`: its flush then reports and returns."""
        if provider is _FROM_SCOPE:
            app = scope.get("app") if scope is not None else None
            provider = app if hasattr(app, "dependency_overrides") else None
        self.provider = provider

    def get_scope(self) -> MutableMapping[str, Any]:
        """The scope handler calls copy: the request's, or one built when first needed."""
        scope = self.scope
        if scope is None:
            assert self.make_scope is not None
            scope = self.scope = self.make_scope()
        return scope

    def child(self) -> Batch:
        """A batch for the events a handler emits (one level deeper in the chain)."""
        return Batch(self.get_scope(), self.depth + 1, COLLECTING, self.loop, self.provider)

    def unfinished(self) -> list[Event]:
        """The event being handled, those still waiting, and those still being forwarded."""
        head = [self.current] if self.current is not None else []
        sending = [e for task, events in self.sends if not task.done() for e in events]
        return head + list(self.events) + [e for e in sending if e not in head]


class Core:
    """Handlers, schemas, settings and in-flight batches shared by all views of a bus."""

    def __init__(
        self,
        settings: Settings,
        make_view: Callable[[Core, Batch], object],
        spool: Storage | None = None,
    ) -> None:
        self.settings = settings
        self.make_view = make_view
        """Builds the `EventBus` a handler gets from ``Depends(get_bus)`` for a child batch."""
        self.handlers: PatternIndex[Handler] = PatternIndex()
        self.forwarders: PatternIndex[Forwarder] = PatternIndex()
        self.schemas = SchemaRegistry()
        self.app: Any = None
        self.active: set[Batch] = set()
        self.observers: list[Observer] = []
        self.tracing: Tracing | None = None
        """Span hooks, set by `fastapi_eventbus.otel.instrument_bus`; None: tracing off."""
        self.spool = spool
        self.pending = 0
        """Events accepted and not yet finished (handled and forwarded), all batches."""
        self._refused = 0
        self._refused_logged = 0.0
        self._unmatched: set[str] = set()
        self._watchdog: Watchdog | None = None
        self._stopping: asyncio.TimerHandle | None = None
        self._scope_template: dict[str, Any] | None = None
        self.lifespan_state: dict[str, Any] = {}
        """What the app's lifespan yielded, as ``request.state`` of handler calls without a
        request; the worker sets it after entering the lifespan."""

    def batch(self, parent: Batch | None, depth: int) -> Batch:
        """A batch for `publish`/`handle`: in *parent*'s scope, or one built when needed."""
        loop = asyncio.get_running_loop()
        if parent is not None:
            return Batch(parent.get_scope(), depth, loop=loop, provider=parent.provider)
        app = self.app
        provider = app if hasattr(app, "dependency_overrides") else None
        return Batch(None, depth, loop=loop, provider=provider, make_scope=self.base_scope)

    async def publish(self, event: Event, parent: Batch | None, depth: int) -> None:
        """Handle and forward *event* now, in a batch of its own (`EventBus.publish`)."""
        batch = self.batch(parent, depth)
        batch.events.append(event)
        batch.accepted = 1
        self.pending += 1
        self.active.add(batch)
        await self.flush(batch)

    async def handle(self, event: Event, parent: Batch | None, depth: int) -> list[HandlerFailure]:
        """Run *event*'s local handlers now, forwarding nothing (`EventBus.handle`)."""
        batch = self.batch(parent, depth)
        batch.state = FLUSHING
        batch.current = event
        self.active.add(batch)
        try:
            return await self.dispatch(event, batch, local=False)
        finally:
            batch.current = None
            batch.state = CLOSED
            self.active.discard(batch)

    def base_scope(self) -> dict[str, Any]:
        """A minimal HTTP scope for handler calls that have no request (publish, workers)."""
        template = self._scope_template
        if template is None or template["app"] is not self.app:
            template = self._scope_template = {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/",
                "raw_path": b"/",
                "root_path": "",
                "query_string": b"",
                "headers": [],
                "client": None,
                "server": None,
                "app": self.app,
            }
        return {**template, "state": dict(self.lifespan_state)}

    # -- a request's events: the one place their batch's lifecycle is decided -------

    def open_request(
        self,
        scope: MutableMapping[str, Any],
        background: BackgroundTasks | None,
        websocket: bool = False,
    ) -> Batch:
        """The batch of a new request: flushed after the response as one of *background*'s
        tasks (FastAPI), or by `flush_after` (Starlette). A WebSocket session's batch is
        flushed as its events come: it has no response to wait for."""
        loop = asyncio.get_running_loop()
        batch = Batch(scope, 0, CLOSED if websocket else COLLECTING, loop)
        batch.background = background
        return batch

    def accept(self, batch: Batch, event: Event) -> None:
        """Add an emitted *event* to *batch*, and see that it will be flushed.

        The request's first event adds the flush to its background tasks; an
        event emitted once the batch is closed (from a task the endpoint started,
        in a WebSocket session) gets a flush task of its own.
        """
        batch.accepted += 1
        self.pending += 1
        if not batch.events:
            self.active.add(batch)
            if batch.background is not None:  # first event of the request: flush after it
                batch.background.tasks.append(FlushTask(self, batch))
                batch.background = None
        batch.events.append(event)
        if batch.state == CLOSED:
            self.schedule(batch)

    def flush_after(self, batch: Batch, response: Response) -> None:
        """The endpoint returned *response*: the events run as its last background task."""
        if batch.state != COLLECTING:
            return
        if not batch.events:
            batch.state = CLOSED  # later emits (from tasks it started) get a flush of their own
            return
        flush = FlushTask(self, batch)
        background = response.background
        if background is None:
            response.background = flush
        elif isinstance(background, BackgroundTasks):
            background.tasks.append(flush)
        else:
            response.background = BackgroundTasks([background, flush])

    async def end_request(self, batch: Batch, exc: BaseException | None) -> None:
        """The request is over (*exc*: what its endpoint raised): what happens to its events.

        Nothing, when the flush ran already (as a background task); flushed now
        (a response with its own ``background=`` skipped the flush task);
        discarded if the endpoint raised; kept with ``keep_events_on_error``.
        """
        if batch.state != COLLECTING:  # usually: the flush ran already, as a background task
            return
        if not batch.events:
            batch.state = CLOSED  # later emits (from tasks it started) get a flush of their own
        elif exc is None:  # the endpoint returned a Response with its own background=
            await self.flush(batch, stoppable=True)
        elif self.settings.keep_events_on_error:
            batch.state = CLOSED
            self.schedule(batch)
        else:
            await self.discard(batch, f"the endpoint raised {type(exc).__name__}", exc)

    def schedule(self, batch: Batch) -> None:
        """Start a tracked task that flushes *batch* (late emits, WebSockets), on its loop."""
        if batch.task is not None and not batch.task.done():
            return
        loop = batch.loop
        assert loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            batch.task = loop.create_task(self.flush(batch, stoppable=True))
        else:
            loop.call_soon_threadsafe(self.schedule, batch)

    # -- flushing ---------------------------------------------------------------

    async def flush(self, batch: Batch, stoppable: bool = False) -> None:
        """Forward and handle *batch*'s events, in emission order, until it is empty.

        Each round hands the pending events to their forwarders (concurrent
        tasks), then runs the local handlers event by event; the flush ends when
        the forwarders have finished too. If it is cancelled, what it did not
        finish (the event being handled included) is reported. A *stoppable*
        flush (a request's) is stopped by `stop_flushes` at shutdown's deadline.
        """
        if batch.state == FLUSHING:
            return
        batch.state = FLUSHING
        if stoppable:
            batch.runner = asyncio.current_task()
        try:
            while batch.events:
                round_ = list(batch.events)
                if self.forwarders:
                    self._forward(round_, batch)
                for _ in round_:
                    if not batch.events:  # reported and cleared by drain meanwhile
                        break
                    event = batch.current = batch.events.popleft()
                    await self.dispatch(event, batch)
                batch.current = None
            if batch.sends:  # cancelled sends (by drain) were reported there: no raise here
                await asyncio.gather(*(task for task, _ in batch.sends), return_exceptions=True)
                batch.sends.clear()  # a WebSocket session's batch is flushed many times
        except asyncio.CancelledError:
            if not batch.stopped or _uncancel() > 0:
                raise  # not (only) shutdown's own cancellation: it goes on up
        finally:
            if batch.current is not None:  # its handlers were running: it did not finish
                batch.events.appendleft(batch.current)
                batch.current = None
            batch.state = CLOSED
            batch.runner = None
            await self._abandon(batch)
            self.active.discard(batch)
            self._finished(batch)

    def _finished(self, batch: Batch) -> None:
        self.pending -= batch.accepted
        batch.accepted = 0

    def _forward(self, events: list[Event], batch: Batch) -> None:
        """Start one send per forwarder, with the events of *events* that it matches."""
        selected: dict[Forwarder, list[Event]] = {}
        for event in events:
            for forwarder in self.forwarders.match(event.name):
                selected.setdefault(forwarder, []).append(event)
        for forwarder, chosen in selected.items():
            batch.sends.append((asyncio.ensure_future(self.send(forwarder, chosen)), chosen))

    def send(self, forwarder: Forwarder, events: list[Event]) -> Coroutine[Any, Any, object]:
        """Deliver *events* through *forwarder* (traced, if tracing is on)."""
        if self.tracing is None:
            return self._deliver(forwarder, events)
        return self.tracing.deliver(forwarder, events, self._deliver)

    async def _deliver(self, forwarder: Forwarder, events: Sequence[Event]) -> DeliveryOutcome:
        """`Forwarder.deliver`, and with a spool, the spool's bookkeeping of the outcome."""
        spool = self.spool
        if spool is None:
            return await forwarder.deliver(events)
        outcome = await forwarder.deliver(events, keep_unsent=True)
        try:
            await self._settle_spool(spool, forwarder, events, outcome)
        except SpoolError as exc:  # the rows stay: sent again later, duplicates at worst
            logger.error("forwarder %s: %s", forwarder.name, exc)
        return outcome

    async def _settle_spool(
        self,
        spool: Storage,
        forwarder: Forwarder,
        events: Sequence[Event],
        outcome: DeliveryOutcome,
    ) -> None:
        settled = spool.settle(forwarder.name, events, outcome.dead, outcome.unsent, outcome.error)
        if settled.spent:
            await forwarder.give_up(settled.spent, settled.reason)

    async def resend(self, limit: int = 500) -> int:
        """Send again the spooled events that are due (see `Spool.claim`); how many."""
        spool = self.spool
        if spool is None:
            return 0
        unreadable: list[SpooledEvent] = []  # dead-lettered and logged by claim
        due = spool.claim(limit, unreadable=unreadable)
        by_name = {forwarder.name: forwarder for forwarder in self.forwarders.items()}
        for item in unreadable:  # the app hears of it as of any dead letter of the spool
            if (owner := by_name.get(item.forwarder)) is not None:
                report = DeadLetter(owner.name, (item.event,), item.error or "unreadable")
                await call_hook(owner.dead_letter, report)
        if not due:
            return len(unreadable)
        groups: dict[str, list[Event]] = {}
        for item in due:
            groups.setdefault(item.forwarder, []).append(item.event)
        sends = []
        for name, events in groups.items():
            forwarder = by_name.get(name)
            if forwarder is None:
                logger.warning(
                    "spool %s: %d event(s) for forwarder %r, which this bus does not have; "
                    "they wait for an application that does",
                    spool.name,
                    len(events),
                    name,
                )
                spool.settle(name, events, unsent=events, error=f"no forwarder named {name!r} here")
                continue
            logger.info("spool: sending %d event(s) again through %s", len(events), name)
            sends.append(self.send(forwarder, events))
        await asyncio.gather(*sends)
        return len(due) + len(unreadable)

    async def resend_forever(self) -> None:
        """Call `resend` every ``resend_interval`` seconds (the installed lifespan runs this)."""
        spool = self.spool
        assert spool is not None
        while True:
            try:
                while await self.resend() > 0:
                    pass
            except SpoolError as exc:
                logger.error("%s", exc)
            except Exception:
                logger.exception("resending spooled events failed")
            await asyncio.sleep(spool.resend_interval)

    def admit(self, batch: Batch | None) -> None:
        """Raise `CapacityError` (and log it) if one more event would exceed a limit."""
        limit = self.settings.max_batch_events
        if batch is not None and limit is not None and batch.accepted >= limit:
            self._refuse(
                f"this request (or handler call) already emitted {batch.accepted} events, "
                f"the max_batch_events limit"
            )
        limit = self.settings.max_pending_events
        if limit is not None and self.pending >= limit:
            self._refuse(
                f"{self.pending} events are pending (not yet handled and forwarded), the "
                f"max_pending_events limit: the handlers or brokers are not keeping up"
            )

    def _refuse(self, why: str) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= 1.0:  # at most one line a second under overload
            logger.warning("event refused (%d in the last second or so): %s", self._refused, why)
            self._refused, self._refused_logged = 0, now
        raise CapacityError(f"event refused: {why}")

    async def _abandon(self, batch: Batch) -> None:
        """After a cancelled flush: stop its sends and report what was not handled."""
        if not batch.sends and not batch.events:
            return
        unsent = [event for task, events in batch.sends if not task.done() for event in events]
        for task, _ in batch.sends:
            task.cancel()
        batch.sends.clear()
        waiting = {event.id for event in batch.events}
        batch.events.extend(event for event in unsent if event.id not in waiting)
        if batch.events:
            spooled = "; those for forwarders stay in the spool" if self.spool else ""
            why = "shutdown stopped the flush" if batch.stopped else "the flush was cancelled"
            # Not forgotten by the spool: these were accepted, and are sent again later.
            await self.discard(batch, f"{why}{spooled}", forget=False, level=logging.ERROR)

    def begin_shutdown(self) -> None:
        """The server was told to stop: `stop_flushes` in ``shutdown_timeout`` seconds."""
        if self._stopping is None:
            loop = asyncio.get_running_loop()
            self._stopping = loop.call_later(self.settings.shutdown_timeout, self.stop_flushes)

    def stop_flushes(self) -> None:
        """Cancel the requests' flushes still running: each reports its unfinished events.

        Called ``shutdown_timeout`` seconds after the server was told to stop, so
        that neither a server waiting for background tasks (uvicorn without
        ``--timeout-graceful-shutdown``) nor a hung handler holds the process.
        """
        for batch in list(self.active):
            runner = batch.runner
            if runner is not None and not runner.done() and not batch.stopped:
                batch.stopped = True
                runner.cancel()

    async def dispatch(
        self, event: Event, batch: Batch, local: bool = True
    ) -> list[HandlerFailure]:
        """Run every handler matching *event*, one after the other, isolating failures.

        Events a handler emits (through ``Depends(get_bus)``) go to a child batch,
        handled right after that handler returns, or discarded if it raised.
        Returns the failures (already logged and passed to ``on_error``).
        *local* is False for an event that came from a broker: for tracing, and
        its handlers are not retried here (the broker's redelivery is the retry).
        """
        failures: list[HandlerFailure] = []
        handlers = self.handlers.match(event.name)
        if not handlers and (not local or not self.forwarders.match(event.name)):
            self._no_match(event, local)
        token = _CURRENT_EVENT.set(event)
        try:
            for handler in handlers:
                plan = handler.plan
                # Read at every call, as FastAPI reads them at every request.
                overrides = _di.has_overrides(batch.provider)
                child = batch.child() if plan.uses_solver and (plan.may_emit or overrides) else None
                try:
                    if self.tracing is None:  # one coroutine less per call: the hot path
                        error = await self._call(handler, event, batch, child, overrides)
                    else:
                        error = await self._run(handler, event, batch, child, local, overrides)
                    if error is not None and handler.retry is not None and local:
                        error, child = await self._retry(handler, event, batch, child, error)
                except asyncio.CancelledError:  # what the handler emitted is reported too
                    if child is not None and child.events:
                        reason = f"handler {handler.name} was cancelled"
                        await self.discard(child, reason, forget=False, level=logging.ERROR)
                    raise
                if error is not None:
                    await self._failed(handler, event, error)
                    failures.append(HandlerFailure(event, handler.name, error))
                for observer in self.observers:
                    observer.on_handled(event, handler.name, error)
                if child is None or not child.events:
                    continue
                if error is not None:
                    await self.discard(child, f"handler {handler.name} failed", error)
                else:
                    self.active.add(child)
                    await self.flush(child)
        finally:
            _CURRENT_EVENT.reset(token)
        return failures

    def _no_match(self, event: Event, local: bool) -> None:
        """Warn, once per name, about an event that nothing handles (or forwards)."""
        seen = self._unmatched
        if event.name in seen or len(seen) >= _UNMATCHED_NAMES_LIMIT:
            return
        seen.add(event.name)
        unmatched_logger.warning(
            "event %r (id=%s) matches no handler%s: check the patterns given to %s "
            "(warned once per event name)",
            event.name,
            event.id,
            " and no forwarder" if local else "",
            "@bus.on and bus.forward" if local else "@bus.on",
        )

    async def _retry(
        self,
        handler: Handler,
        event: Event,
        batch: Batch,
        child: Batch | None,
        failed: BaseException,
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
            if child is not None and child.events:
                await self.discard(
                    child, f"handler {handler.name} failed (attempt {attempt})", error
                )
            limit = (
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
                limit,
                error,
                delay,
            )
            await asyncio.sleep(delay)
            attempt += 1
            plan = handler.plan
            overrides = _di.has_overrides(batch.provider)
            child = batch.child() if plan.uses_solver and (plan.may_emit or overrides) else None
            if self.tracing is None:
                error = await self._call(handler, event, batch, child, overrides)
            else:
                error = await self._run(handler, event, batch, child, True, overrides)
        return error, child

    def _limit(self, seconds: float, handler: Handler) -> Limit:
        """*handler*'s time limit, watched by this event loop's watchdog."""
        loop = asyncio.get_running_loop()
        watchdog = self._watchdog
        if watchdog is None or watchdog.loop is not loop:  # a bare TestClient: a loop a request
            watchdog = self._watchdog = Watchdog(loop)
        return Limit(watchdog, seconds, handler.name)

    async def _failed(self, handler: Handler, event: Event, error: BaseException) -> None:
        logger.error(
            "handler %s failed for event %r (id=%s)",
            handler.name,
            event.name,
            event.id,
            exc_info=error,
        )
        await call_hook(self.settings.on_error, HandlerFailure(event, handler.name, error))

    async def _run(  # with tracing
        self,
        handler: Handler,
        event: Event,
        batch: Batch,
        child: Batch | None,
        local: bool,
        overrides: bool,
    ) -> BaseException | None:
        tracing = self.tracing
        assert tracing is not None
        span = tracing.start_handler(event, handler.name, local)
        error: BaseException | None = None
        try:
            error = await self._call(handler, event, batch, child, overrides)
        except BaseException as exc:  # cancelled: the span says so, then it propagates
            error = exc
            raise
        finally:
            tracing.end_handler(span, error)
        return error

    async def _call(
        self, handler: Handler, event: Event, batch: Batch, child: Batch | None, overrides: bool
    ) -> BaseException | None:
        """One call of *handler*; what it raised (not yet logged), or None."""
        plan = handler.plan
        try:
            arg: object = event
            if plan.event_model is not None:
                arg = payload_as(event, plan.event_model)
            scope: dict[str, Any] = {}
            if child is not None:
                scope = dict(batch.get_scope())
                scope[SCOPE_KEY] = self.make_view(self, child)
            if (timeout := handler.timeout) is None:
                await _di.run_handler(plan, handler.func, arg, scope, batch.provider, overrides)
            else:
                with self._limit(timeout, handler):
                    await _di.run_handler(plan, handler.func, arg, scope, batch.provider, overrides)
        except Exception as exc:
            return exc
        return None

    async def discard(
        self,
        batch: Batch,
        reason: str,
        exc: BaseException | None = None,
        *,
        forget: bool = True,
        level: int | None = None,
    ) -> None:
        """Drop *batch*'s pending events, with a log line and the ``on_discard`` hook.

        With *forget* (the endpoint or handler raised: the events must never be
        sent), they leave the spool too; otherwise the spool sends them later.
        """
        events = tuple(batch.events)
        batch.events.clear()
        batch.state = CLOSED
        self.active.discard(batch)
        self._finished(batch)
        if not events:
            return
        if forget and self.spool is not None:
            try:
                self.spool.forget(events)
            except SpoolError as error:
                logger.error("discarded events stay in the spool: %s", error)
        ids = ", ".join(e.id for e in events)
        if level is None:
            level = logging.INFO if reason.startswith("the endpoint raised") else logging.WARNING
        logger.log(level, "discarded %d event(s) because %s: %s", len(events), reason, ids)
        await call_hook(self.settings.on_discard, DiscardedEvents(events, reason, exc))

    # -- shutdown ---------------------------------------------------------------

    async def drain(self, timeout: float) -> list[Event]:
        """Wait up to *timeout* seconds for in-flight batches; report what did not finish."""
        deadline = time.monotonic() + timeout
        # Polling, not an asyncio.Event: a bare TestClient runs each request on its own loop.
        while self.active and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        unfinished = [event for batch in list(self.active) for event in batch.unfinished()]
        for batch in self.active:  # reported here, so not again if their task is cancelled
            batch.events.clear()
            batch.current = None
            for task, _ in batch.sends:
                task.cancel()
            batch.sends.clear()
            self._finished(batch)
        self.active.clear()
        if self._stopping is not None:  # the bus may serve again (another app, a new lifespan)
            self._stopping.cancel()
            self._stopping = None
        if unfinished:
            spooled = "; those for forwarders stay in the spool" if self.spool else ""
            logger.error(
                "shutdown: %d event(s) did not finish within %.1fs%s: %s",
                len(unfinished),
                timeout,
                spooled,
                ", ".join(e.id for e in unfinished),
            )
            reason = f"shutdown did not finish within {timeout}s{spooled}"
            await call_hook(self.settings.on_discard, DiscardedEvents(tuple(unfinished), reason))
        return unfinished

    async def close_forwarders(self) -> None:
        """Close every forwarder's clients; a failing close is logged, not raised."""
        for forwarder in self.forwarders.items():
            try:
                await forwarder.aclose()
            except Exception:
                logger.exception("closing forwarder %s failed", forwarder.name)


def _uncancel() -> int:
    """Withdraw one cancellation of the current task; how many are still requested."""
    task = asyncio.current_task()
    assert task is not None
    return task.uncancel()


class FlushTask(BackgroundTask):
    """A request's flush, as one of its background tasks.

    What ``BackgroundTasks.add_task(core.flush, batch, True)`` adds, without its
    per-call check of whether the function is async (it is).
    """

    def __init__(self, core: Core, batch: Batch) -> None:
        # BackgroundTask's own attributes (FastAPI's telemetry reads `func`), typed by ParamSpec.
        self.func = core.flush  # type: ignore[assignment]
        self.args = (batch, True)  # type: ignore[assignment]
        self.kwargs = {}  # type: ignore[assignment]
        self.is_async = True
