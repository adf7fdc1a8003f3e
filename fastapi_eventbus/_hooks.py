"""What the bus tells the application when something goes wrong."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar

from ._deadline import cancelled, finish_within
from ._events import Event
from .exceptions import ConfigurationError

logger = logging.getLogger("fastapi_eventbus")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""How the library's lines look when the application configured no logging of its own."""


class _FallbackHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the library's lines to stderr with level, logger and time, while nothing else would.

    Python's last-resort handler prints a bare message: under plain uvicorn,
    whose logging config covers only its own loggers, an ERROR line about a lost
    event would say neither ERROR nor when. This handler steps aside as soon as
    the root logger has a handler (the application configured logging), so no
    line is printed twice.
    """

    def handle(self, record: logging.LogRecord) -> bool:
        if logging.getLogger().handlers:
            return False
        return super().handle(record)


def ensure_readable_logs(who: str = "the application") -> None:
    """Make sure the library's lines are printed: enable its loggers again if *who*'s logging
    configuration disabled them, and give its logger `_FallbackHandler` if its lines would
    reach no handler.

    ``logging.config.dictConfig`` disables every existing logger its configuration
    does not name, unless ``disable_existing_loggers`` is false; an application
    configures logging after importing this package, which would silence the ERROR
    lines about failed handlers and lost events.
    """
    disabled = sorted(
        name
        for name, existing in logging.Logger.manager.loggerDict.items()
        if isinstance(existing, logging.Logger)
        and existing.disabled
        and (name == logger.name or name.startswith(f"{logger.name}."))
    )
    for name in disabled:
        logging.getLogger(name).disabled = False
    if disabled:
        logger.warning(
            "%s's logging configuration disabled %s (disable_existing_loggers); enabled again: "
            "the bus reports failed handlers and lost events through them",
            who,
            ", ".join(disabled),
        )
    if not logger.hasHandlers():
        handler = _FallbackHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class HandlerFailure:
    """A handler raised while handling an event. Passed to the ``on_error`` hook."""

    event: Event
    """The event being handled."""
    handler: str
    """The handler's qualified name (``module.function``)."""
    exception: BaseException
    """What the handler (or one of its dependencies) raised."""


@dataclass(frozen=True, slots=True)
class DiscardedEvents:
    """Events that were accepted by `EventBus.emit` (or received by a worker) but will not
    be handled.

    Passed to the ``on_discard`` hook. *reason* says why: the endpoint raised,
    the handler that emitted them failed, shutdown timed out, their flush was
    cancelled, nothing matches them (no handler, no forwarder), their outbox
    transaction rolled back, they were stored for a forwarder or handlers that
    no application running had until their rounds ran out, or a worker deleted
    a message no handler matches (``on_unhandled="delete"``), or a message that is not
    an event at all (``on_undecodable="delete"``: no event, its ``message_ids`` instead).
    """

    events: tuple[Event, ...]
    """The events, in emission order."""
    reason: str
    """A human-readable reason."""
    exception: BaseException | None = None
    """The exception that caused the discard, when there is one."""
    message_ids: tuple[str, ...] = ()
    """The broker's ids of messages deleted without an event in them (a consumer's
    ``on_undecodable="delete"``); *events* is then empty."""

    @property
    def ids(self) -> list[str]:
        """The ids of the discarded events."""
        return [event.id for event in self.events]


class Observer(Protocol):
    """Receives what the bus emits and handles (used by `fastapi_eventbus.testing`)."""

    mute: bool

    def on_emit(self, event: Event) -> None: ...

    def on_handled(self, event: Event, handler: str, error: BaseException | None) -> None: ...


OnError: TypeAlias = Callable[[HandlerFailure], Awaitable[None] | None]
"""Signature of the ``on_error`` hook: sync or async, return value ignored."""
OnDiscard: TypeAlias = Callable[[DiscardedEvents], Awaitable[None] | None]
"""Signature of the ``on_discard`` hook: sync or async, return value ignored."""


HOOK_TIMEOUT = 30.0
"""Seconds an async hook may run: past that it is cancelled (left running if it ignores that),
an ERROR says so, and the bus goes on. A sync hook runs on the event loop and cannot be stopped."""


def passes_through(exc: BaseException) -> bool:
    """Whether *exc*, caught where a handler call or a hook was awaited, goes on up instead
    of being that call's failure: the running task's cancellation, Ctrl-C, the caller's
    coroutine being closed. An `asyncio.CancelledError` nothing asked for, `SystemExit` (a
    library calling ``sys.exit``) and a `GeneratorExit` the handler or hook raised itself
    are the call's failures: they must not stop the other events."""
    if isinstance(exc, asyncio.CancelledError):
        return cancelled()
    if isinstance(exc, GeneratorExit):
        return _closing(exc)
    return isinstance(exc, KeyboardInterrupt)


def _closing(exc: GeneratorExit) -> bool:
    """Whether *exc* is the catching coroutine being closed (``coro.close()``, its task
    destroyed pending). Python closes what it awaited first, then raises a new
    `GeneratorExit` at its ``await``: a traceback of that one frame. One a handler or a hook
    raised comes up from their frames."""
    traceback = exc.__traceback__
    return traceback is None or traceback.tb_next is None


def check_hook(name: str, hook: object) -> None:
    """`ConfigurationError` unless *hook* is None or callable with one argument (what
    `call_hook` gives it), and not a generator function: else it would fail (or do
    nothing, unheard) only when there is something to report."""
    if hook is None:
        return
    if not callable(hook):
        raise ConfigurationError(f"{name} must be callable, got {hook!r}")
    for call in (hook, hook.__call__):  # a function; an instance's method
        if inspect.isgeneratorfunction(call) or inspect.isasyncgenfunction(call):
            raise ConfigurationError(
                f"{name} is a generator function ({hook!r}): calling it only makes a "
                "generator, so its body would never run. Write it without yield (a def "
                "or an async def)"
            )
    try:
        signature = inspect.signature(hook)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        return
    try:
        signature.bind(None)
    except TypeError as exc:
        raise ConfigurationError(
            f"{name} is called with one argument, and {hook!r} cannot take it: {exc}"
        ) from None


_LATE: set[asyncio.Future[None]] = set()
"""Hooks whose caller was cancelled, running to their end (`call_hook`)."""


def start_hook(hook: Callable[[T], Awaitable[None] | None] | None, value: T) -> Any:
    """Call an application hook now: a sync one runs to its end here (what it raises is
    logged); an async one's work is returned as a task, for `finish_hook` (None: done)."""
    if hook is None:
        return None
    try:
        result = hook(value)
        return asyncio.ensure_future(contained(result)) if inspect.isawaitable(result) else None
    except BaseException as exc:
        if passes_through(exc):
            raise
        logger.exception("fastapi_eventbus hook %r raised", hook)
        return None


async def contained(work: Awaitable[Any]) -> Any:
    """*work* (an async hook's, a forwarder's close), as a task of its own runs it: a
    `SystemExit` raised in a task leaves it into the event loop (asyncio re-raises it there)
    and stops the application. Here it is *work*'s failure, logged like a sync hook's."""
    try:
        return await work
    except SystemExit as exc:
        raise RuntimeError(f"it raised {exc!r}") from exc


async def finish_hook(hook: object, task: asyncio.Future[Any]) -> None:
    """Let *hook*'s *task* finish (up to `HOOK_TIMEOUT`), and log what it raised."""
    if not await finish_within(task, HOOK_TIMEOUT) or task.cancelled():
        logger.error("fastapi_eventbus hook %r did not return within %gs", hook, HOOK_TIMEOUT)
    elif (error := task.exception()) is not None:
        logger.error("fastapi_eventbus hook %r raised", hook, exc_info=error)


async def call_hook(hook: Callable[[T], Awaitable[None] | None] | None, value: T) -> None:
    """Call an application hook, never letting its failure escape, nor an async hook hold the
    caller longer than `HOOK_TIMEOUT`."""
    if (task := start_hook(hook, value)) is None:  # no hook, or a sync one: done
        return
    try:
        try:
            done, _ = await asyncio.wait({task}, timeout=HOOK_TIMEOUT)
        except asyncio.CancelledError:  # the reporting code's task is being cancelled
            _LATE.add(late := asyncio.ensure_future(finish_hook(hook, task)))
            late.add_done_callback(_LATE.discard)  # not the report: the hook goes on
            raise
        if not done:
            logger.error(
                "fastapi_eventbus hook %r did not return within %gs: cancelled, and left "
                "running if it ignores that",
                hook,
                HOOK_TIMEOUT,
            )
            await finish_within(task, 0)
            return
        task.result()  # what it raised
    except BaseException as exc:
        if passes_through(exc):
            raise
        logger.exception("fastapi_eventbus hook %r raised", hook)
