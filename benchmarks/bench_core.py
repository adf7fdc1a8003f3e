"""Per request and per event, in one process: the bus against FastAPI and fastapi-events 0.12.

Run ``python -m benchmarks.bench_core`` (about 2 min) or add ``--quick`` (about 40 s).
HTTP rows call each one-route app directly (``await app(scope, receive, send)``: no
socket, no client); background tasks and handlers run inside that call (Starlette awaits
them after the response), so their cost is counted. Rows (CPU time, `benchmarks._harness`):

- **per request**: bare endpoint; the *floor* (the least FastAPI needs for "emit one event
  -> handler with one Depends": one trivial async ``Depends``, ``BackgroundTasks``, one
  task awaiting the handler's dependency, then calling the handler); ``Depends(get_bus)``
  alone; ours emitting 1 and 10 events to a handler with one ``Depends``; fastapi-events
  doing the same; traced and OTel context rows.
- **payload sizes**: one event of 100 B, 10 KiB, 1 MiB (an order with line items, or a
  string), ours against fastapi-events, same app shape.
- **publish** to handlers with 0, 1 (async or sync) and 3 ``Depends`` (one a ``yield``),
  each against ``solve_dependencies`` called by hand; 4 handlers on one event against 1.

fastapi-events: its middleware, ``dispatch()`` in the endpoint, a fresh ``LocalHandler``
with the same handler. In its favour or needed for it to work: ``value: int = Depends()``
(it resolves no ``Annotated``); annotations resolved up front (it evaluates string
annotations per event); its OpenTelemetry hooks off (``fe1_otel`` has them on).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import typing
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_dependant, get_typed_signature, solve_dependencies
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from benchmarks import _harness as h
from benchmarks._harness import CALLS, RESPONSES, Op, Variant
from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus._deadline import Limit, Watchdog
from fastapi_eventbus._di import CURRENT_EVENT
from fastapi_eventbus._events import check_name, make_event
from fastapi_eventbus._payloads import to_json_data

PAYLOAD = {"id": 1, "name": "cat"}

# -- what the applications and the bus run ----------------------------------------------


async def async_value() -> int:
    CALLS["dep.async"] += 1
    return 1


def sync_value() -> int:
    """FastAPI and the bus run it in the thread pool."""
    CALLS["dep.sync"] += 1
    return 1


async def config_value() -> int:
    CALLS["dep.config"] += 1
    return 2


async def current_user() -> str:
    CALLS["dep.user"] += 1
    return "cat"


async def open_session() -> AsyncIterator[dict[str, bool]]:
    """A ``yield`` dependency: entered before the handler, closed after it."""
    CALLS["dep.session_open"] += 1
    session = {"open": True}
    try:
        yield session
    finally:
        session["open"] = False
        CALLS["dep.session_close"] += 1


async def trivial() -> bool:
    """The floor's one endpoint dependency, standing for ``Depends(get_bus)``."""
    return True


async def noop_task() -> None:
    CALLS["task.noop"] += 1


Value = Annotated[int, Depends(async_value)]
Config = Annotated[int, Depends(config_value)]


async def handle_async_dep(event: Event, value: Value) -> None:
    CALLS["handler.async_dep"] += value


async def handle_sync_dep(event: Event, value: Annotated[int, Depends(sync_value)]) -> None:
    CALLS["handler.sync_dep"] += value


async def handle_no_dep(event: Event) -> None:
    CALLS["handler.no_dep"] += 1


async def handle_3y(
    event: Event, value: Value, config: Config, session: Annotated[Any, Depends(open_session)]
) -> None:
    if value == 1 and config == 2 and session["open"]:  # closed only after the handler
        CALLS["handler.3y"] += 1


async def handle_3(
    event: Event, value: Value, config: Config, user: Annotated[str, Depends(current_user)]
) -> None:
    if value == 1 and config == 2 and user == "cat":
        CALLS["handler.3"] += 1


async def fe_handle_async_dep(event: tuple[str, Any], value: int = Depends(async_value)) -> None:
    """fastapi-events' `handle_async_dep`: it passes ``(name, payload)``, reads Depends defaults."""
    CALLS["handler.async_dep"] += value


fe_handle_async_dep.__annotations__ = typing.get_type_hints(fe_handle_async_dep)

ASYNC_DEP = {"handler.async_dep": 1, "dep.async": 1}
SYNC_DEP = {"handler.sync_dep": 1, "dep.sync": 1}
DEPS_3 = {"handler.3": 1, "dep.async": 1, "dep.config": 1, "dep.user": 1}
DEPS_3Y = {"handler.3y": 1, "dep.async": 1, "dep.config": 1, "dep.session_open": 1}
DEPS_3Y["dep.session_close"] = 1


# -- fastapi-events 0.12, when installed --------------------------------------------------


@dataclass(frozen=True)
class FastAPIEvents:
    """Its pieces; ``otel.HAS_OTEL_INSTALLED`` turns its OTel hooks on (*has_otel*: as found)."""

    version: str
    middleware: Any
    local_handler: Any
    dispatch: Callable[..., None]
    otel: Any
    has_otel: bool


@cache
def load_fastapi_events() -> FastAPIEvents | None:
    """fastapi-events if importable, its OpenTelemetry hooks off; else None."""
    names = ("", ".middleware", ".handlers.local", ".dispatcher", ".otel.utils")
    try:
        modules: list[Any] = [importlib.import_module(f"fastapi_events{n}") for n in names]
    except ImportError:
        return None
    package, middleware, local, dispatcher, otel = modules
    has_otel, otel.HAS_OTEL_INSTALLED = bool(otel.HAS_OTEL_INSTALLED), False
    mw, handler = middleware.EventHandlerASGIMiddleware, local.LocalHandler
    return FastAPIEvents(package.__version__, mw, handler, dispatcher.dispatch, otel, has_otel)


# -- the applications (one route each, so routing costs the same everywhere) --------------


def bare_app() -> FastAPI:
    app = FastAPI()

    @app.post("/")
    async def endpoint() -> dict[str, bool]:
        CALLS["endpoint"] += 1
        return {"ok": True}

    return app


def depends_app() -> FastAPI:
    app = FastAPI()

    @app.post("/")
    async def endpoint(value: Value) -> dict[str, bool]:
        CALLS["endpoint"] += value
        return {"ok": True}

    return app


def background_task_app() -> FastAPI:
    app = FastAPI()

    @app.post("/")
    async def endpoint(background_tasks: BackgroundTasks) -> dict[str, bool]:
        CALLS["endpoint"] += 1
        background_tasks.add_task(noop_task)
        return {"ok": True}

    return app


def floor_app() -> FastAPI:
    """The least FastAPI needs to run the handler with its dependency after the response."""
    app = FastAPI()
    event = Event(name="bench.async_dep", payload=PAYLOAD)

    async def run_handler() -> None:
        await handle_async_dep(event, await async_value())

    @app.post("/")
    async def endpoint(
        background_tasks: BackgroundTasks, ready: Annotated[bool, Depends(trivial)]
    ) -> dict[str, bool]:
        CALLS["endpoint"] += ready
        background_tasks.add_task(run_handler)
        return {"ok": True}

    return app


class LeastView:
    """`least_app`'s request bus: the request's events, its background tasks."""

    __slots__ = ("background", "events")

    def __init__(self, background: BackgroundTasks) -> None:
        self.background = background
        self.events: deque[Event] = deque()

    def emit(self, name: str, payload: Any) -> Event:
        name = check_name(name)
        event = make_event(name, to_json_data(payload, name, False)[0], None)
        if not self.events:
            self.background.add_task(least_flush, self.events)
        self.events.append(event)
        return event

    def end(self, kind: type[BaseException] | None, *_: object) -> None:
        """The request's end: events of an endpoint that raised are reported, not lost."""
        if kind is not None and self.events:
            ids = ", ".join(event.id for event in self.events)
            logging.getLogger(__name__).warning("the endpoint raised: discarded %s", ids)
            self.events.clear()


async def least_get_bus(request: Request, background_tasks: BackgroundTasks) -> LeastView:
    view = LeastView(background_tasks)
    request.scope["fastapi_inner_astack"].push(view.end)  # the request's end, sync: cheaper
    return view


LEAST_WATCHDOG: list[Watchdog] = []


async def least_flush(events: deque[Event]) -> None:
    """Each event to `handle_async_dep` within its time limit, a failure logged, not raised."""
    if not LEAST_WATCHDOG:
        LEAST_WATCHDOG.append(Watchdog(asyncio.get_running_loop()))
    limit = Limit(LEAST_WATCHDOG[0])
    while events:
        event = events.popleft()
        token = CURRENT_EVENT.set((event, None))  # as the dispatch does: with its batch
        limit.start(60.0, "handle_async_dep")
        try:
            await handle_async_dep(event, await async_value())
        except Exception as exc:  # the others still run
            logging.getLogger(__name__).error("handler failed", exc_info=limit.stop(exc))
        else:
            if (error := limit.stop()) is not None:
                logging.getLogger(__name__).error("handler timed out", exc_info=error)
        finally:
            CURRENT_EVENT.reset(token)


def least_app() -> FastAPI:
    """The least of what `emitting_app` promises, written by hand for its one handler, with
    the bus's own parts: a checked name, the payload copied, an `Event` with its id and
    time, one background task per request, the events of an endpoint that raised reported,
    and per event `current_event`, the handler's time limit and its failure isolated. No
    matching, chained events, shutdown reporting, dependency overrides or hooks: the
    cheapest the contract can be."""
    app = FastAPI()

    @app.post("/")
    async def endpoint(bus: Annotated[LeastView, Depends(least_get_bus)]) -> dict[str, bool]:
        CALLS["endpoint"] += 1
        bus.emit("bench.async_dep", PAYLOAD)
        return {"ok": True}

    return app


def emitting_app(events: int, payload: Any = PAYLOAD) -> tuple[FastAPI, EventBus]:
    app, bus = FastAPI(), EventBus()
    bus.install(app)
    bus.on("bench.async_dep")(handle_async_dep)

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> dict[str, bool]:
        CALLS["endpoint"] += 1
        for _ in range(events):
            bus.emit("bench.async_dep", payload)
        return {"ok": True}

    return app, bus


def fastapi_events_app(fe: FastAPIEvents, events: int, payload: Any = PAYLOAD) -> FastAPI:
    """`emitting_app` the fastapi-events way: middleware, ``dispatch``, a local handler."""
    handler = fe.local_handler()  # its own registry, not the module-level `local_handler`
    handler.register(fe_handle_async_dep, event_name="bench.async_dep")
    app = FastAPI()
    app.add_middleware(fe.middleware, handlers=[handler])
    dispatch = fe.dispatch

    @app.post("/")
    async def endpoint() -> dict[str, bool]:
        CALLS["endpoint"] += 1
        for _ in range(events):
            dispatch("bench.async_dep", payload)
        return {"ok": True}

    return app


def with_fe_otel(fe: FastAPIEvents, app: ASGIApp) -> ASGIApp:
    """*app* with fastapi-events' OpenTelemetry hooks on, as installed."""

    async def traced_app(scope: Scope, receive: Receive, send: Send) -> None:
        fe.otel.HAS_OTEL_INSTALLED = True
        try:
            await app(scope, receive, send)
        finally:
            fe.otel.HAS_OTEL_INSTALLED = False

    return traced_app


def traced(bus: EventBus) -> bool:
    """Trace *bus* with the OpenTelemetry SDK (spans made, not exported), if installed."""
    try:
        from opentelemetry.sdk.trace import TracerProvider

        from fastapi_eventbus.otel import instrument_bus
    except ImportError:
        return False
    instrument_bus(bus, tracer_provider=TracerProvider())
    return True


# -- payloads -----------------------------------------------------------------------------

SIZES = {"100": 100, "10k": 10 * 1024, "1m": 1024 * 1024}


def order(items: int) -> dict[str, Any]:
    return {
        "order_id": 1234,
        "customer": "ada",
        "items": [
            {
                "sku": f"SKU-{i:06d}",
                "name": f"item {i} of the order",
                "qty": 1 + i % 3,
                "price": 12.5,
            }
            for i in range(items)
        ],
    }


def structured(size: int) -> dict[str, Any]:
    """An order with as many line items as make about *size* bytes of JSON (10 KiB: 127)."""
    empty, items = len(json.dumps(order(0))), 100
    for _ in range(2):  # the items' size grows with their number: estimate twice
        items = max(0, round((size - empty) / ((len(json.dumps(order(items))) - empty) / items)))
    return order(items)


def payload_rows(fe: FastAPIEvents | None) -> tuple[list[Variant], list[EventBus]]:
    """For each size and shape: ours emitting one event, then fastapi-events doing the same."""
    rows, buses = [], []
    section = "Payload sizes: 1 event -> handler w/ 1 Depends, in-process ASGI"
    for size_key, size in SIZES.items():
        for shape, payload in (("struct", structured(size)), ("str", "x" * (size - 2))):
            key = f"{shape}_{size_key}"
            items = len(payload["items"]) if isinstance(payload, dict) else 0
            what = f"order, {items:,} item{'s' * (items > 1)}" if items else "str"
            app, bus = emitting_app(1, payload)
            label = f"ours, {len(json.dumps(payload)):,} B {what}"
            expected = {"endpoint": 1, RESPONSES: 1, **ASYNC_DEP}
            rows.append(
                Variant(key, label, h.asgi_op(app), "req", 1, expected, f"fe_{key}", section)
            )
            buses.append(bus)
            if fe is not None:
                op = h.asgi_op(fastapi_events_app(fe, 1, payload))
                label = f"  fastapi-events, same payload ({shape} {size_key})"
                rows.append(Variant(f"fe_{key}", label, op, "req", 1, expected, section=section))
    return rows, buses


# -- the solver baseline ------------------------------------------------------------------


def solver_op(handler: Callable[..., Awaitable[None]], provider: FastAPI) -> Op:
    """What a minimal hand-written dispatcher needs to run *handler* with FastAPI's solver.

    Fresh request/function exit stacks per call (``yield`` dependencies get a per-call
    lifetime), ``Request(scope)``, ``solve_dependencies``, then the call; the event is
    built once, the scope is a request-less one like the bus gives ``publish``.
    """
    event = Event(name="bench.baseline", payload=PAYLOAD)
    signature = get_typed_signature(handler)

    def shim() -> None:
        """Carries the handler's signature minus the event."""

    params = [p for name, p in signature.parameters.items() if name != "event"]
    shim.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    dependant: Dependant = get_dependant(path="", call=shim)
    base = {**h.BASE_SCOPE, "headers": [], "app": provider}

    async def op() -> None:
        async with AsyncExitStack() as request_stack, AsyncExitStack() as function_stack:
            scope: MutableMapping[str, Any] = dict(base)
            scope["fastapi_inner_astack"] = request_stack
            scope["fastapi_function_astack"] = function_stack
            solved = await solve_dependencies(
                request=Request(scope),
                dependant=dependant,
                dependency_overrides_provider=provider,
                async_exit_stack=request_stack,
                embed_body_fields=False,
            )
            if solved.errors:
                raise AssertionError(solved.errors)
            await handler(event=event, **solved.values)

    return op


def counting_handler(key: str) -> Callable[[Event], Awaitable[None]]:
    async def handler(event: Event) -> None:
        CALLS[key] += 1

    return handler


def publish_rows() -> tuple[list[Variant], EventBus]:
    app, bus = FastAPI(), EventBus()
    bus.install(app)
    handlers = (
        ("0", "handler w/ 0 Depends", handle_no_dep, {"handler.no_dep": 1}),
        ("1", "handler w/ 1 async Depends", handle_async_dep, ASYNC_DEP),
        ("sync", "handler w/ 1 sync Depends", handle_sync_dep, SYNC_DEP),
        ("3y", "3 Depends, one a yield (async gen)", handle_3y, DEPS_3Y),
        ("3", "3 async Depends, no yield (context)", handle_3, DEPS_3),
    )
    rows = []
    for key, label, handler, calls in handlers:
        bus.on(f"bench.{key}")(handler)
        op = publish_op(bus, f"bench.{key}")
        rows.append(Variant(f"publish_{key}", f"publish, {label}", op, "event", 1, calls))
        rows[-1].baseline = f"solve_{key}"
        label = "  solve_dependencies + call, same handler"
        rows.append(Variant(f"solve_{key}", label, solver_op(handler, app), "event", 1, calls))
    fan = [f"handler.fan{i}" for i in range(4)]
    for key in fan:
        bus.on("bench.fan4")(counting_handler(key))
    label, op = "publish, 4 handlers w/ 0 Depends on one event", publish_op(bus, "bench.fan4")
    rows.append(Variant("publish_4h", label, op, "event", 1, dict.fromkeys(fan, 1), "publish_0"))
    for row in rows:
        row.section = "Direct dispatch: await bus.publish() vs solve_dependencies + call, per event"
    return rows, bus


def publish_op(bus: EventBus, name: str) -> Op:
    async def op() -> None:
        await bus.publish(name, PAYLOAD)

    return op


# -- rows -----------------------------------------------------------------------------------

TEN = {"handler.async_dep": 10, "dep.async": 10}
HTTP_ROWS: dict[str, tuple[str, dict[str, int], tuple[str, ...]]] = {
    "bare": ("bare async endpoint", {}, ()),
    "depends": ("(context) + one trivial async Depends", {"dep.async": 1}, ("bare",)),
    "bg_task": ("(context) + one BackgroundTasks no-op task", {"task.noop": 1}, ("bare",)),
    "floor": ("floor: 1 Depends + BackgroundTasks -> dep, handler", ASYNC_DEP, ("bare",)),
    "get_bus": ("(context) Depends(get_bus), emits nothing", {}, ("bare",)),
    "least": ("(context) emit1's contract at its least, by hand", ASYNC_DEP, ("bare", "floor")),
    "emit1": ("emit 1 event -> handler w/ 1 Depends (ours)", ASYNC_DEP, ("floor", "least", "fe1")),
    "emit10": ("emit 10 events -> same handler", TEN, ("bare", "fe10")),
    "fe1": ("fastapi-events: 1 event -> handler w/ 1 Depends", ASYNC_DEP, ("bare",)),
    "fe10": ("fastapi-events: 10 events -> same handler", TEN, ("bare",)),
    "fe1_otel": ("(context) fe1 with its OTel hooks on (no SDK)", ASYNC_DEP, ("fe1",)),
    "emit1_traced": ("(context) emit1, traced (OTel SDK, no exporter)", ASYNC_DEP, ("emit1",)),
}
"""Per request rows: label, `CALLS` per request besides the endpoint's, baselines."""


def http_app(key: str) -> tuple[Any, EventBus | None]:
    """The app of the row *key* (None if what it needs is not installed), and its bus."""
    fe = load_fastapi_events()
    if key.startswith("fe"):
        if fe is None or (key == "fe1_otel" and not fe.has_otel):
            return None, None
        app = fastapi_events_app(fe, 10 if key == "fe10" else 1)
        return (with_fe_otel(fe, app) if key == "fe1_otel" else app), None
    if key in ("get_bus", "emit1", "emit10", "emit1_traced"):
        app, bus = emitting_app({"get_bus": 0, "emit10": 10}.get(key, 1))
        return (None, None) if key == "emit1_traced" and not traced(bus) else (app, bus)
    apps = {"bare": bare_app, "depends": depends_app, "bg_task": background_task_app}
    apps["floor"], apps["least"] = floor_app, least_app
    return apps[key](), None


def build() -> tuple[list[Variant], list[EventBus]]:
    rows: list[Variant] = []
    buses: list[EventBus] = []
    for key, (label, calls, bases) in HTTP_ROWS.items():
        app, bus = http_app(key)
        if app is not None:
            expected = {"endpoint": 1, RESPONSES: 1, **calls}
            section = "Per request, in-process ASGI"
            rows.append(Variant(key, label, h.asgi_op(app), "req", 1, expected, bases, section))
        buses += [bus] if bus else []
    payloads, payload_buses = payload_rows(load_fastapi_events())
    publishes, publisher = publish_rows()
    traced_publisher = publish_rows()[1]
    if traced(traced_publisher):
        op = publish_op(traced_publisher, "bench.1")
        label = "(context) publish_1, traced"
        section = publishes[-1].section
        publishes.append(
            Variant("publish_traced", label, op, "event", 1, ASYNC_DEP, "publish_1", section)
        )
        buses.append(traced_publisher)
    return rows + payloads + publishes, [*buses, *payload_buses, publisher]


def results(by_key: dict[str, Variant]) -> dict[str, float | None]:
    payloads = [h.ratio(by_key, k, f"fe_{k}") for k in by_key if f"fe_{k}" in by_key]
    extra = None
    if "publish_4h" in by_key:
        extra = (by_key["publish_4h"].median - by_key["publish_0"].median) * 1e6 / 3
    return {
        "floor": h.ratio(by_key, "emit1", "floor"),
        "payload_10k": h.ratio(by_key, "struct_10k", "fe_struct_10k"),
        "payload_all": min((r for r in payloads if r is not None), default=None),
        "fe10": h.ratio(by_key, "emit10", "fe10"),
        "vs_solver": h.ratio(by_key, "publish_1", "solve_1"),
        "per_handler": extra,
    }


async def amain(args: argparse.Namespace) -> bool:
    rows, buses = build()
    counts = await h.run_variants(args, rows, buses, batch=(0.12, 0.35))
    if counts is None:
        return True
    fe = load_fastapi_events()
    extra = f", fastapi-events {fe.version}" if fe else ", fastapi-events not installed"
    h.header("bench_core", args.rounds, extra=extra)
    h.tables(rows)
    by_key = {v.key: v for v in rows}
    us = {key: v.median * 1e6 for key, v in by_key.items()}
    print(f"\none more emitted event in a request: {(us['emit10'] - us['emit1']) / 9:.1f} µs")
    if fe:
        print(f"the same, fastapi-events: {(us['fe10'] - us['fe1']) / 9:.1f} µs")
    print(f"publish over the solver, 1 async Depends: {us['publish_1'] - us['solve_1']:+.1f} µs")
    ok = h.verdict(results(by_key))
    print(h.counts_line(counts))
    return ok


def main(argv: list[str] | None = None) -> int:
    return h.main(amain, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
