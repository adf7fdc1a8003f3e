"""`EventBus` and the `get_bus` dependency."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, TypeVar, overload

from pydantic import BaseModel
from starlette.background import BackgroundTasks
from starlette.requests import HTTPConnection
from starlette.responses import Response

from . import _di
from ._attributes import Extensions
from ._batch import COLLECTING, SCOPE_KEY, Batch, RequestEnd, request_over
from ._core import Core
from ._di import Handler
from ._dispatch import Inbox
from ._events import Event
from ._hooks import DiscardedEvents, HandlerFailure, Observer, OnDiscard, OnError, call_hook, logger
from ._lifespan import check_serving, draining_lifespan
from ._patterns import pattern_of
from ._retry import Retry
from ._settings import Settings, check_seconds, disabled_by_env
from ._tracing import Tracing
from .exceptions import (
    BusNotInstalledError,
    ConfigurationError,
    InvalidEventError,
    OutsideRequestError,
)
from .forwarders._base import Forwarder
from .spool import Spool
from .storage import Outbox

F = TypeVar("F", bound=Callable[..., Any])
FwdT = TypeVar("FwdT", bound=Forwarder)

STATE_ATTR = "fastapi_eventbus"
"""Attribute of ``app.state`` that holds the installed bus."""

_MISSING: Any = object()

_INSTALLED: weakref.WeakKeyDictionary[Any, EventBus] = weakref.WeakKeyDictionary()
"""The bus `EventBus.install` put on each app (also on ``app.state``, for users to read)."""


class EventBus:
    """An event bus for one FastAPI application.

    The instance you create holds the handlers, schemas and settings. Endpoints get a
    *request-scoped* view of it from ``Depends(get_bus)``: the same class, sharing those
    handlers, but owning the events of that one request, handled after the response is sent.

    Args:
        disabled: Make ``emit``/``publish`` validate but not deliver. Defaults to
            the ``FASTAPI_EVENTBUS_DISABLED`` environment variable (``1``/``true``).
        max_chain_depth: How deep handlers may emit events that emit events.
        shutdown_timeout: Seconds the lifespan waits for in-flight events on shutdown.
        keep_events_on_error: Handle a request's events even if its endpoint raised.
        on_error: Called with a `HandlerFailure` whenever a handler raises.
        on_discard: Called with `DiscardedEvents` whenever accepted events are dropped.
        source: The CloudEvents ``source`` stamped on emitted events.
        spool: A `fastapi_eventbus.spool.Spool`, or the path of its SQLite file:
            events for forwarders are written there when emitted and sent again
            after a crash or a broker outage (at-least-once). None: no spool;
            events in flight when the process dies are lost.
        max_batch_events: The most events one request (or handler call) may
            emit; more raise `CapacityError` at ``emit``. None: no limit.
        max_pending_events: The most events accepted but not yet handled and forwarded,
            across all requests; more raise `CapacityError` at ``emit``/``publish``.
            Bounds memory when handlers or brokers fall behind. None: no limit.
        outbox: A `fastapi_eventbus.outbox.SQLAlchemyOutbox`: ``emit(..., session=db)``
            then writes the event in *db*'s transaction, handled and forwarded once it
            commits, never if it rolls back, relayed after a crash. None: ``session=`` is
            refused.
        inbox: A `fastapi_eventbus.outbox.SQLAlchemyInbox`: an event delivered again (by
            a worker, the outbox's relay, `handle`) runs only the handlers that have not
            succeeded for it yet.
        handler_timeout: Seconds one handler call (its dependencies, its body and its
            ``yield`` exits) may take, unless the handler sets its own ``timeout``. A call
            still running then fails with `TimeoutError` (logged, ``on_error``; the event's
            other handlers still run). The default, 60 s, keeps a hung handler from
            holding a flush, a shutdown or a worker's slot forever. None: no limit.
    """

    __slots__ = ("_batch", "_core")

    _core: Core
    _batch: Batch | None

    def __init__(
        self,
        *,
        disabled: bool | None = None,
        max_chain_depth: int = 8,
        shutdown_timeout: float = 10.0,
        keep_events_on_error: bool = False,
        on_error: OnError | None = None,
        on_discard: OnDiscard | None = None,
        source: str | None = None,
        spool: Spool | str | os.PathLike[str] | None = None,
        max_batch_events: int | None = 10_000,
        max_pending_events: int | None = 50_000,
        handler_timeout: float | None = 60.0,
        outbox: Outbox | None = None,
        inbox: Inbox | None = None,
    ) -> None:
        settings = Settings(
            disabled=disabled_by_env() if disabled is None else disabled,
            max_chain_depth=max_chain_depth,
            shutdown_timeout=shutdown_timeout,
            keep_events_on_error=keep_events_on_error,
            on_error=on_error,
            on_discard=on_discard,
            source=source,
            max_batch_events=max_batch_events,
            max_pending_events=max_pending_events,
            handler_timeout=handler_timeout,
        )
        if spool is not None and not isinstance(spool, Spool):
            spool = Spool(spool)
        self._core = Core(settings, EventBus._view, spool, outbox, inbox)
        self._batch = None

    @classmethod
    def _view(cls, core: Core, batch: Batch) -> EventBus:
        view = cls.__new__(cls)
        view._core = core
        view._batch = batch
        return view

    def __repr__(self) -> str:
        kind = "app" if self._batch is None else f"scoped, {len(self._batch.events)} pending"
        return f"<EventBus {kind}, {len(self._core.handlers.items())} handler(s)>"

    # -- setup ------------------------------------------------------------------

    @property
    def disabled(self) -> bool:
        """Whether events are validated but not delivered."""
        return self._core.settings.disabled

    def install(self, app: Any) -> None:
        """Bind this bus to *app* and wrap its lifespan.

        After this, ``Depends(get_bus)`` works in *app*'s endpoints. The wrapped lifespan
        starts the forwarders after the app's own startup, and at shutdown drains in-flight
        events (up to ``shutdown_timeout``) and closes the forwarders. Nothing has to start
        first: a bare ``TestClient(app)`` without ``with`` works too (forwarders then start
        at their first send).

        One bus may be installed on several apps (an app factory, one app per test):
        requests use their own app's ``dependency_overrides``; `publish` and `handle`, which
        have no request, use the app installed last.

        Raises:
            ConfigurationError: *app* already has a bus, or this is a request's bus.
        """
        if self._batch is not None:
            raise ConfigurationError("install() takes the application bus, not a request's bus")
        if getattr(app.state, STATE_ATTR, None) is not None:
            raise ConfigurationError(
                "an EventBus is already installed on this app; call install() once"
            )
        setattr(app.state, STATE_ATTR, self)
        _INSTALLED[app] = self
        self._core.app = app
        router = app.router
        router.lifespan_context = draining_lifespan(router.lifespan_context, self._core, self.close)

    @classmethod
    def of(cls, app: Any) -> EventBus:
        """The bus `install` put on *app*: for code that has the app, not a request.

        Raises:
            BusNotInstalledError: No bus is installed on *app*.
        """
        if (bus := _installed(app)) is None:
            raise BusNotInstalledError(
                "no EventBus is installed on this app: create one and call `bus.install(app)` "
                "before serving requests"
            )
        return bus

    def on(
        self,
        *patterns: str | type[BaseModel],
        timeout: float | None = None,
        retry: Retry | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated function as a handler for events matching *patterns*.

        Patterns use `fnmatch` rules (``"cat*"``, ``"order.*"``, ``"*"``); a typed event model
        may be given instead of a pattern to match its ``__event_name__`` exactly. The handler
        may declare ``Depends()`` parameters exactly like an endpoint; they are resolved by
        FastAPI's solver for every call, after the response has been sent. With no pattern, a
        handler whose event parameter is a typed event model handles that model.

        Args:
            patterns: What event names the handler is for.
            timeout: Seconds one call may take (dependencies included); a call
                still running then fails with `TimeoutError`. None: the bus's
                ``handler_timeout``; ``math.inf``: no limit.
            retry: Try a failed call again, per this `Retry` policy (each failed
                try logged at WARNING, the last at ERROR and passed to
                ``on_error``). In-process only: in a worker, the broker's
                redelivery is the retry. None: no retry.

        Raises:
            ConfigurationError: At decoration time: a pattern is empty, not a string,
                can never match an event name, or is a model without
                ``__event_name__``; the handler has no pattern; its typed event never
                matches its patterns; a parameter could only come from an HTTP
                request; or *timeout* or *retry* is not valid.
        """
        names = [pattern_of(p) for p in patterns]
        timeout = check_seconds("timeout", timeout, positive=True, optional=True)
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigurationError(f"retry must be a Retry, got {retry!r}")

        def decorator(func: F) -> F:
            self._core.dispatcher.add(func, names, timeout, retry)
            return func

        return decorator

    def forward(self, patterns: str | Sequence[str], forwarder: FwdT) -> FwdT:
        """Send events matching *patterns* to *forwarder*, on the same flush as handlers.

        ``bus.forward("order.*", SQSForwarder(queue_url=...))``. The forwarder gets each
        flush's matching events in one `Forwarder.send` call, after the response, concurrently
        with the local handlers; ``await bus.publish()`` waits for it. Returns *forwarder*.

        Raises:
            ConfigurationError: *forwarder* is not a `Forwarder`, a pattern is empty,
                or (with a spool or an outbox) another forwarder has the same name.
        """
        if not isinstance(forwarder, Forwarder):
            raise ConfigurationError(f"forward() needs a Forwarder instance, got {forwarder!r}")
        names = [patterns] if isinstance(patterns, str) else list(patterns)
        self._core.forward([pattern_of(p) for p in names], forwarder)
        return forwarder

    def register(self, event: str | type[BaseModel], schema: type[BaseModel] | None = None) -> None:
        """Register a payload schema, so that ``emit(name, payload)`` validates at emit time.

        ``bus.register(CatCreated)`` registers a typed event model under its ``__event_name__``;
        ``bus.register("cat.created", CatPayload)`` registers any pydantic model for a name.

        Raises:
            ConfigurationError: The arguments are neither form, the name is a pattern
                (``*?[``), or it already has another schema.
            InvalidEventError: The name is not a usable event name.
        """
        self._core.schemas.register_either(event, schema)

    # -- emitting ---------------------------------------------------------------

    @overload
    def emit(
        self, event: BaseModel, /, *, session: object = None, extensions: Extensions | None = None
    ) -> Event: ...

    @overload
    def emit(
        self,
        name: str,
        payload: Any = None,
        /,
        *,
        session: object = None,
        extensions: Extensions | None = None,
    ) -> Event: ...

    def emit(
        self,
        event: str | BaseModel,
        payload: Any = _MISSING,
        /,
        *,
        session: object = None,
        extensions: Extensions | None = None,
    ) -> Event:
        """Collect an event; it is handled after the response is sent.

        ``emit(name, payload)`` or ``emit(model)`` for a model with
        ``__event_name__``. Returns the `Event` at once. Every check runs here, in
        the caller; with a spool, an event for a forwarder is in it before this returns.

        With ``session=db`` (a SQLAlchemy ``Session`` or ``AsyncSession``; the bus
        needs an ``outbox``), the event is written in *db*'s transaction instead:
        handled and forwarded once it commits (after the response, in a request),
        never if it rolls back. This works on the application bus too, outside
        any request: the transaction is the batch.

        *extensions* are the event's other CloudEvents attributes (`Event.extensions`):
        ``subject``, ``dataschema`` or extension attributes, e.g.
        ``extensions={"subject": f"orders/{order.id}"}``; forwarders send them.

        Raises:
            OutsideRequestError: This is the application bus: emit on the bus
                ``Depends(get_bus)`` gives, or use `publish`.
            InvalidEventError: A bad name, a payload that fails its schema or cannot
                be serialised to JSON, extensions that are no CloudEvents attributes,
                or a message a forwarder could never send.
            EventChainError: Handlers emitting events went deeper than
                ``max_chain_depth``.
            CapacityError: ``max_batch_events`` or ``max_pending_events`` is reached.
            SpoolError: The spool could not be written.
            ConfigurationError: ``session=`` on a bus without an outbox, or a
                session writing to another database than the outbox's.
            TypeError: *session* is not a SQLAlchemy session.
        """
        batch = self._batch
        if session is not None:
            return self._core.make_in(
                session, event, payload, payload is not _MISSING, batch, extensions
            )
        if batch is None:
            raise OutsideRequestError(
                "emit() on the application bus has no request to attach events to: in an "
                "endpoint or handler use `bus: EventBus = Depends(get_bus)`; elsewhere "
                "(scripts, startup, tests) use `await bus.publish(...)`"
            )
        return self._core.emit(batch, event, payload, payload is not _MISSING, extensions)

    @overload
    async def publish(
        self, event: BaseModel, /, *, extensions: Extensions | None = None
    ) -> Event: ...

    @overload
    async def publish(
        self, name: str, payload: Any = None, /, *, extensions: Extensions | None = None
    ) -> Event: ...

    async def publish(
        self,
        event: str | BaseModel,
        payload: Any = _MISSING,
        /,
        *,
        extensions: Extensions | None = None,
    ) -> Event:
        """Handle an event now and wait for its handlers (and their chained events).

        Same arguments as `emit`. Works with no request at all: in scripts, at
        startup, in tests and in workers. A handler that fails is logged and given
        to ``on_error``, not raised; the forwarders' sends are awaited too.

        Raises:
            InvalidEventError: As for `emit`.
            EventChainError: As for `emit`.
            CapacityError: ``max_pending_events`` is reached.
            SpoolError: The spool could not be written.
        """
        depth = self._core.dispatcher.depth_of(self._batch)
        event_obj, deliver = self._core.make(
            event, payload, payload is not _MISSING, None, depth, extensions=extensions
        )
        if not deliver:
            return event_obj
        await self._core.publish(event_obj, self._batch, depth)
        return event_obj

    async def handle(self, event: Event) -> list[HandlerFailure]:
        """Run the local handlers of an existing *event* now; forward nothing.

        For consumers of forwarded events (the worker): *event* is what
        `fastapi_eventbus.wire.decode_message` returned. Handlers get the same
        dependency injection as in-process; events they chain are handled and
        forwarded as usual. Returns the failures (each already logged and given
        to ``on_error``): an empty list means every matching handler succeeded.

        Raises:
            InvalidEventError: *event* is not an `Event`.
        """
        if not isinstance(event, Event):
            raise InvalidEventError(f"handle() takes an Event, got {type(event).__name__}")
        depth = self._core.dispatcher.depth_of(self._batch)
        return await self._core.handle(event, self._batch, depth)

    def handles(self, name: str | None = None) -> bool:
        """Whether a handler registered with `on` matches the event name *name* (none: any
        handler at all). `handle` returns no failures both when every matching handler
        succeeded and when none matched; a consumer (the worker) asks this to tell them apart.
        """
        handlers = self._core.handlers
        return bool(handlers) if name is None else bool(handlers.match(name))

    def time_limit(self, name: str) -> float | None:
        """Seconds the handlers of event *name* may take together; None if one has no limit.
        The sum of their time limits (they run one after the other); 0.0 if no handler
        matches. The events they emit are not counted."""
        return self._core.dispatcher.time_limit(name)

    # -- request lifecycle ------------------------------------------------------

    async def dependency(
        self, connection: HTTPConnection, background_tasks: BackgroundTasks
    ) -> EventBus:
        """A FastAPI dependency giving this bus's view for the current request.

        `get_bus` calls this on the installed bus. Use it directly to override
        `get_bus` in tests (``app.dependency_overrides[get_bus] = other.dependency``)
        or to use a bus that is not installed on the app (its own view, beside `get_bus`'s).

        Raises:
            ConfigurationError: It was not resolved by FastAPI's dependency injection.
        """
        existing, app = request_view(connection.scope), connection.scope.get("app")
        if existing is not None:
            if existing._core is self._core:  # its own view, at the chain's depth, which
                return existing  # FastAPI's dependency cache keeps for the request
            return self._new_view(connection, background_tasks, existing)  # beside get_bus's
        overridden = getattr(app, "dependency_overrides", {}).get(get_bus) == self.dependency
        keep = overridden or _installed(app) in (None, self)  # does this stand for get_bus?
        return self._new_view(connection, background_tasks, None if keep else self)

    def _new_view(
        self,
        connection: HTTPConnection,
        background: BackgroundTasks,
        beside: EventBus | None = None,
    ) -> EventBus:
        if connection.scope["type"] == "websocket":
            return open_request(self, connection, websocket=True, beside=beside)
        stack = _di.request_exit_stack(connection)
        if stack is None:
            raise ConfigurationError(
                "get_bus must be resolved by FastAPI's dependency injection in a route "
                "(Depends(get_bus)); this request has no FastAPI dependency scope"
            )
        view = open_request(self, connection, background, beside=beside)
        batch = view._batch
        assert batch is not None
        stack.push_async_exit(RequestEnd(self._core.end_request, batch))  # type: ignore[type-var]  # duck-typed
        return view

    # -- shutdown ---------------------------------------------------------------

    async def drain(self, timeout: float | None = None) -> list[Event]:
        """Wait for in-flight events, up to *timeout* (default ``shutdown_timeout``) seconds.

        Returns the events that did not finish, after logging them at ERROR and
        passing them to ``on_discard``. The installed lifespan calls this on
        shutdown.
        """
        default = self._core.settings.shutdown_timeout
        return await self._core.shutdown.drain(default if timeout is None else timeout)

    @property
    def outbox(self) -> Outbox | None:
        """The bus's outbox (``EventBus(outbox=...)``), if it has one."""
        return self._core.outbox

    @property
    def spool(self) -> Spool | None:
        """The bus's spool, if it has one (to list, count, replay or purge events)."""
        storage = self._core.spool
        return storage if isinstance(storage, Spool) else None

    async def resend(self) -> int:
        """Send again the spooled events that are due; returns how many were tried.

        The installed lifespan does this at startup and then every
        ``resend_interval`` seconds (a `Spool` setting); call it yourself where no
        lifespan runs (a script that only publishes). Without a spool, returns 0.
        """
        return await self._core.sender.resend_due()

    async def close(self, timeout: float | None = None) -> list[Event]:
        """`drain`, then close every forwarder's clients. The installed lifespan calls this.

        With a spool (or an outbox), the events this process did not finish are
        left due at once, for the next process (or another one sharing it).
        """
        unfinished = await self.drain(timeout)
        await self._core.shutdown.close()
        await self._core.shutdown.release()
        await self._core.sender.close()
        logger.debug("fastapi_eventbus closed")
        return unfinished


async def get_bus(connection: HTTPConnection, background_tasks: BackgroundTasks) -> EventBus:
    """FastAPI dependency: the request-scoped `EventBus` of the app's installed bus.

    ``bus: EventBus = Depends(get_bus)`` in an endpoint, a dependency or a
    handler. Events emitted through it are handled after the response is sent
    (or, in a handler, after that handler returns).

    Raises:
        BusNotInstalledError: No bus is installed on the app (`EventBus.install`).
        ConfigurationError: It was not resolved by FastAPI's dependency injection.
    """
    if isinstance(existing := connection.scope.get(SCOPE_KEY), EventBus):  # its view (a handler
        batch = existing._batch  # call's), unless an earlier try's (`request_view`'s test, its
        if batch is None or batch.state == COLLECTING or not request_over(batch, connection.scope):
            return existing  # usual case inline: a handler call asks for it each time)
    app = connection.scope["app"]
    return (_installed(app) or EventBus.of(app))._new_view(connection, background_tasks)


_di.BUS_DEPENDENCIES.update((get_bus, EventBus.dependency))


# -- the internal API other modules of the package use (never a bus's underscored names) ------


def is_request_bus(bus: EventBus) -> bool:
    """Whether *bus* is a request's (or handler call's) view, not the application bus."""
    return bus._batch is not None


def tracing_of(bus: EventBus) -> Tracing | None:
    """The span hooks `fastapi_eventbus.otel` set on *bus*, or None: tracing is off."""
    return bus._core.tracing


def set_tracing(bus: EventBus, tracing: Tracing | None) -> None:
    """Turn tracing on (*tracing*: the span hooks) or off (None) for *bus* and its views."""
    bus._core.set_tracing(tracing)


def observers_of(bus: EventBus) -> list[Observer]:
    """The observers (`fastapi_eventbus.testing.capture`) that see what *bus* emits and handles."""
    return bus._core.observers


def in_flight(bus: EventBus) -> set[str]:
    """The ids of *bus*'s events not finished yet: being handled, waiting, being forwarded."""
    return {event.id for batch in list(bus._core.active) for event in batch.unfinished()}


async def report_discarded(bus: EventBus, report: DiscardedEvents) -> None:
    """Tell *bus*'s ``on_discard`` of what will not be handled (the caller logs it)."""
    await call_hook(bus._core.settings.on_discard, report)


def registered_handlers(bus: EventBus) -> list[Handler]:
    """*bus*'s handlers, in registration order (each with its patterns and plan)."""
    return bus._core.handlers.items()


def registered_forwarders(bus: EventBus) -> list[tuple[tuple[str, ...], Forwarder]]:
    """*bus*'s forwarders, each with the patterns it was attached under, in order."""
    return bus._core.forwarders.entries()


def request_view(scope: MutableMapping[str, Any]) -> EventBus | None:
    """The view of the request *scope* is for, if it has one yet: not an earlier try's, whose
    scope a middleware passed on again to call the app a second time (a retry)."""
    view = scope.get(SCOPE_KEY)
    return view if isinstance(view, EventBus) and not request_over(view._batch, scope) else None


def _installed(app: Any) -> EventBus | None:
    """The bus `EventBus.install` put on *app*, if any."""
    try:
        return _INSTALLED[app]  # per request: not app.state's failing attribute lookup
    except (KeyError, TypeError):
        bus = getattr(getattr(app, "state", None), STATE_ATTR, None)
    return bus if isinstance(bus, EventBus) else None


def open_request(
    bus: EventBus,
    connection: HTTPConnection,
    background: BackgroundTasks | None = None,
    *,
    websocket: bool = False,
    beside: EventBus | None = None,
) -> EventBus:
    """A view of *bus* owning *connection*'s events, in its scope for `get_bus` unless
    *beside* another view (at its chain depth; *bus* itself: at depth 0). With *background*
    (FastAPI), the first event adds the flush to those tasks; without (Starlette),
    `flush_after` attaches it to the returned response."""
    if not bus._core.serving:
        check_serving(bus._core)
    depth = beside._batch.depth if beside is not None and beside._batch is not None else 0
    batch = bus._core.open_request(connection.scope, background, websocket, depth)
    view = EventBus._view(bus._core, batch)
    if beside is None:
        connection.scope[SCOPE_KEY] = view
    return view


async def end_request(view: EventBus, exc: BaseException | None) -> None:
    """*view*'s request is over (*exc*: what its endpoint raised): see `Core.end_request`."""
    if (pending := view._core.end_request(view._batch, exc)) is not None:  # type: ignore[arg-type]
        await pending


def flush_after(view: EventBus, response: Response) -> None:
    """Handle *view*'s events after *response* is sent, as its last background task."""
    view._core.flush_after(view._batch, response)  # type: ignore[arg-type]  # a view's
