"""Shared state behind every view of one bus, and the flush loop."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any

from starlette.background import BackgroundTasks
from starlette.responses import Response

from ._batch import (
    CLOSED,
    COLLECTING,
    FLUSHING,
    Batch,
    FlushTask,
    base_scope,
    caught_by_a_dependency,
    raised_after_return,
)
from ._deadline import allowance, running_loop, uncancel, within
from ._di import Handler
from ._dispatch import Dispatcher, Inbox
from ._events import Event, SchemaRegistry, make_event, resolve_emit_args
from ._hooks import (
    DiscardedEvents,
    HandlerFailure,
    Observer,
    call_hook,
    finish_hook,
    logger,
    start_hook,
)
from ._patterns import PatternIndex
from ._sending import Sender
from ._settings import Settings
from ._shutdown import Shutdown
from ._tracing import Tracing
from .exceptions import CapacityError, ConfigurationError, EventChainError, SpoolError
from .forwarders._base import Forwarder
from .storage import Outbox, Storage

LOCAL = ""
"""The destination of an event's local handlers, beside its forwarders' names."""
_CAUGHT = ", which a yield dependency caught without raising it again (FastAPI answers 500)"


class Core:
    """Handlers, schemas, settings and in-flight batches shared by all views of a bus."""

    def __init__(
        self,
        settings: Settings,
        make_view: Callable[[Core, Batch], object],
        spool: Storage | None = None,
        outbox: Outbox | None = None,
        inbox: Inbox | None = None,
    ) -> None:
        self.settings = settings
        self.make_view = make_view
        """Builds the `EventBus` a handler gets from ``Depends(get_bus)`` for a child batch."""
        self.dispatcher = Dispatcher(self)
        """Runs the handlers of each event (`Dispatcher.dispatch`)."""
        self.handlers: PatternIndex[Handler] = self.dispatcher.handlers
        self.sender = Sender(spool, settings.on_discard)
        """The forwarders, and the storage their events wait in."""
        self.forwarders: PatternIndex[Forwarder] = self.sender.forwarders
        self.schemas = SchemaRegistry()
        self.app: Any = None
        self.active: set[Batch] = set()
        self.observers: list[Observer] = []
        self.tracing: Tracing | None = None
        """Span hooks, set by `set_tracing`; None: tracing off."""
        self.spool = spool
        self.outbox: Outbox | None = None
        """Where events emitted with ``session=`` wait for their transaction (`Outbox`)."""
        for given, method, kind in ((outbox, "join", "Outbox"), (inbox, "handled", "Inbox")):
            if given is not None and not callable(getattr(given, method, None)):
                raise ConfigurationError(
                    f"{kind.lower()}= takes a fastapi_eventbus.outbox.SQLAlchemy{kind}, "
                    f"got {type(given).__name__}"
                )
        if outbox is not None:
            outbox.attach(self)
            self.outbox = outbox
        if inbox is not None:
            self.dispatcher.inbox = inbox
        self.jobs: set[asyncio.Future[None]] = set()
        """`after_response` work running outside a request's flush (`spawn`)."""
        self.pending = 0
        """Events accepted and not yet finished (handled and forwarded), all batches."""
        self._batch_limit = math.inf if (n := settings.max_batch_events) is None else n
        self._pending_limit = math.inf if (n := settings.max_pending_events) is None else n
        """`max_batch_events` and `max_pending_events` (None: no limit) for `admit`."""
        self._refused, self._refused_logged = 0, 0.0
        self.shutdown = Shutdown(self)
        """Stopping the requests' flushes, draining, and what comes after (`Shutdown`)."""
        self.serving = False
        """Whether the installed lifespan runs (spool resender, outbox relay, drain at exit)."""
        self.lifespan_state: dict[str, Any] = {}
        """The app's lifespan's state: ``request.state`` of handler calls without a request."""

    def forward(self, patterns: list[str], forwarder: Forwarder) -> None:
        """`EventBus.forward`: a spool or an outbox files events by forwarder name."""
        kept = "an outbox" if self.outbox is not None else None
        self.sender.add(patterns, forwarder, "a spool" if self.spool is not None else kept)

    def set_tracing(self, tracing: Tracing | None) -> None:
        """Turn tracing on (`fastapi_eventbus.otel.instrument_bus`) or off (None)."""
        self.tracing = self.sender.tracing = self.dispatcher.tracing = tracing

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

    async def handle(
        self, event: Event, parent: Batch | None, depth: int, local: bool = False
    ) -> list[HandlerFailure]:
        """*event*'s local handlers now (`EventBus.handle`; *local*: an outbox's, retried)."""
        batch = self.batch(parent, depth)
        batch.state = FLUSHING
        batch.current = event
        self.active.add(batch)
        try:
            return await self.dispatcher.dispatch(event, batch, local=local, redelivered=True)
        finally:
            batch.current = None
            batch.state = CLOSED
            self.active.discard(batch)

    def destinations(self, name: str) -> list[str]:
        """Where an event called *name* goes, as an outbox records it: ``""``, the local
        handlers (also if nothing matches: relayed until a process has one), and forwarders."""
        forwarders = [f.name for f in self.forwarders.match(name)] if self.forwarders.size else []
        if self.handlers.match(name) or not forwarders:
            forwarders.insert(0, LOCAL)
        return forwarders

    async def deliver_to(self, destination: str, events: list[Event]) -> list[tuple[Event, str]]:
        """Run *events*' local handlers (*destination* ``""``), or send them through the
        forwarder named *destination* (an outbox's events); those to try again, with why
        (a handler failed, the forwarder did not send, nothing here takes them: a WARNING)."""
        if destination != LOCAL:
            if (forwarder := self.sender.named(destination)) is None:
                return nowhere(events, f"no forwarder named {destination!r} in this application")
            outcome = await self.sender.send_kept(forwarder, events)
            return [(event, outcome.error or "not sent") for event in outcome.unsent]
        handled: list[Event] = []  # unhandled: a release (or process) with a handler may come
        unhandled: list[Event] = []
        for event in events:
            (handled if self.handlers.match(event.name) else unhandled).append(event)
        failed = nowhere(unhandled, "no handler for it in this application") if unhandled else []
        for event in handled:
            wait = allowance(self.dispatcher.time_limit(event.name, retried=True))
            done, failures = await within(self.handle(event, None, 0, local=True), wait)
            if not done:  # one ignored its cancellation: cancelled once more; tried again
                why = f"its handlers still ran {wait:g}s after they started (cancelled)"
                logger.error("event %r (id=%s): %s", event.name, event.id, why)
                failed.append((event, why))
            elif failures:
                why = "; ".join(f"handler {f.handler} raised {f.exception!r}" for f in failures)
                failed.append((event, why))
        return failed

    def base_scope(self) -> dict[str, Any]:
        """A minimal HTTP scope for handler calls that have no request (publish, workers)."""
        return base_scope(self.app, dict(self.lifespan_state))

    # -- a request's events: the one place their batch's lifecycle is decided -------

    def open_request(
        self,
        scope: MutableMapping[str, Any],
        background: BackgroundTasks | None,
        websocket: bool = False,
        depth: int = 0,
    ) -> Batch:
        """The batch of a new request: flushed after the response as one of *background*'s
        tasks (FastAPI), or by `flush_after` (Starlette). A WebSocket session's batch is
        flushed as its events come: it has no response to wait for. (At chain *depth*: a
        handler's view of another bus.)"""
        loop = asyncio.get_running_loop()
        batch = Batch(scope, depth, CLOSED if websocket else COLLECTING, loop)
        batch.background = background
        return batch

    def accept(self, batch: Batch, event: Event) -> None:
        """Add an emitted *event* to *batch*, and see that it will be flushed: the request's
        first event adds the flush to its background tasks; an event emitted once the batch is
        closed (a task's, a WebSocket session's) gets a flush of its own."""
        batch.accepted += 1
        self.pending += 1
        if not batch.events:
            self.active.add(batch)
            if batch.background is not None:  # first event of the request: flush after it
                FlushTask.add(batch.background, self.flush, batch)
                batch.background = None
        batch.events.append(event)
        if batch.state == CLOSED:
            self.schedule(batch)

    def after_response(
        self, batch: Batch | None, job: Callable[[], Awaitable[None]], what: str | None = None
    ) -> None:
        """Run *job* (which never raises) after *batch*'s response, in its flush; or at once
        when there is no response to wait for (no request, or it was sent already): a task of
        its own, named *what* (`spawn`). Safe to call from another thread (a sync endpoint)."""
        if batch is None or batch.state != COLLECTING:
            self.spawn(job, batch.loop if batch is not None else None, what)
            return
        if not batch.events and not batch.jobs:
            self.active.add(batch)
            if batch.background is not None:  # nothing to flush yet: flush after it
                FlushTask.add(batch.background, self.flush, batch)
                batch.background = None
        if batch.jobs is None:
            batch.jobs = []
        batch.jobs.append((job, what))

    def spawn(
        self,
        job: Callable[[], Awaitable[None]],
        loop: asyncio.AbstractEventLoop | None = None,
        what: str | None = None,
    ) -> None:
        """Run *job* as a task of its own on *loop* (the running one by default), which
        `drain` waits for at shutdown; *what* it does names it in a report (the task's name)."""
        running = running_loop()
        loop = loop or running
        if loop is None:
            raise RuntimeError("no event loop to run the job on")
        if running is not loop:
            loop.call_soon_threadsafe(self.spawn, job, loop, what)
            return
        task = asyncio.ensure_future(job())
        if what is not None and isinstance(task, asyncio.Task):
            task.set_name(what)
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)

    def flush_after(self, batch: Batch, response: Response) -> None:
        """The endpoint returned *response*: the events run as its last background task."""
        batch.forget_bus()
        if batch.state != COLLECTING:
            return
        if not batch.events and not batch.jobs:
            batch.state = CLOSED  # later emits (from tasks it started) get a flush of their own
            return
        # After the response's own background, and even if that raises.
        response.background = FlushTask(self.flush, batch, response.background)

    def end_request(
        self, batch: Batch, exc: BaseException | None, stacked: bool = False
    ) -> Coroutine[Any, Any, None] | None:
        """The request is over (*exc*: what its endpoint raised; *stacked*: passed on by
        FastAPI's request exit stack): what happens to its events.

        Nothing, when the flush ran already (as a background task); flushed now if the endpoint
        returned (a response with its own ``background=``, or that failed while being sent,
        skipped the flush task); discarded if it raised; kept with ``keep_events_on_error``.
        Returns the flush or the discard to await, or None (most requests: nothing to await).
        """
        batch.forget_bus()
        if batch.state != COLLECTING:  # usually: the flush ran already, as a background task
            return None
        if not batch.events and not batch.jobs:
            batch.state = CLOSED  # later emits (from tasks it started) get a flush of their own
            return None
        caught = exc is None and stacked and (exc := caught_by_a_dependency()) is not None
        after = None if exc is None else raised_after_return(exc, stacked, batch.scope)
        if after == "response" or after == "exit":
            what = "the response" if after == "response" else "a dependency's exit code"
            ids = ", ".join(event.id for event in batch.events)
            logger.warning("%s failed (%r) but the endpoint returned: handled: %s", what, exc, ids)
        cancelled = after is not None and isinstance(exc, asyncio.CancelledError)
        if cancelled or (after is None and exc is not None and self.settings.keep_events_on_error):
            batch.state = CLOSED  # cancelled: the request's task is (a middleware's task group,
            self.schedule(batch)  # a time limit): the events get a task of their own
            return None
        if exc is None or after is not None:
            return self.flush(batch, stoppable=True)
        hook = self.settings.on_discard
        why = f"the endpoint raised {type(exc).__name__}{_CAUGHT if caught else ''}"
        report = self.drop(batch, why, exc)
        if report is None or (task := start_hook(hook, report)) is None:
            return None  # no async hook: done. Else its task must not hold the response:
        if not self.serving:  # awaited by the caller if no lifespan waits for it (a bare
            return finish_hook(hook, task)  # TestClient closes the loop after the request)
        self.spawn(lambda: finish_hook(hook, task), batch.loop, f"on_discard of {report.ids}")
        return None

    def schedule(self, batch: Batch) -> None:
        """Start a tracked task that flushes *batch* (late emits, WebSockets), on its loop."""
        if batch.task is not None and not batch.task.done():
            return
        loop = batch.loop
        assert loop is not None
        if running_loop() is loop:
            batch.task = loop.create_task(self.flush(batch, stoppable=True))
        else:
            loop.call_soon_threadsafe(self.schedule, batch)

    # -- flushing ---------------------------------------------------------------

    async def flush(self, batch: Batch, stoppable: bool = False) -> None:
        """Forward and handle *batch*'s events, in emission order, until it is empty.

        Each round hands the pending events to their forwarders (concurrent tasks), then runs
        the local handlers event by event; the flush ends when the forwarders have finished
        too, and no event came meanwhile (a WebSocket session's, a task's). If it is cancelled,
        what it did not finish (the event being handled included) is reported. A *stoppable*
        flush (a request's) is stopped by `stop_flushes` at shutdown's deadline."""
        if batch.state == FLUSHING:
            return
        batch.state = FLUSHING
        if stoppable:
            batch.runner = asyncio.current_task(batch.loop)
        dispatch = self.dispatcher.dispatch
        events = batch.events
        ended = False  # the loop found nothing left: it was not cancelled
        try:
            while events or batch.jobs or batch.sends:  # events come while it awaits sends
                while events:
                    if self.forwarders.size:
                        batch.sends += self.sender.start(list(events))
                    for _ in range(len(events)):  # this round: the events the forwarders got
                        if not events:  # reported and cleared by drain meanwhile
                            break
                        event = batch.current = events.popleft()
                        await dispatch(event, batch)
                    batch.current = None
                while batch.jobs:
                    await batch.jobs.pop(0)[0]()
                if batch.sends:  # cancelled sends (by drain) were reported there: no raise
                    sends = list(batch.sends)  # drain may clear them meanwhile
                    outcomes = await asyncio.gather(*(t for t, _ in sends), return_exceptions=True)
                    for (_, sent), outcome in zip(sends, outcomes, strict=True):
                        if isinstance(outcome, Exception):  # a bug: in a storage, say
                            await self.sender.broke(sent, outcome)
                    batch.sends.clear()  # a WebSocket session's batch is flushed many times
            ended = True
        except asyncio.CancelledError:
            if not batch.stopped or uncancel() > 0:
                raise  # not (only) shutdown's own cancellation: it goes on up
        finally:
            if batch.current is not None:  # its handlers were running: it did not finish
                batch.events.appendleft(batch.current)
                batch.current = None
            batch.state = CLOSED
            batch.runner = batch.limit = None
            for job, what in batch.jobs or ():  # cancelled before its jobs: each runs alone
                self.spawn(job, batch.loop, what)
            batch.jobs = None
            if not ended or not batch.events:
                self.active.discard(batch)
                self.finished(batch)
                if not ended and (batch.sends or batch.events):  # cancelled: what it did not
                    if batch.task is asyncio.current_task():  # finish is reported, last; an
                        batch.task = None  # event emitted while the hook runs: `schedule`
                    await self._abandon(batch)
            if ended and batch.events:  # a thread's, after the loop's last look (it saw the
                self.again(batch)  # batch FLUSHING): flushed again, not reported as cancelled

    def again(self, batch: Batch) -> None:  # a thread's events came as *batch*'s flush ended
        self.active.add(batch)
        if (uncounted := len(batch.events) - batch.accepted) > 0:  # `finished` took them
            batch.accepted += uncounted
            self.pending += uncounted
        if batch.task is asyncio.current_task():
            batch.task = None
        self.schedule(batch)

    def finished(self, batch: Batch) -> None:
        """*batch* is done: its events no longer count as pending."""
        self.pending -= batch.accepted
        batch.accepted = 0

    def emit(
        self, batch: Batch, event: object, payload: Any, has_payload: bool, extensions: object
    ) -> Event:
        """`EventBus.emit` into a request's (or handler call's) *batch*: `make`, `accept`.

        Into a finished batch (a late emit: a task's, a thread's), only if the shutdown
        lets it (`Shutdown.late`)."""
        if batch.state >= CLOSED:
            with self.shutdown.late(batch):
                event_obj, deliver = self.make(event, payload, has_payload, batch, None, extensions)
                if deliver:
                    self.accept(batch, event_obj)
                return event_obj
        event_obj, deliver = self.make(event, payload, has_payload, batch, None, extensions)
        if deliver:
            self.accept(batch, event_obj)
        return event_obj

    def make(
        self,
        event: object,
        payload: Any,
        has_payload: bool,
        batch: Batch | None,
        depth: int | None = None,
        extensions: object = None,
        join: Callable[[Event], None] | None = None,
    ) -> tuple[Event, bool]:
        """`emit`'s and `publish`'s arguments, validated, as an `Event` (in *batch*, at chain
        *depth*: the batch's by default), shown to the observers; and whether to deliver it.

        A delivered event is first admitted (capacity limits) and, with a spool,
        written there for each forwarder it matches; or, given *join* (`make_in`),
        handed to it instead (an outbox keeps it): all before the caller returns, and
        before the observers see it (what *join* refuses was not emitted). The usual
        event (a str name, no schema, nobody else to tell: no forwarder, observer or
        tracing) takes a short way through the same checks.
        """
        settings = self.settings
        if depth is None:
            depth = batch.depth if batch is not None else 0
        plain = (
            join is None
            and type(event) is str
            and not self.forwarders.size
            and not self.observers
            and self.tracing is None
            and not settings.disabled
            and self.schemas.empty
            and depth <= settings.max_chain_depth
        )
        name, data, text = resolve_emit_args(
            self.schemas, event, payload if has_payload else None, has_payload, text=not plain
        )
        if plain:
            event_obj = make_event(name, data, settings.source, None, extensions)
            self.admit(batch)
            return event_obj, True
        if depth > settings.max_chain_depth:
            raise EventChainError(
                f"event {name!r} would be chain level {depth}, deeper than max_chain_depth="
                f"{settings.max_chain_depth}: a handler keeps emitting events that lead to itself"
            )
        forwarders = self.forwarders.match(name) if self.forwarders.size else ()
        # The payload's JSON is kept for the forwarders and the spool (made here if not yet).
        text = text if forwarders else None
        event_obj = make_event(name, data, settings.source, text, extensions)
        muted = self.observers and any(observer.mute for observer in self.observers)
        deliver = not (settings.disabled or muted)
        if deliver:
            self.admit(batch)
        done = self.tracing.emitted(event_obj) if deliver and self.tracing is not None else None
        try:  # its span is open: its trace context is in the message each forwarder checks
            for forwarder in forwarders:
                forwarder.check(event_obj)
            if deliver and join is not None:
                join(event_obj)
            elif deliver and forwarders and self.spool is not None:  # with its trace context
                self.spool.add([(forwarder.name, event_obj) for forwarder in forwarders])
        except BaseException as exc:
            if done is not None:  # refused: never accepted, its span fails
                done(exc)
            raise
        if done is not None:
            done(None)
        for observer in self.observers:
            observer.on_emit(event_obj)
        return event_obj, deliver

    def make_in(
        self,
        session: object,
        event: object,
        payload: Any,
        has_payload: bool,
        batch: Batch | None,
        extensions: object = None,
    ) -> Event:
        """``emit(..., session=)``: `make` the event (not stored: the outbox keeps it), and
        have the outbox add it to *session*'s transaction instead of *batch*."""
        outbox = self.outbox
        if outbox is None:
            raise ConfigurationError(
                "emit(..., session=) needs a bus with an outbox: "
                "EventBus(outbox=SQLAlchemyOutbox(engine)) from fastapi_eventbus.outbox"
            )
        event_obj, _ = self.make(
            event,
            payload,
            has_payload,
            batch,
            extensions=extensions,
            join=lambda made: outbox.join(session, made, batch),
        )
        return event_obj

    def admit(self, batch: Batch | None) -> None:
        """Raise `CapacityError` (and log it) if one more event would exceed a limit."""
        if batch is not None and batch.accepted >= self._batch_limit:
            self._refuse(
                f"this request (or handler call) already emitted {batch.accepted} events, "
                f"the max_batch_events limit"
            )
        if self.pending >= self._pending_limit:
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
        """After a cancelled flush: stop its sends and report what was not handled (and not
        sent: a send still running, or one the flush's cancellation cancelled with it)."""
        unsent = [
            e for task, events in batch.sends if not task.done() or task.cancelled() for e in events
        ]
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

    async def discard(
        self, batch: Batch, reason: str, exc: BaseException | None = None, **how: Any
    ) -> None:
        """`drop` *batch*'s pending events (*how*: its options), then tell ``on_discard``."""
        if (report := self.drop(batch, reason, exc, **how)) is not None:
            await call_hook(self.settings.on_discard, report)

    def drop(
        self,
        batch: Batch,
        reason: str,
        exc: BaseException | None = None,
        *,
        forget: bool = True,
        level: int | None = None,
        state: int = CLOSED,
    ) -> DiscardedEvents | None:
        """Drop *batch*'s pending events, with a log line; the batch is then in *state*
        (`FAILED`: what is emitted into it later is refused). What to tell ``on_discard``,
        if events were dropped.

        With *forget* (the endpoint or handler raised: the events must never be
        sent), they leave the spool too; otherwise the spool sends them later.
        """
        events = tuple(batch.events)
        batch.events.clear()
        for job, what in batch.jobs or ():  # not events of this batch: committed data's, run anyway
            self.spawn(job, batch.loop, what)
        batch.jobs = None
        batch.state = state
        self.active.discard(batch)
        self.finished(batch)
        if not events:
            return None
        if forget and self.spool is not None:
            try:
                self.spool.forget(events)
            except SpoolError as error:
                logger.error("discarded events stay in the spool: %s", error)
        ids = ", ".join(e.id for e in events)
        if level is None:
            level = logging.INFO if reason.startswith("the endpoint raised") else logging.WARNING
        logger.log(level, "discarded %d event(s) because %s: %s", len(events), reason, ids)
        return DiscardedEvents(events, reason, exc)


def nowhere(events: list[Event], why: str) -> list[tuple[Event, str]]:
    """*events*, which nothing here takes (*why*), to try again later: a WARNING names them."""
    ids = ", ".join(event.id for event in events)
    logger.warning("%d event(s) wait to be tried again: %s: %s", len(events), why, ids)
    return [(event, why) for event in events]
