"""The bus in a plain Starlette app, without FastAPI's dependency injection.

Starlette endpoints take the request and nothing else, so `get_bus` has nothing
to resolve it. Decorate the endpoint with `with_bus` instead: it receives the
request-scoped bus as its last argument, and the request's events are handled
after the response is sent, with the same rules as in FastAPI (discarded if
the endpoint raises, ``keep_events_on_error`` to keep them).

```python
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.starlette import with_bus

bus = EventBus()

@bus.on("cat.*")
async def welcome(event: Event) -> None:
    print("welcome, cat", event.payload["id"])

@with_bus
async def create_cat(request: Request, bus: EventBus) -> JSONResponse:
    bus.emit("cat.created", {"id": 1})
    return JSONResponse({"ok": True})

app = Starlette(routes=[Route("/cats", create_cat, methods=["POST"])])
bus.install(app)
```

Handlers are unchanged: they still declare ``Depends()`` parameters, resolved by
FastAPI's solver (FastAPI is installed with this library either way).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, TypeVarTuple, overload

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.responses import Response

from ._batch import SCOPE_KEY
from ._bus import EventBus, end_request, flush_after, open_request, request_view
from .exceptions import ConfigurationError

__all__ = ["request_bus", "with_bus"]

Ts = TypeVarTuple("Ts")
R = TypeVar("R")


@overload
def with_bus(
    endpoint: Callable[[*Ts, EventBus], Awaitable[R]], /
) -> Callable[[*Ts], Coroutine[Any, Any, R]]: ...


@overload
def with_bus(
    endpoint: Callable[[*Ts, EventBus], R], /
) -> Callable[[*Ts], Coroutine[Any, Any, R]]: ...


def with_bus(endpoint: Callable[..., Any], /) -> Callable[..., Coroutine[Any, Any, Any]]:
    """Give a Starlette endpoint the request's bus as its last argument.

    Works on function endpoints (``async def endpoint(request, bus)``), on the
    methods of an ``HTTPEndpoint`` (``async def post(self, request, bus)``), on
    sync endpoints (run in the thread pool, like Starlette does) and on WebSocket
    endpoints (``async def ws(websocket, bus)``, where each event is handled as
    soon as it is emitted). The bus is the one installed on the app with
    `EventBus.install`.

    Events emitted in an HTTP endpoint are handled after its response is sent,
    after the response's own ``background`` tasks. If the endpoint raises,
    ``HTTPException`` included, they are discarded (logged and reported to
    ``on_discard``) unless the bus has ``keep_events_on_error=True``.
    """
    if not callable(endpoint):
        raise ConfigurationError(f"with_bus decorates an endpoint function, got {endpoint!r}")
    is_async = _is_async(endpoint)

    async def call(*args: Any) -> Any:
        if not args or not isinstance(args[-1], HTTPConnection):
            raise ConfigurationError(
                f"{_name(endpoint)} is decorated with with_bus but was not called with a "
                "Starlette Request or WebSocket as its last argument"
            )
        connection: HTTPConnection = args[-1]
        existing = request_view(connection.scope)
        if existing is not None:  # an outer with_bus owns the request's events
            return await _call(endpoint, is_async, *args, existing)
        view = _new_view(connection)
        try:
            result = await _call(endpoint, is_async, *args, view)
            if connection.scope["type"] == "http" and not isinstance(result, Response):
                raise ConfigurationError(
                    f"{_name(endpoint)} returned {type(result).__name__}, not a Starlette Response"
                )
        except BaseException as exc:
            await end_request(view, exc)
            raise
        if isinstance(result, Response):
            flush_after(view, result)
            _guard(result)
        return result

    # Not functools.wraps: its __wrapped__ would make inspect.signature report the
    # endpoint's (request, bus) instead of what Starlette calls, (request).
    for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
        if hasattr(endpoint, attribute):
            setattr(call, attribute, getattr(endpoint, attribute))
    return call


def request_bus(connection: HTTPConnection) -> EventBus:
    """The request-scoped bus of *connection*, for code that has the request but not the bus.

    The bus exists once the endpoint decorated with `with_bus` is running (or,
    in FastAPI, once `get_bus` has been resolved for the request).
    """
    view = connection.scope.get(SCOPE_KEY)
    if not isinstance(view, EventBus):
        raise ConfigurationError(
            "this request has no bus yet: decorate its Starlette endpoint with "
            "`fastapi_eventbus.starlette.with_bus` (in FastAPI, use `Depends(get_bus)`)"
        )
    return view


def _guard(response: Response) -> None:
    """Have *response*'s events handled even if sending it fails (the client gone, a
    streaming body that raises): Starlette then skips its background, where they are.
    The endpoint returned: FastAPI's request exit stack does the same (`end_request`)."""
    with contextlib.suppress(TypeError):  # a subclass with __slots__ of its own: left as is
        response.__class__ = _guarded(type(response))


_GUARDED: dict[type[Response], type[Response]] = {}
"""Each response class, and its subclass whose sending ends the request's batch."""


def _guarded(cls: type[Response]) -> type[Response]:
    """*cls*, whose sending ends the request's batch when it raises (made once per class)."""
    if (guarded := _GUARDED.get(cls)) is not None or cls in _GUARDED.values():
        return guarded or cls

    async def __call__(self: Response, scope: Any, receive: Any, send: Any) -> None:
        try:
            await cls.__call__(self, scope, receive, send)
        except BaseException as exc:
            view = scope.get(SCOPE_KEY)
            if isinstance(view, EventBus):
                await end_request(view, exc)
            raise

    namespace = {"__call__": __call__, "__module__": cls.__module__}
    guarded = type(cls.__name__, (cls,), namespace | {"__qualname__": cls.__qualname__})
    _GUARDED[cls] = guarded
    return guarded


async def _call(endpoint: Callable[..., Any], is_async: bool, *args: Any) -> Any:
    if is_async:
        return await endpoint(*args)
    return await run_in_threadpool(endpoint, *args)


def _new_view(connection: HTTPConnection) -> EventBus:
    # A WebSocket session has no response to wait for: each event is handled as emitted.
    websocket = connection.scope["type"] == "websocket"
    return open_request(EventBus.of(connection.scope["app"]), connection, websocket=websocket)


def _is_async(endpoint: Callable[..., Any]) -> bool:
    """Whether *endpoint* is awaited, not run in the thread pool: as Starlette decides for
    its own endpoints (a partial's function, a callable instance's ``async def __call__``)."""
    while isinstance(endpoint, functools.partial):
        endpoint = endpoint.func
    call = type(endpoint).__call__ if not inspect.isroutine(endpoint) else None
    return inspect.iscoroutinefunction(endpoint) or inspect.iscoroutinefunction(call)


def _name(endpoint: Callable[..., Any]) -> str:
    return getattr(endpoint, "__qualname__", repr(endpoint))
