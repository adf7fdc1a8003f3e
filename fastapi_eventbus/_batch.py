"""A batch: the events of one request, handler call, WebSocket session or publish call.

Its fields are written by `fastapi_eventbus._core.Core` only, which decides its
lifecycle (accept, flush, discard, keep); the bus's views hold one each.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import sys
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from types import CodeType, FrameType, TracebackType
from typing import Any

import fastapi.routing
from fastapi import BackgroundTasks as FastAPIBackgroundTasks
from fastapi.exceptions import ResponseValidationError
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.responses import Response

from ._deadline import Limit
from ._events import Event

SCOPE_KEY = "fastapi_eventbus.bus"
"""ASGI scope key holding the request's (or handler call's) scoped bus."""

COLLECTING, FLUSHING, CLOSED, FAILED = 0, 1, 2, 3
"""Batch states: collecting until its flush starts; closed once flushed or discarded; failed:
a handler call's, once the handler failed (what it emits later is refused)."""

_FROM_SCOPE: Any = object()


class Batch:
    """The events of one request, handler call, WebSocket session or publish call."""

    __slots__ = (
        "accepted",
        "background",
        "current",
        "depth",
        "events",
        "jobs",
        "limit",
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
        self.jobs: list[tuple[Callable[[], Awaitable[None]], str | None]] | None = None
        """Work to run after the response with the events (`Core.after_response`): an
        outbox's committed events, each with what it does (for a report); None until there is
        some. A job never raises."""
        self.current: Event | None = None
        self.task: asyncio.Task[None] | None = None
        self.sends: list[tuple[asyncio.Future[Any], list[Event]]] = []
        self.background: BackgroundTasks | None = None
        """The request's background tasks, until the first event adds the flush to them."""
        self.runner: asyncio.Task[Any] | None = None
        """The task running a request's flush, which shutdown may stop (`Core.stop_flushes`)."""
        self.stopped = False
        """Whether shutdown cancelled `runner`: its flush then reports and returns."""
        self.limit: Limit | None = None
        """The time limits of the handler calls of its flush (or `Core.handle` call), all in
        one task: made for the first call with a limit, dropped when the flush ends."""
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

    def forget_bus(self) -> None:
        """The request is over: keep a copy of its scope without the request's bus.

        The scope keeps the bus (code running after the endpoint still finds it), and the
        bus its batch: with the batch keeping the scope itself, that would be a cycle, and
        every request would leave garbage for the collector.
        """
        if (scope := self.scope) is not None and SCOPE_KEY in scope:
            self.scope = copy = dict(scope)
            del copy[SCOPE_KEY]

    def child(self) -> Batch:
        """A batch for the events a handler emits (one level deeper in the chain)."""
        return Batch(self.get_scope(), self.depth + 1, COLLECTING, self.loop, self.provider)

    def unfinished(self) -> list[Event]:
        """The event being handled, those still waiting, and those still being forwarded:
        each once (a waiting event may be being forwarded too)."""
        head = [self.current] if self.current is not None else []
        sending = [e for task, events in self.sends if not task.done() for e in events]
        return list({e.id: e for e in (*head, *self.events, *sending)}.values())


def request_over(batch: Batch | None, scope: MutableMapping[str, Any]) -> bool:
    """Whether *batch*, of the view found in *scope*, is an earlier request's whose scope a
    middleware passed on again (to call the app a second time: a retry). Its events went with
    that request: this one needs a view of its own."""
    return batch is not None and batch.state != COLLECTING and scope["type"] == "http"


def base_scope(app: Any, state: dict[str, Any]) -> dict[str, Any]:
    """A minimal HTTP scope of *app* for handler calls that have no request (publish,
    workers), with *state* as ``request.state``."""
    return {
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
        "app": app,
        "state": state,
    }


class FlushTask(BackgroundTask):
    """A request's flush, as one of its background tasks.

    What ``BackgroundTasks.add_task(core.flush, batch, True)`` adds, without its
    per-call check of whether the function is async (it is). With *before*, the
    tasks that must run first (the endpoint's, added before the first event, or the
    response's own ``background``), in its place: the flush runs even if one of
    them raises, then their exception goes on (Starlette would stop at it).
    """

    def __init__(
        self,
        flush: Callable[[Batch, bool], Awaitable[None]],
        batch: Batch,
        before: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        # BackgroundTask's own attributes (FastAPI's telemetry reads `func`), typed by ParamSpec.
        self.func = flush  # type: ignore[assignment]
        self.args = (batch, True)  # type: ignore[assignment]
        self.kwargs = {}  # type: ignore[assignment]
        self.is_async = True
        self.before = before

    @classmethod
    def add(
        cls,
        background: BackgroundTasks,
        flush: Callable[[Batch, bool], Awaitable[None]],
        batch: Batch,
    ) -> None:
        """Add the flush of *batch* to the request's *background* tasks, after those there."""
        tasks = background.tasks
        if not tasks:  # usually: the first event comes before any task of the endpoint's
            tasks.append(cls(flush, batch))
        else:
            tasks[:] = [cls(flush, batch, type(background)(list(tasks)))]  # FastAPI's class

    def __call__(self) -> Awaitable[None]:  # type: ignore[override]
        """The flush itself, awaited by Starlette: not a coroutine around it (one level less)."""
        if self.before is None:
            return self.func(*self.args)  # type: ignore[call-arg, no-any-return]
        return self._after(self.before)

    async def _after(self, before: Callable[[], Awaitable[None]]) -> None:
        try:
            await before()
        finally:
            await self.func(*self.args)  # type: ignore[call-arg]


_BACKGROUND_CALLS = frozenset(
    task.__call__.__code__ for task in (BackgroundTask, BackgroundTasks, FastAPIBackgroundTasks)
)


def raised_after_return(
    exc: BaseException, stacked: bool = False, scope: MutableMapping[str, Any] | None = None
) -> str | None:
    """Where *exc* came from, if the endpoint had returned: ``"background"``, a background
    task (``Response(background=...)`` whose task raised, the response sent); ``"response"``,
    sending the response (the client gone, a streaming body that raised); ``"exit"`` (for
    what FastAPI's request exit stack passes on, *stacked*), the exit code of a
    request-scoped ``yield`` dependency, after the response (it never went through FastAPI's
    handling of the request, nor did what it replaced). None: the endpoint (or solving its
    dependencies) raised it; a generator endpoint (the request's *scope* names it) too,
    while its response was sent."""
    generators = _generator_codes(scope.get("endpoint")) if scope is not None else set()
    tb, sending = exc.__traceback__, False
    while tb is not None:
        code = tb.tb_frame.f_code
        if code is _CALLING_ENDPOINT or code in generators:  # the endpoint raised it; a
            return None  # generator endpoint, while its response was sent
        if code in _BACKGROUND_CALLS and sending:  # the response's own (not a task the
            return "background"  # endpoint ran, nor another app's it called)
        if code.co_name == "__call__" and isinstance(tb.tb_frame.f_locals.get("self"), Response):
            sending = True
        tb = tb.tb_next
    if isinstance(exc, ResponseValidationError):  # what it returned (or yielded) is invalid
        return None
    if sending:
        return "response"
    return "exit" if stacked and not _through_routing(exc) else None


_CALLING_ENDPOINT = getattr(
    getattr(fastapi.routing, "run_endpoint_function", None), "__code__", None
)
"""The code of FastAPI's call of an endpoint that is not a generator: what passed through it,
the endpoint raised."""
_GENERATOR = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


def _generator_codes(endpoint: Any) -> set[CodeType]:
    """The code of each generator along *endpoint*'s partials, ``functools.wraps`` wrappers
    and ``__call__`` (FastAPI streams an endpoint that is, or wraps, one): what runs while
    its response is sent."""
    codes: set[CodeType] = set()
    for _ in range(32):
        if (code := getattr(endpoint, "__code__", None)) is not None and code.co_flags & _GENERATOR:
            codes.add(code)
        if isinstance(endpoint, functools.partial):
            endpoint = endpoint.func
        elif hasattr(endpoint, "__wrapped__"):
            endpoint = endpoint.__wrapped__
        elif code is None and callable(endpoint) and not inspect.isclass(endpoint):
            endpoint = type(endpoint).__call__  # an instance (then, a slot: no code, no call)
        else:
            break
    return codes


def caught_by_a_dependency() -> BaseException | None:
    """The endpoint's exception, if a request-scoped ``yield`` dependency caught it and did not
    raise it again: FastAPI's request exit stack then passes None on to the exits after it,
    while that exception is still being handled (and FastAPI answers 500, "Response not
    awaited"). None otherwise. For `RequestEnd`, while FastAPI's request exit stack exits."""
    exc = sys.exception()  # maybe an outer call's (a retry in a middleware's except, a
    frame: FrameType | None = sys._getframe(1)  # dependency publishing in its exit code):
    while frame is not None and not frame.f_code.co_filename.endswith(_ROUTING):
        frame = frame.f_back  # the endpoint's went through the routing (or handler call)
    tb = exc.__traceback__ if exc is not None else None  # frame closing this stack
    while tb is not None and frame is not None:
        if tb.tb_frame is frame:
            return exc
        tb = tb.tb_next
    return None


def _through_routing(exc: BaseException | None) -> bool:
    """Whether *exc*, or an exception it replaced, went through FastAPI's or Starlette's
    handling of the request (the endpoint, its dependencies' solving or function-scoped exits)."""
    seen = 0
    while exc is not None and seen < 20:
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.endswith(_ROUTING):
                return True
            tb = tb.tb_next
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


_ROUTING = (
    f"fastapi{os.sep}routing.py",
    f"starlette{os.sep}routing.py",
    f"fastapi_eventbus{os.sep}_di.py",  # a handler call's (a view of another bus in it)
)


class RequestEnd:
    """On FastAPI's request exit stack: `Core.end_request` when the request ends.

    An object with ``__aexit__`` (not a bare callable), which `AsyncExitStack`
    takes without a failed attribute lookup.
    """

    __slots__ = ("batch", "end")

    def __init__(
        self,
        end: Callable[[Batch, BaseException | None, bool], Awaitable[None] | None],
        batch: Batch,
    ) -> None:
        self.end = end
        self.batch = batch

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if (pending := self.end(self.batch, exc, True)) is not None:
            await pending
        return False
