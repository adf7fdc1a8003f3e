"""The bus's shortcut for simple dependency graphs gives exactly what FastAPI's solver gives.

Every graph below is resolved twice for the same handler: once with no
``dependency_overrides`` (the shortcut, where the graph qualifies) and once with an
unrelated override set, which sends every call through ``solve_dependencies``. Values,
the order dependencies ran in and how often they ran must match.
"""

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Request, Security

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus._di import analyse_handler

CALLS: list[str] = []


def leaf_sync() -> str:
    CALLS.append("leaf_sync")
    return "sync"


async def leaf_async() -> str:
    CALLS.append("leaf_async")
    return "async"


class Service:
    def __init__(self, value: Annotated[str, Depends(leaf_async)]) -> None:
        CALLS.append("Service")
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Service) and other.value == self.value

    __hash__ = None  # type: ignore[assignment]


async def middle(a: str = Depends(leaf_sync), b: str = Depends(leaf_async)) -> str:
    CALLS.append("middle")
    return f"{a}+{b}"


def uncached_leaf() -> int:
    CALLS.append("uncached_leaf")
    return len(CALLS)


def gen_dep() -> Iterator[str]:
    CALLS.append("gen enter")
    yield "gen"
    CALLS.append("gen exit")


async def agen_dep() -> AsyncIterator[str]:
    CALLS.append("agen enter")
    yield "agen"
    CALLS.append("agen exit")


def with_request(request: Request) -> str:
    CALLS.append("with_request")
    return request.method


def _decorator(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


@_decorator
def wrapped() -> str:
    CALLS.append("wrapped")
    return "wrapped"


class CallableInstance:
    async def __call__(self) -> str:
        CALLS.append("instance")
        return "instance"


def scoped_leaf() -> str:
    CALLS.append("scoped_leaf")
    return "scoped"


def _graph(**params: tuple[Any, Any]) -> Callable[..., Any]:
    """A handler taking the event plus *params*: name -> (annotation, default)."""
    seen: list[dict[str, Any]] = []

    async def handler(event: Event, **kwargs: Any) -> None:
        seen.append(kwargs)

    # Build a real signature: FastAPI analyses it like any handler.
    parameters = [inspect.Parameter("event", inspect.Parameter.KEYWORD_ONLY, annotation=Event)]
    for name, (annotation, default) in params.items():
        parameters.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default
            )
        )
    handler.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    handler.seen = seen  # type: ignore[attr-defined]
    return handler


EMPTY = inspect.Parameter.empty

GRAPHS: dict[str, tuple[bool, dict[str, Any]]] = {
    "async leaf": (True, {"a": (str, Depends(leaf_async))}),
    "sync leaf": (True, {"a": (str, Depends(leaf_sync))}),
    "class with a sub-dependency": (True, {"svc": (Service, Depends())}),
    "Annotated": (True, {"a": (Annotated[str, Depends(leaf_async)], EMPTY)}),
    "sub-dependencies and the cache (diamond)": (
        True,
        {
            "m": (str, Depends(middle)),
            "a": (str, Depends(leaf_sync)),
            "b": (str, Depends(leaf_async)),
        },
    ),
    "use_cache=False": (
        True,
        {"x": (int, Depends(uncached_leaf)), "y": (int, Depends(uncached_leaf, use_cache=False))},
    ),
    "generator": (False, {"g": (str, Depends(gen_dep)), "a": (str, Depends(leaf_sync))}),
    "async generator": (False, {"g": (str, Depends(agen_dep))}),
    "Request": (False, {"r": (str, Depends(with_request))}),
    "wrapped function": (False, {"w": (str, Depends(wrapped))}),
    "partial": (False, {"p": (str, Depends(functools.partial(leaf_sync)))}),
    "callable instance": (False, {"i": (str, Depends(CallableInstance()))}),
    "Security scopes": (False, {"s": (str, Security(leaf_async, scopes=["read"]))}),
    "scope='function'": (False, {"f": (str, Depends(scoped_leaf, scope="function"))}),
}


@pytest.mark.anyio
@pytest.mark.parametrize("kind", list(GRAPHS))
async def test_simple_graphs_resolve_like_the_solver(kind: str) -> None:
    simple, spec = GRAPHS[kind]
    handler = _graph(**spec)
    assert analyse_handler(handler).simple is simple

    bus = EventBus()
    app = FastAPI()
    bus.install(app)
    bus.on("x")(handler)

    CALLS.clear()
    await bus.publish("x")
    direct = (list(CALLS), handler.seen[-1])  # type: ignore[attr-defined]

    app.dependency_overrides[print] = print  # unrelated: forces solve_dependencies
    CALLS.clear()
    await bus.publish("x")
    solved = (list(CALLS), handler.seen[-1])  # type: ignore[attr-defined]

    assert direct == solved
    assert direct[0], "the graph ran no dependency at all"


@pytest.mark.anyio
async def test_overrides_of_a_simple_graph_go_through_the_solver() -> None:
    bus = EventBus()
    app = FastAPI()
    bus.install(app)
    handler = _graph(m=(str, Depends(middle)))
    bus.on("x")(handler)
    app.dependency_overrides[leaf_sync] = lambda: "overridden"
    await bus.publish("x")
    assert handler.seen == [{"m": "overridden+async"}]  # type: ignore[attr-defined]
