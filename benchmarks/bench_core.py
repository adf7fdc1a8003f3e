"""Throughput of fastapi_eventbus against plain FastAPI, measured in one process.

Run ``python -m benchmarks.bench_core`` (about 75 s) or add ``--quick``
(about 15 s). Requests are driven by calling each ASGI app directly,
``await app(scope, receive, send)``, with no sockets and no HTTP client, so
that what differs between two rows is only what the application does.

Rows are measured round-robin: every round times one batch of every variant,
in a rotating order, and the table reports the best and the median batch of
each. Ratios are computed from medians, so they compare variants measured in
the same conditions. Every handler, dependency and background task counts its
calls; the counts are checked at the end, so no row can be measuring a no-op.

``--profile VARIANT`` runs one variant under cProfile instead and prints where
the time goes, in microseconds per operation.

Rows 5 and 6 (keys ``fe1``, ``fe10``) run the same work through fastapi-events
0.12 when it is installed (``pip install -e '.[bench]'``; otherwise they are
skipped and said to be): its ``EventHandlerASGIMiddleware``, ``dispatch()`` in
the endpoint, and a ``LocalHandler`` whose handler takes one async ``Depends``
(the same ``async_value``) and bumps the same counters as ours. Its middleware
awaits the handlers after the inner app returns, inside the ASGI call, and
spawns no task that outlives it (checked: no task is pending after the run), so
the timed operation includes them. Adaptations, each in fastapi-events' favour
or needed for it to work at all, none touching its code:

- it reads ``Depends`` only as a parameter default (``value: int =
  Depends(...)``); an ``Annotated[int, Depends(...)]`` parameter is not
  resolved and the handler fails after the response, so its handler uses the
  default form;
- it re-reads the handler's signature for every event and evaluates string
  annotations each time; this module has PEP 563 string annotations, so the
  handler's are resolved once up front (as in a module without
  ``from __future__ import annotations``), which saves it 15-25 %;
- a fresh ``LocalHandler()`` instead of the module-level ``local_handler``, so
  that its registrations cannot leak into other rows or processes;
- its built-in OpenTelemetry hooks (a span per dispatch and per handled event,
  traceparent injection and extraction; active whenever opentelemetry-api is
  importable, even with no SDK) are switched off
  (``fastapi_events.otel.utils.HAS_OTEL_INSTALLED = False``), as an untraced
  bus makes no tracing call at all; the ``fe1_otel`` context row has them on.

fastapi-events 0.12.2 works unchanged with FastAPI 0.121-0.165 and Starlette
0.49-1.10 (a pure ASGI middleware; its ``Depends`` check is a structural
``Protocol``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import importlib
import pstats
import statistics
import sys
import time
import typing
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_dependant, get_typed_signature, solve_dependencies
from starlette.requests import Request
from starlette.types import ASGIApp, Message

from fastapi_eventbus import Event, EventBus, get_bus

CALLS: Counter[str] = Counter()
"""How many times each handler, dependency and background task really ran."""

Op = Callable[[], Awaitable[None]]

# -- what the applications run --------------------------------------------------


async def async_value() -> int:
    """An async dependency returning a value."""
    CALLS["dep.async"] += 1
    return 1


def sync_value() -> int:
    """A sync dependency returning a value (FastAPI runs it in the thread pool)."""
    CALLS["dep.sync"] += 1
    return 1


async def noop_task() -> None:
    """The background task of variant 2."""
    CALLS["task.noop"] += 1


async def handle_async_dep(event: Event, value: Annotated[int, Depends(async_value)]) -> None:
    """Handler with one async ``Depends``: the subject of variants 3 and 4."""
    CALLS["handler.async_dep"] += value


async def handle_sync_dep(event: Event, value: Annotated[int, Depends(sync_value)]) -> None:
    """Handler with one sync ``Depends``."""
    CALLS["handler.sync_dep"] += value


async def handle_no_dep(event: Event) -> None:
    """Handler with no dependencies at all (the bus skips the solver)."""
    CALLS["handler.no_dep"] += 1


async def fe_handle_async_dep(event: tuple[str, Any], value: int = Depends(async_value)) -> None:
    """fastapi-events' counterpart of `handle_async_dep`: same dependency, same counters.

    fastapi-events gives a local handler the ``(name, payload)`` tuple and
    resolves ``Depends`` only when it is the parameter's default.
    """
    CALLS["handler.async_dep"] += value


# fastapi-events evaluates string annotations again for every event; give it real ones.
fe_handle_async_dep.__annotations__ = typing.get_type_hints(fe_handle_async_dep)


# -- fastapi-events 0.12, when installed ------------------------------------------


@dataclass(frozen=True)
class FastAPIEvents:
    """The pieces of fastapi-events used here, imported at run time (an optional package)."""

    version: str
    middleware: Any
    """``fastapi_events.middleware.EventHandlerASGIMiddleware``"""
    local_handler: Any
    """``fastapi_events.handlers.local.LocalHandler``"""
    dispatch: Callable[..., None]
    otel_utils: Any
    """``fastapi_events.otel.utils``, whose ``HAS_OTEL_INSTALLED`` turns its OTel hooks on."""
    has_otel: bool
    """Whether its OTel hooks were on at import (opentelemetry-api importable)."""


@cache
def load_fastapi_events() -> FastAPIEvents | None:
    """fastapi-events if importable, with its OpenTelemetry hooks off; else None."""
    try:
        package = importlib.import_module("fastapi_events")
        middleware = importlib.import_module("fastapi_events.middleware")
        local = importlib.import_module("fastapi_events.handlers.local")
        dispatcher = importlib.import_module("fastapi_events.dispatcher")
        otel_utils: Any = importlib.import_module("fastapi_events.otel.utils")
    except ImportError:
        return None
    has_otel = bool(otel_utils.HAS_OTEL_INSTALLED)
    otel_utils.HAS_OTEL_INSTALLED = False
    return FastAPIEvents(
        version=str(package.__version__),
        middleware=middleware.EventHandlerASGIMiddleware,
        local_handler=local.LocalHandler,
        dispatch=dispatcher.dispatch,
        otel_utils=otel_utils,
        has_otel=has_otel,
    )


# -- the applications (one route each, so routing costs the same everywhere) ----


def bare_app() -> FastAPI:
    app = FastAPI()

    @app.post("/")
    async def endpoint() -> dict[str, bool]:
        CALLS["endpoint"] += 1
        return {"ok": True}

    return app


def depends_app() -> FastAPI:
    """Context row: what FastAPI charges for resolving any one sub-dependency."""
    app = FastAPI()

    @app.post("/")
    async def endpoint(value: Annotated[int, Depends(async_value)]) -> dict[str, bool]:
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


def emitting_app(events: int) -> tuple[FastAPI, EventBus]:
    app = FastAPI()
    bus = EventBus()
    bus.install(app)
    bus.on("bench.async_dep")(handle_async_dep)
    payload = {"id": 1, "name": "cat"}

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> dict[str, bool]:
        CALLS["endpoint"] += 1
        for _ in range(events):
            bus.emit("bench.async_dep", payload)
        return {"ok": True}

    return app, bus


def fastapi_events_app(fe: FastAPIEvents, events: int) -> FastAPI:
    """fastapi-events' way to do what `emitting_app` does: middleware, dispatch, local handler."""
    handler = fe.local_handler()  # its own registry, not the global `local_handler`
    handler.register(fe_handle_async_dep, event_name="bench.async_dep")
    app = FastAPI()
    app.add_middleware(fe.middleware, handlers=[handler])
    dispatch = fe.dispatch
    payload = {"id": 1, "name": "cat"}

    @app.post("/")
    async def endpoint() -> dict[str, bool]:
        CALLS["endpoint"] += 1
        for _ in range(events):
            dispatch("bench.async_dep", payload)
        return {"ok": True}

    return app


def publishing_bus() -> tuple[FastAPI, EventBus]:
    app = FastAPI()
    bus = EventBus()
    bus.install(app)
    bus.on("bench.no_dep")(handle_no_dep)
    bus.on("bench.async_dep")(handle_async_dep)
    bus.on("bench.sync_dep")(handle_sync_dep)
    return app, bus


# -- driving ASGI apps in-process -------------------------------------------------

BASE_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"bench"), (b"content-length", b"0")],
    "client": ("127.0.0.1", 40000),
    "server": ("bench", 80),
}
REQUEST_MESSAGE: Message = {"type": "http.request", "body": b"", "more_body": False}


def http_op(app: ASGIApp, sent: list[Message]) -> Op:
    """One request to *app*: a fresh scope (apps and the bus write into it)."""

    async def receive() -> Message:
        return REQUEST_MESSAGE

    async def send(message: Message) -> None:
        sent.append(message)

    async def op() -> None:
        await app(dict(BASE_SCOPE), receive, send)

    return op


def check_responses(sent: list[Message], requests: int) -> None:
    """Every request got a complete 200 response; raise otherwise."""
    starts = [m for m in sent if m["type"] == "http.response.start"]
    bodies = [m for m in sent if m["type"] == "http.response.body" and not m.get("more_body")]
    bad = [m["status"] for m in starts if m["status"] != 200]
    if len(starts) != requests or len(bodies) != requests or bad:
        raise AssertionError(
            f"expected {requests} complete 200 responses, got {len(starts)} starts, "
            f"{len(bodies)} final bodies, bad statuses {bad[:5]}"
        )
    sent.clear()


# -- the solver baseline ----------------------------------------------------------


def solver_op(handler: Callable[..., Awaitable[None]], provider: FastAPI) -> Op:
    """What a minimal hand-written dispatcher needs to run *handler* via FastAPI's solver.

    Fresh request/function exit stacks per call (``solve_dependencies`` requires
    them in the scope, and they give ``yield`` dependencies a per-call lifetime),
    ``Request(scope)``, ``solve_dependencies`` with the app as overrides
    provider, then the call. The event is built once, outside the loop, and the
    scope is a request-less one like the bus gives ``publish`` (no headers).
    """
    event = Event(name="bench.baseline", payload={"id": 1, "name": "cat"})
    dependant = _dependant_without_event(handler)
    base = {**BASE_SCOPE, "headers": [], "app": provider}

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


def _dependant_without_event(handler: Callable[..., Any]) -> Dependant:
    signature = get_typed_signature(handler)
    params = [p for name, p in signature.parameters.items() if name != "event"]

    def shim() -> None:
        """Carries the handler's signature minus the event."""

    shim.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return get_dependant(path="", call=shim)


# -- variants -------------------------------------------------------------------


@dataclass
class Variant:
    key: str
    label: str
    op: Op
    unit: str
    events_per_op: int = 0
    expected: dict[str, int] = field(default_factory=dict)
    """``CALLS`` keys and how much each one operation adds to them."""
    baseline: str | None = None
    sent: list[Message] | None = None
    ops_done: int = 0
    rates: list[float] = field(default_factory=list)

    async def run(self, n: int) -> float:
        """Run *n* operations; return the elapsed seconds."""
        op = self.op
        gc.collect()
        start = time.perf_counter()
        for _ in range(n):
            await op()
        elapsed = time.perf_counter() - start
        self.ops_done += n
        if self.sent is not None:
            check_responses(self.sent, n)
        return elapsed


def build_variants() -> tuple[list[Variant], list[EventBus]]:
    """The variants, and the buses behind them (to check nothing is left in flight)."""
    variants: list[Variant] = []

    def http(key: str, label: str, app: FastAPI, events: int, expected: dict[str, int]) -> None:
        sent: list[Message] = []
        variants.append(
            Variant(
                key,
                label,
                http_op(app, sent),
                "req/s",
                events_per_op=events,
                expected={"endpoint": 1, **expected},
                baseline=None if key == "bare" else "bare",
                sent=sent,
            )
        )

    emit1_app, emit1_bus = emitting_app(1)
    emit10_app, emit10_bus = emitting_app(10)
    http("bare", "1 bare async endpoint", bare_app(), 0, {})
    http("depends", "  (context) + one trivial async Depends", depends_app(), 0, {"dep.async": 1})
    http(
        "bg_task", "2 + one BackgroundTasks no-op task", background_task_app(), 0, {"task.noop": 1}
    )
    get_bus_app, get_bus_bus = emitting_app(0)
    http("get_bus", "  (context) Depends(get_bus), emits nothing", get_bus_app, 0, {})
    http(
        "emit1",
        "3 emit 1 event -> handler w/ 1 async Depends",
        emit1_app,
        1,
        {"handler.async_dep": 1, "dep.async": 1},
    )
    http(
        "emit10",
        "4 emit 10 events -> same handler",
        emit10_app,
        10,
        {"handler.async_dep": 10, "dep.async": 10},
    )

    fe = load_fastapi_events()
    if fe is not None:
        async_dep = {"handler.async_dep": 1, "dep.async": 1}
        http(
            "fe1",
            "5 fastapi-events: 1 event -> handler w/ 1 Depends",
            fastapi_events_app(fe, 1),
            1,
            async_dep,
        )
        http(
            "fe10",
            "6 fastapi-events: 10 events -> same handler",
            fastapi_events_app(fe, 10),
            10,
            dict.fromkeys(async_dep, 10),
        )
        if fe.has_otel:
            http(
                "fe1_otel",
                "  (context) 5 with its OTel hooks on (no SDK)",
                fastapi_events_app(fe, 1),
                1,
                async_dep,
            )
            variants[-1].op = with_fastapi_events_otel(fe, variants[-1].op)
            variants[-1].baseline = "fe1"

    traced_app, traced_bus = emitting_app(1)
    if traced(traced_bus):
        http(
            "emit1_traced",
            "  (context) 3, traced (OTel SDK, spans not exported)",
            traced_app,
            1,
            {"handler.async_dep": 1, "dep.async": 1},
        )
        variants[-1].baseline = "emit1"

    app, bus = publishing_bus()

    def publish(name: str) -> Op:
        payload = {"id": 1, "name": "cat"}

        async def op() -> None:
            await bus.publish(name, payload)

        return op

    variants += [
        Variant(
            "publish_no_dep",
            "publish, handler w/ 0 Depends",
            publish("bench.no_dep"),
            "events/s",
            events_per_op=1,
            expected={"handler.no_dep": 1},
        ),
        Variant(
            "publish_async",
            "publish, handler w/ 1 async Depends",
            publish("bench.async_dep"),
            "events/s",
            events_per_op=1,
            expected={"handler.async_dep": 1, "dep.async": 1},
            baseline="solve_async",
        ),
        Variant(
            "publish_sync",
            "publish, handler w/ 1 sync Depends",
            publish("bench.sync_dep"),
            "events/s",
            events_per_op=1,
            expected={"handler.sync_dep": 1, "dep.sync": 1},
            baseline="solve_sync",
        ),
        Variant(
            "solve_async",
            "solve_dependencies + call, 1 async Depends",
            solver_op(handle_async_dep, app),
            "events/s",
            events_per_op=1,
            expected={"handler.async_dep": 1, "dep.async": 1},
        ),
        Variant(
            "solve_sync",
            "solve_dependencies + call, 1 sync Depends",
            solver_op(handle_sync_dep, app),
            "events/s",
            events_per_op=1,
            expected={"handler.sync_dep": 1, "dep.sync": 1},
        ),
    ]
    traced_publisher = publishing_bus()[1]
    if traced(traced_publisher):

        async def traced_publish() -> None:
            await traced_publisher.publish("bench.async_dep", {"id": 1, "name": "cat"})

        variants.append(
            Variant(
                "publish_traced",
                "  (context) publish w/ 1 async Depends, traced",
                traced_publish,
                "events/s",
                events_per_op=1,
                expected={"handler.async_dep": 1, "dep.async": 1},
                baseline="publish_async",
            )
        )
    return variants, [get_bus_bus, emit1_bus, emit10_bus, bus, traced_bus, traced_publisher]


def with_fastapi_events_otel(fe: FastAPIEvents, op: Op) -> Op:
    """*op* with fastapi-events' OpenTelemetry hooks on (as installed), off again after."""
    otel_utils = fe.otel_utils

    async def traced_op() -> None:
        otel_utils.HAS_OTEL_INSTALLED = True
        try:
            await op()
        finally:
            otel_utils.HAS_OTEL_INSTALLED = False

    return traced_op


def traced(bus: EventBus) -> bool:
    """Trace *bus* with the OpenTelemetry SDK (spans made, not exported), if it is installed."""
    try:
        from opentelemetry.sdk.trace import TracerProvider

        from fastapi_eventbus.otel import instrument_bus
    except ImportError:
        return False
    instrument_bus(bus, tracer_provider=TracerProvider())
    return True


# -- measuring ------------------------------------------------------------------


async def calibrate(variant: Variant, warmup: float, batch: float) -> int:
    """Warm *variant* up for about *warmup* seconds; return a batch size of ~*batch* s."""
    n, spent = 16, 0.0
    while spent < warmup:
        elapsed = await variant.run(n)
        spent += elapsed
        per_op = elapsed / n
        n = max(16, min(n * 4, int(warmup / 2 / max(per_op, 1e-9))))
    return max(32, int(batch / per_op))


async def measure(variants: list[Variant], rounds: int, warmup: float, batch: float) -> None:
    sizes = {v.key: await calibrate(v, warmup, batch) for v in variants}
    for r in range(rounds):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            n = sizes[v.key]
            elapsed = await v.run(n)
            v.rates.append(n / elapsed)


def verify_counts(variants: list[Variant]) -> dict[str, int]:
    expected: Counter[str] = Counter()
    for v in variants:
        for key, per_op in v.expected.items():
            expected[key] += per_op * v.ops_done
    actual = {key: CALLS[key] for key in expected}
    if actual != dict(expected):
        raise AssertionError(f"call counts differ: expected {dict(expected)}, got {actual}")
    return actual


def check_no_pending_tasks() -> None:
    """No task outlives its operation: whatever a row spawns, it waited for (or it fails here)."""
    pending = asyncio.all_tasks() - {asyncio.current_task()}
    if pending:
        raise AssertionError(f"{len(pending)} task(s) still pending after the run: {pending}")


# -- reporting ------------------------------------------------------------------

TARGET_EMIT1_RATIO = 0.75
TARGET_PUBLISH_RATE = 100_000.0
TARGET_VS_SOLVER = 2.0
TARGET_VS_FE1 = 3.0
TARGET_VS_FE10 = 5.0
LABEL_WIDTH = 52


def median(v: Variant) -> float:
    return statistics.median(v.rates)


def report(variants: list[Variant], rounds: int, elapsed: float, loop_name: str) -> bool:
    by_key = {v.key: v for v in variants}
    print(
        f"fastapi_eventbus benchmark: {rounds} rounds, round-robin, {loop_name} loop, "
        f"Python {sys.version.split()[0]}, {elapsed:.1f} s"
    )
    header = (
        f"{'variant':<{LABEL_WIDTH}} {'best':>10} {'median':>10} {'µs/op':>8} {'ratio':>7}"
        "  events/s"
    )
    sections = (
        ("HTTP requests, in-process ASGI (req/s; ratio vs 1 bare)", "req/s"),
        ("Direct dispatch (events/s; ratio vs solve_dependencies, same signature)", "events/s"),
    )
    for title, unit in sections:
        print()
        print(title)
        print(header)
        print("-" * len(header))
        for v in variants:
            if v.unit != unit:
                continue
            med = median(v)
            base = by_key[v.baseline] if v.baseline else None
            ratio = f"{med / median(base):.2f}x" if base else "-"
            events = f"{med * v.events_per_op:,.0f}" if v.events_per_op else "-"
            print(
                f"{v.label:<{LABEL_WIDTH}} {max(v.rates):>10,.0f} {med:>10,.0f} "
                f"{1e6 / med:>8.1f} {ratio:>7}  {events}"
            )
        if unit == "req/s":
            fe = load_fastapi_events()
            if fe is None:
                print(
                    "rows 5-6 (fastapi-events) skipped: fastapi-events is not installed "
                    "(pip install -e '.[bench]')"
                )
            else:
                print(
                    f"rows 5-6: fastapi-events {fe.version} (middleware + LocalHandler, "
                    "OTel hooks off; see the module docstring)"
                )

    print()
    overhead = 1e6 / median(by_key["publish_async"]) - 1e6 / median(by_key["solve_async"])
    per_event = (
        1e6 / median(by_key["emit10"]) - 1e6 / median(by_key["emit1"])
    ) / 9  # marginal cost of one more emitted event in a request
    print(f"bus overhead over the solver, publish w/ 1 async Depends: {overhead:+.1f} µs/event")
    print(f"marginal cost of one more emitted event in a request:     {per_event:.1f} µs/event")
    if "fe1" in by_key:
        fe_per_event = (1e6 / median(by_key["fe10"]) - 1e6 / median(by_key["fe1"])) / 9
        print(
            f"the same, fastapi-events:                                 {fe_per_event:.1f} µs/event"
        )

    def versus(key: str, base: str) -> float | None:
        if key not in by_key or base not in by_key:
            return None
        return median(by_key[key]) / median(by_key[base])

    rate = median(by_key["publish_async"])
    targets: list[tuple[str, str, bool | None]] = [
        target(
            f"3 emit 1 event >= {TARGET_EMIT1_RATIO:.2f}x bare",
            versus("emit1", "bare"),
            TARGET_EMIT1_RATIO,
        ),
        (
            f"publish w/ 1 Depends >= {TARGET_PUBLISH_RATE:,.0f} events/s",
            f"{rate:,.0f}",
            rate >= TARGET_PUBLISH_RATE,
        ),
        target(
            f"publish w/ 1 Depends >= {TARGET_VS_SOLVER:g}x solve_dependencies",
            versus("publish_async", "solve_async"),
            TARGET_VS_SOLVER,
        ),
        target(
            f"3 emit 1 event >= {TARGET_VS_FE1:g}x fastapi-events (5)",
            versus("emit1", "fe1"),
            TARGET_VS_FE1,
        ),
        target(
            f"4 emit 10 events >= {TARGET_VS_FE10:g}x fastapi-events (6)",
            versus("emit10", "fe10"),
            TARGET_VS_FE10,
        ),
    ]
    print()
    for label, value, ok in targets:
        verdict = (
            "SKIPPED (fastapi-events not installed)" if ok is None else ("PASS" if ok else "FAIL")
        )
        print(f"target: {label} {'.' * (46 - len(label))} {value:>8}  {verdict}")
    return all(ok is not False for _, _, ok in targets)


def target(label: str, value: float | None, minimum: float) -> tuple[str, str, bool | None]:
    """A ratio target: its label, the value as printed, whether it is met (None: not measured)."""
    if value is None:
        return label, "-", None
    return label, f"{value:.2f}x", value >= minimum


# -- profiling ------------------------------------------------------------------


async def profile(variant: Variant, seconds: float, top: int) -> None:
    n = await calibrate(variant, 0.5, seconds)
    profiler = cProfile.Profile()
    profiler.enable()
    await variant.run(n)
    profiler.disable()
    stats = pstats.Stats(profiler)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in raw.values())
    print(
        f"cProfile of {variant.label!r}: {n} ops, {total / n * 1e6:.1f} µs/op profiled "
        "(cProfile inflates absolute times; compare rows, not with the table)"
    )
    for sort, title in (("tottime", "own time"), ("cumtime", "cumulative time")):
        print()
        print(f"top {top} by {title}, per operation:")
        print(f"{'calls/op':>9} {'own µs':>8} {'cum µs':>8}  function")
        index = 2 if sort == "tottime" else 3
        rows = sorted(raw.items(), key=lambda item: item[1][index], reverse=True)[:top]
        for (filename, line, func), (_, calls, tt, ct, _) in rows:
            where = f"{_short_path(filename)}:{line}({func})"
            print(f"{calls / n:>9.2f} {tt / n * 1e6:>8.2f} {ct / n * 1e6:>8.2f}  {where}")


def _short_path(filename: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# -- entry point ----------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="about 15 s instead of about 75 s")
    parser.add_argument("--rounds", type=int, help="rounds of round-robin batches")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--profile", metavar="VARIANT", help="cProfile one variant instead")
    parser.add_argument("--profile-seconds", type=float, default=3.0)
    parser.add_argument("--top", type=int, default=30, help="rows per profile listing")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace, loop_name: str) -> int:
    variants, buses = build_variants()
    if args.profile:
        chosen = [v for v in variants if v.key == args.profile]
        if not chosen:
            keys = ", ".join(v.key for v in variants)
            raise SystemExit(f"unknown variant {args.profile!r}; choose one of: {keys}")
        await profile(chosen[0], args.profile_seconds, args.top)
        verify_counts(chosen)
        check_no_pending_tasks()
        return 0
    rounds = args.rounds or (5 if args.quick else 8)
    warmup, batch = (0.08, 0.14) if args.quick else (0.3, 0.55)
    start = time.perf_counter()
    await measure(variants, rounds, warmup, batch)
    elapsed = time.perf_counter() - start
    counts = verify_counts(variants)
    for bus in buses:
        left = await bus.drain(0)
        if left:
            raise AssertionError(f"{len(left)} event(s) still in flight after the run")
    check_no_pending_tasks()
    ok = report(variants, rounds, elapsed, loop_name)
    print(f"verified call counts: {', '.join(f'{k}={v:,}' for k, v in sorted(counts.items()))}")
    return 0 if ok or not args.check else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.loop == "uvloop":  # optional, not a dependency of the project
        uvloop = importlib.import_module("uvloop")
        return int(uvloop.run(amain(args, "uvloop")))
    return asyncio.run(amain(args, "asyncio"))


if __name__ == "__main__":
    sys.exit(main())
