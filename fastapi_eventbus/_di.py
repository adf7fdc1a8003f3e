"""The one module that touches FastAPI's dependency internals.

`get_dependant`, `solve_dependencies`, `get_typed_signature` and the ASGI scope
keys FastAPI keeps its exit stacks under are not public API and move between
releases. Everything that depends on them lives here, so one file is adapted
when FastAPI changes, and the test suite runs against the lowest and the newest
supported release.

A handler's dependency graph is analysed once, by `analyse_handler`, when the
handler is registered; `run_handler` then resolves it through FastAPI's own
solver for every call, on exit stacks that belong to that call alone.
"""

from __future__ import annotations

import asyncio
import glob
import inspect
from collections.abc import Callable, Coroutine, Iterator, MutableMapping
from contextlib import AsyncExitStack
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ForwardRef, get_args, get_origin

from fastapi import params
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_dependant, get_typed_signature, solve_dependencies
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request

from ._events import Event, event_name_of, events_in_union, is_event_model
from ._patterns import compile_pattern
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from ._retry import Retry

INNER_ASTACK = "fastapi_inner_astack"
FUNCTION_ASTACK = "fastapi_function_astack"

_HTTP_INPUTS = ("path", "query", "header", "cookie", "body")
"""Where FastAPI reads a parameter from the request: a `Dependant`'s ``<kind>_params``."""


try:  # newer FastAPI: predicates that see through functools.partial and functools.wraps
    from fastapi.dependencies.models import (
        _is_async_gen_callable,
        _is_coroutine_callable,
        _is_gen_callable,
    )
except ImportError:  # older FastAPI: the same predicates are properties of a Dependant

    def _is_coroutine_callable(call: Callable[..., Any] | None) -> bool:
        return bool(Dependant(call=call).is_coroutine_callable)  # type: ignore[attr-defined]

    def _is_gen_callable(call: Callable[..., Any] | None) -> bool:
        return bool(Dependant(call=call).is_gen_callable)  # type: ignore[attr-defined]

    def _is_async_gen_callable(call: Callable[..., Any] | None) -> bool:
        return bool(Dependant(call=call).is_async_gen_callable)  # type: ignore[attr-defined]


def is_coroutine_callable(call: Callable[..., Any]) -> bool:
    """Whether FastAPI awaits *call* (rather than running it in the threadpool): FastAPI's
    own predicate, so that a handler or dependency is classified as an endpoint would be
    (asyncio's legacy ``_is_coroutine`` marker; on newer FastAPI, ``partial`` and ``wraps``
    wrappers of async functions and of instances with ``async def __call__``)."""
    return bool(_is_coroutine_callable(call))


def is_generator_callable(call: Callable[..., Any]) -> bool:
    """Whether FastAPI treats *call* as a ``yield`` (sync or async generator) dependency."""
    return bool(_is_gen_callable(call) or _is_async_gen_callable(call))


@dataclass(frozen=True, slots=True)
class HandlerPlan:
    """What `analyse_handler` learnt about a handler, reused for every call."""

    dependant: Dependant
    event_param: str | None
    event_model: type[BaseModel] | None
    is_async: bool
    uses_solver: bool
    simple: bool
    """The graph has only plain functions and classes: `_solve_simple` gives the solver's result."""
    steps: tuple[Step, ...] = ()
    """The graph compiled for `_solve_simple` (when *simple*): what to call, in order."""
    may_emit: bool = True
    """Whether the handler may get a bus (``Depends(get_bus)``) to emit chained events.
    False only for simple graphs that do not ask for one (overrides aside: see `run_handler`)."""
    event_first: bool = False
    """The handler's own code takes the event first, by position (no wrapper): passed so."""

    def describe_dependencies(self) -> list[str]:
        """Qualified names of the handler's direct dependencies."""
        return [qualified_name(d.call) for d in self.dependant.dependencies]


@dataclass(frozen=True, slots=True)
class Step:
    """One dependency of a simple graph, with what `_solve_simple` needs to know, precomputed."""

    call: Callable[..., Any]
    is_async: bool
    use_cache: bool
    name: str | None
    needs: tuple[Step, ...]


BUS_DEPENDENCIES: set[Callable[..., Any]] = set()
"""The dependencies that give a bus (`get_bus`, `EventBus.dependency`), registered by _bus."""


def _asks_for_bus(steps: tuple[Step, ...]) -> bool:
    return any(
        step.call in BUS_DEPENDENCIES
        or getattr(step.call, "__func__", None) in BUS_DEPENDENCIES
        or _asks_for_bus(step.needs)
        for step in steps
    )


def _steps(dependant: Dependant) -> tuple[Step, ...]:
    return tuple(
        Step(
            sub.call,  # type: ignore[arg-type]  # a simple graph's calls are never None
            is_coroutine_callable(sub.call),  # type: ignore[arg-type]
            sub.use_cache,
            sub.name,
            _steps(sub),
        )
        for sub in dependant.dependencies
    )


def qualified_name(call: object) -> str:
    """``module.qualname`` of a function or class, for logs and error messages."""
    name = getattr(call, "__qualname__", None) or type(call).__qualname__
    module = getattr(call, "__module__", None)
    return f"{module}.{name}" if module else name


def _is_dependency(param: inspect.Parameter) -> bool:
    if isinstance(param.default, params.Depends):
        return True
    if get_origin(param.annotation) is Annotated:
        return any(isinstance(meta, params.Depends) for meta in param.annotation.__metadata__)
    return False


def _event_type(param: inspect.Parameter) -> tuple[bool, type[BaseModel] | None]:
    """Whether *param* receives the event, and the typed model it wants, if any."""
    if _is_dependency(param):
        return False, None
    annotation = _unwrapped(param.annotation)
    if isinstance(annotation, type) and issubclass(annotation, Event):
        return True, None
    if is_event_model(annotation):
        return True, annotation
    plain = annotation in (inspect.Parameter.empty, Any)
    return param.name == "event" and plain, None


def _find_event_param(
    func: Callable[..., Any], signature: inspect.Signature
) -> tuple[str | None, type[BaseModel] | None]:
    found: list[tuple[str, type[BaseModel] | None]] = []
    for param in signature.parameters.values():
        if not _is_dependency(param) and (union := events_in_union(_unwrapped(param.annotation))):
            raise ConfigurationError(
                f"handler {qualified_name(func)}: parameter {param.name!r} is annotated with a "
                f"union ({union}); a handler gets one event, never None: annotate it Event (any "
                "event; read event.name) or one model, and register one handler per model"
            )
        is_event, model = _event_type(param)
        if is_event:
            found.append((param.name, model))
    if len(found) > 1:
        names = ", ".join(repr(name) for name, _ in found)
        raise ConfigurationError(
            f"handler {qualified_name(func)} has more than one event parameter ({names}); "
            "a handler receives exactly one event"
        )
    return found[0] if found else (None, None)


def _check_kinds(func: Callable[..., Any], signature: inspect.Signature) -> None:
    for param in signature.parameters.values():
        if isinstance(param.annotation, str | ForwardRef):
            annotation = getattr(param.annotation, "__forward_arg__", param.annotation)
            raise ConfigurationError(
                f"handler {qualified_name(func)}: the annotation {annotation!r} of parameter "
                f"{param.name!r} cannot be resolved; names used in handler annotations must be "
                "importable from the handler's module (beware `from __future__ import annotations` "
                "with names defined inside a function)"
            )
        if param.kind in (param.POSITIONAL_ONLY, param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ConfigurationError(
                f"handler {qualified_name(func)}: parameter {param.name!r} is "
                f"{param.kind.description}; handlers are called with keyword arguments only"
            )


def _reject_unserved(
    func: Callable[..., Any], signature: inspect.Signature, root: Dependant
) -> None:
    """Refuse a parameter FastAPI would leave empty: the handler could never be called.
    FastAPI gives each of ``Request``, ``WebSocket``, ``HTTPConnection``, ``Response``,
    ``BackgroundTasks`` and ``SecurityScopes`` to one parameter (the last that asks; ``Request``
    and ``HTTPConnection`` are different kinds: both are served)."""
    served = {sub.name for sub in root.dependencies}
    served.update(getattr(root, attr) for attr in _SPECIAL_PARAMS)
    for param in signature.parameters.values():
        if param.name not in served and param.default is inspect.Parameter.empty:
            raise ConfigurationError(
                f"handler {qualified_name(func)}: FastAPI would never fill parameter "
                f"{param.name!r}: it gives each of Request, HTTPConnection, WebSocket, Response, "
                "BackgroundTasks and SecurityScopes to one parameter only"
            )


def _unwrapped(annotation: object) -> object:
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def _walk(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _walk(sub)


def _reject_http_inputs(func: Callable[..., Any], root: Dependant) -> None:
    for dependant in _walk(root):
        owner = f"handler {qualified_name(func)}"
        if dependant is not root:
            owner = f"dependency {qualified_name(dependant.call)} of {owner}"
        for kind in _HTTP_INPUTS:
            for field in getattr(dependant, f"{kind}_params"):
                raise ConfigurationError(
                    f"{owner}: parameter {field.name!r} would be read from the HTTP request "
                    f"({kind}), but handlers run after the response, with no request input. "
                    "Take the data from the event payload, or inject it with Depends()."
                )
        for attr, what in (
            ("websocket_param_name", "WebSocket"),
            ("response_param_name", "Response"),
        ):
            if getattr(dependant, attr):
                raise ConfigurationError(
                    f"{owner}: parameter {getattr(dependant, attr)!r} asks for a {what}, "
                    "which does not exist when a handler runs"
                )


_SPECIAL_PARAMS = (
    "request_param_name",
    "websocket_param_name",
    "http_connection_param_name",
    "response_param_name",
    "background_tasks_param_name",
    "security_scopes_param_name",
)


# Newer FastAPI names them own/parent_oauth_scopes; 0.121 security_scopes/security_requirements.
_SECURITY_ATTRS = (
    "own_oauth_scopes",
    "parent_oauth_scopes",
    "security_scopes",
    "security_requirements",
)


def _special_params(dependant: Dependant) -> bool:
    return any(getattr(dependant, attr) for attr in _SPECIAL_PARAMS)


def _is_simple(dependant: Dependant) -> bool:
    """Whether FastAPI would just call this dependency: a plain function (sync or async, not
    wrapped, no ``yield``) or class, with no security scopes, explicit ``scope=``, concurrency
    limit or Request-like parameters. FastAPI's solver then calls each dependency (sync ones in
    the thread pool), depth first, caching results by callable: what `_solve_simple` does."""
    call = dependant.call
    if inspect.isclass(call):
        plain = True
    elif inspect.isfunction(call):
        plain = not hasattr(call, "__wrapped__") and not (
            inspect.isgeneratorfunction(call) or inspect.isasyncgenfunction(call)
        )
    else:
        plain = False
    return (
        plain
        and not _special_params(dependant)
        and not any(getattr(dependant, attr, None) for attr in _SECURITY_ATTRS)
        and dependant.scope is None
        and getattr(dependant, "concurrency", None) is None
    )


def _typed_signature(func: Callable[..., Any]) -> inspect.Signature:
    """*func*'s signature as FastAPI reads it, its string annotations resolved where they
    were written: older FastAPI releases (0.121) resolve a function's only, not those of a
    callable instance's ``__call__`` or of a ``functools.partial``'s function."""
    signature = get_typed_signature(func)
    params = signature.parameters.values()
    if not any(isinstance(param.annotation, str | ForwardRef) for param in params):
        return signature
    try:
        resolved = inspect.signature(func, eval_str=True).parameters
    except Exception:  # e.g. NameError: `_check_kinds` names the annotation
        return signature
    return signature.replace(
        parameters=[param.replace(annotation=resolved[param.name].annotation) for param in params]
    )


def analyse_handler(func: Callable[..., Any]) -> HandlerPlan:
    """Analyse *func* once: its event parameter and its dependency graph.

    Raises `ConfigurationError` naming the handler and the parameter for
    anything a handler cannot be given.
    """
    if not callable(func):
        raise ConfigurationError(f"a handler must be callable, got {func!r}")
    if inspect.isclass(func) and any("__call__" in vars(k) for k in func.__mro__[:-1]):
        raise ConfigurationError(  # its __init__ would run per event, never its __call__
            f"handler {qualified_name(func)} is a class with __call__: register an instance "
            f"of it, @bus.on(...)({func.__name__}())"
        )
    if is_generator_callable(func):
        raise ConfigurationError(
            f"handler {qualified_name(func)} is a generator; handlers must return None"
        )
    try:
        signature = _typed_signature(func)
    except (ValueError, TypeError) as exc:  # builtins and C callables have no signature
        raise ConfigurationError(
            f"handler {qualified_name(func)}: its signature cannot be read ({exc}); "
            "register a Python function"
        ) from exc
    _check_kinds(func, signature)
    event_param, event_model = _find_event_param(func, signature)
    others = [p for name, p in signature.parameters.items() if name != event_param]

    def shim() -> None:  # carries the signature FastAPI analyses, minus the event
        """Placeholder whose signature is the handler's, without its event parameter."""

    shim_signature = signature.replace(parameters=others)
    shim.__signature__ = shim_signature  # type: ignore[attr-defined]
    try:
        dependant = get_dependant(path="", call=shim)
    except (AssertionError, ValueError, TypeError) as exc:  # FastAPI's own checks
        raise ConfigurationError(
            f"handler {qualified_name(func)}: FastAPI cannot use its parameters: {exc}"
        ) from exc
    _reject_http_inputs(func, dependant)
    _reject_unserved(func, shim_signature, dependant)
    uses_solver = bool(dependant.dependencies) or _special_params(dependant)
    simple = not _special_params(dependant) and all(
        _is_simple(sub) for sub in _walk(dependant) if sub is not dependant
    )
    steps = _steps(dependant) if simple else ()
    may_emit = not simple or _asks_for_bus(steps)
    own = getattr(func, "__func__", func)  # a function's (a method's) code, if the signature
    plain = not hasattr(own, "__wrapped__") and "__signature__" not in getattr(own, "__dict__", {})
    code = getattr(own, "__code__", None) if plain else None  # is its own; a wrapper's: by name
    first = code.co_varnames[inspect.ismethod(func) : code.co_argcount][:1] if code else ()
    return HandlerPlan(
        dependant,
        event_param,
        event_model,
        is_coroutine_callable(func),
        uses_solver,
        simple,
        steps,
        may_emit,
        first == (event_param,),
    )


def request_exit_stack(connection: HTTPConnection) -> AsyncExitStack | None:
    """The exit stack FastAPI closes after the response (and its background tasks)."""
    stack = connection.scope.get(INNER_ASTACK)
    return stack if isinstance(stack, AsyncExitStack) else None


def handler_call(
    plan: HandlerPlan,
    func: Callable[..., Any],
    event_arg: object,
    overrides_provider: object | None,
    overrides: bool | None = None,
) -> Coroutine[Any, Any, object]:
    """`run_handler`'s coroutine (with a fresh scope); for an async handler without
    dependencies, the handler's own (nothing to resolve: one coroutine level less per call),
    whose result the caller gives to `returned` if it is not None."""
    if plan.uses_solver or not plan.is_async:
        return run_handler(plan, func, event_arg, {}, overrides_provider, overrides)
    if plan.event_param is None:
        return func()  # type: ignore[no-any-return]
    if plan.event_first:  # the only parameter: passed by position, without a dict
        return func(event_arg)  # type: ignore[no-any-return]
    return func(**{plan.event_param: event_arg})  # type: ignore[no-any-return]


async def run_handler(
    plan: HandlerPlan,
    func: Callable[..., Any],
    event_arg: object,
    scope: MutableMapping[str, Any],
    overrides_provider: object | None,
    overrides: bool | None = None,
) -> None:
    """Resolve *func*'s dependencies with FastAPI's solver and call it once.

    *scope* is a fresh dict owned by this call; the handler's own exit stacks
    are stored in it, so ``yield`` dependencies open and close around this call
    and never touch the request's stacks.
    """
    if overrides is None:
        overrides = has_overrides(overrides_provider)
    if plan.uses_solver and (not plan.simple or overrides):
        await _run_solved(plan, func, event_arg, scope, overrides_provider)
        return
    values: dict[str, Any] = {}
    if plan.steps:  # `_solve_simple`, its first level inlined: one coroutine less
        cache: dict[Any, Any] = {}
        for step in plan.steps:
            sub_values = await _solve_simple(step.needs, cache) if step.needs else {}
            call = step.call
            if step.use_cache and call in cache:
                solved = cache[call]
            elif step.is_async:
                solved = await call(**sub_values)
            else:
                solved = await run_in_threadpool(call, **sub_values)
            if step.name is not None:
                values[step.name] = solved
            cache.setdefault(call, solved)
    if plan.event_param is not None:
        values[plan.event_param] = event_arg
    if plan.is_async:
        result = await func(**values)
    else:
        result = await run_in_threadpool(func, **values)
    if result is not None:
        await returned(result)


async def _run_solved(
    plan: HandlerPlan,
    func: Callable[..., Any],
    event_arg: object,
    scope: MutableMapping[str, Any],
    overrides_provider: object | None,
) -> None:
    """The handler, its graph solved by `solve_dependencies` on exit stacks of its own."""
    raised: BaseException | None = None
    async with AsyncExitStack() as request_stack:
        async with AsyncExitStack() as function_stack:
            scope[INNER_ASTACK] = request_stack
            scope[FUNCTION_ASTACK] = function_stack
            if scope.get("type") != "http":  # a WebSocket session's events: a Request needs
                scope["type"], scope["method"] = "http", "GET"  # "http" and its method (GET)
            solved = await solve_dependencies(
                request=Request(scope),
                dependant=plan.dependant,
                dependency_overrides_provider=overrides_provider,
                async_exit_stack=request_stack,
                embed_body_fields=False,
            )
            if solved.errors:  # e.g. an override that asks for request input
                raise ConfigurationError(
                    f"dependencies of handler {qualified_name(func)} failed: {solved.errors}"
                )
            values = solved.values
            if plan.event_param is not None:
                values[plan.event_param] = event_arg
            try:
                if plan.is_async:
                    result = await func(**values)
                else:
                    result = await run_in_threadpool(func, **values)
                if result is not None:
                    await returned(result)
            except BaseException as exc:  # a yield dependency may swallow any of them
                raised = exc
                raise
        if solved.background_tasks is not None and raised is None:  # FastAPI's rule
            await solved.background_tasks()
    if raised is not None:  # FastAPI fails the request here too ("no response")
        raised.add_note(
            "a yield dependency of the handler caught this exception and did not re-raise it"
        )
        raise raised


def has_overrides(provider: object | None) -> bool:
    """Whether the app (the overrides provider) has any ``dependency_overrides`` now."""
    return bool(getattr(provider, "dependency_overrides", None))


async def _solve_simple(steps: tuple[Step, ...], cache: dict[Any, Any]) -> dict[str, Any]:
    """`solve_dependencies` for graphs `_is_simple` accepted: same calls, order and cache."""
    values: dict[str, Any] = {}
    for step in steps:
        sub_values = await _solve_simple(step.needs, cache) if step.needs else {}
        call = step.call
        if step.use_cache and call in cache:
            solved = cache[call]
        elif step.is_async:
            solved = await call(**sub_values)
        else:
            solved = await run_in_threadpool(call, **sub_values)
        if step.name is not None:
            values[step.name] = solved
        cache.setdefault(call, solved)
    return values


async def returned(result: object) -> None:
    """What a handler's call returned (not None): an awaitable is awaited, not dropped.

    FastAPI's predicate decides what is async; where it cannot see an async body (older
    FastAPI and a ``functools.wraps`` or ``partial`` wrapper), a sync handler returns a
    coroutine; an async one may return one it forgot to await (``return send(event)``)."""
    while inspect.isawaitable(result) and not asyncio.isfuture(result):  # a task or a
        result = await result  # future it returns runs on its own, as it did before


CURRENT_EVENT: ContextVar[tuple[Event, Any]] = ContextVar("fastapi_eventbus.current_event")
"""The event being handled, with the batch running it (`_batch.Batch`: its chain depth), set
by the dispatch around its handlers' calls."""


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
        return CURRENT_EVENT.get()[0]
    except LookupError:
        raise ConfigurationError(
            "current_event is only available while a handler runs (in the handler "
            "and its dependencies), not in an endpoint"
        ) from None


@dataclass(frozen=True, slots=True)
class Handler:
    """A registered handler and its analysed dependency plan."""

    func: Callable[..., Any]
    plan: HandlerPlan
    patterns: tuple[str, ...]
    name: str
    timeout: float | None = None
    """Seconds one call (dependencies, body, ``yield`` exits) may take; None: no limit."""
    retry: Retry | None = None
    """How often an in-process call is tried again after it failed (not in workers)."""


def new_handler(
    func: Callable[..., Any],
    patterns: list[str],
    timeout: float | None,
    retry: Retry | None,
) -> Handler:
    """*func* analysed as a handler of *patterns* (checked, see `pattern_of`); with no
    pattern, the typed event it takes.

    Raises:
        ConfigurationError: It has no pattern, or takes a typed event its patterns never
            match (or `analyse_handler`'s reasons).
    """
    plan = analyse_handler(func)
    model_name = event_name_of(plan.event_model) if plan.event_model is not None else None
    if not patterns and model_name is not None:
        patterns = [glob.escape(model_name)]
    name = qualified_name(func)
    if not patterns:
        raise ConfigurationError(f"handler {name} needs at least one event pattern")
    matched = model_name is None or any(compile_pattern(p)(model_name) for p in patterns)
    if plan.event_model is not None and not matched:
        raise ConfigurationError(
            f"handler {name} takes {plan.event_model.__qualname__} "
            f"(event {model_name!r}) but its patterns {patterns} never match that name"
        )
    return Handler(func, plan, tuple(patterns), name, timeout, retry)
