"""Throughput of fastapi_eventbus against plain FastAPI, measured in one process.

Run ``python -m benchmarks.bench_core`` (about a minute) or add ``--quick``
(about ten seconds). Requests are driven by calling each ASGI app directly,
``await app(scope, receive, send)``, with no sockets and no HTTP client, so
that what differs between two rows is only what the application does.

Rows are measured round-robin: every round times one batch of every variant,
in a rotating order, and the table reports the best and the median batch of
each. Ratios are computed from medians, so they compare variants measured in
the same conditions. Every handler, dependency and background task counts its
calls; the counts are checked at the end, so no row can be measuring a no-op.

``--profile VARIANT`` runs one variant under cProfile instead and prints where
the time goes, in microseconds per operation.
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
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
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


# -- reporting ------------------------------------------------------------------

TARGET_EMIT1_RATIO = 0.6
TARGET_PUBLISH_RATE = 50_000.0


def median(v: Variant) -> float:
    return statistics.median(v.rates)


def report(variants: list[Variant], rounds: int, elapsed: float, loop_name: str) -> bool:
    by_key = {v.key: v for v in variants}
    print(
        f"fastapi_eventbus benchmark: {rounds} rounds, round-robin, {loop_name} loop, "
        f"Python {sys.version.split()[0]}, {elapsed:.1f} s"
    )
    header = f"{'variant':<46} {'best':>10} {'median':>10} {'µs/op':>8} {'ratio':>7}  events/s"
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
                f"{v.label:<46} {max(v.rates):>10,.0f} {med:>10,.0f} {1e6 / med:>8.1f} "
                f"{ratio:>7}  {events}"
            )

    print()
    overhead = 1e6 / median(by_key["publish_async"]) - 1e6 / median(by_key["solve_async"])
    per_event = (
        1e6 / median(by_key["emit10"]) - 1e6 / median(by_key["emit1"])
    ) / 9  # marginal cost of one more emitted event in a request
    print(f"bus overhead over the solver, publish w/ 1 async Depends: {overhead:+.1f} µs/event")
    print(f"marginal cost of one more emitted event in a request:     {per_event:.1f} µs/event")

    emit_ratio = median(by_key["emit1"]) / median(by_key["bare"])
    rate = median(by_key["publish_async"])
    ok_ratio = emit_ratio >= TARGET_EMIT1_RATIO
    ok_rate = rate >= TARGET_PUBLISH_RATE
    print()
    print(
        f"target: 3 emit 1 event >= {TARGET_EMIT1_RATIO:.2f}x bare ........ "
        f"{emit_ratio:.2f}x  {'PASS' if ok_ratio else 'FAIL'}"
    )
    print(
        f"target: publish w/ 1 Depends >= {TARGET_PUBLISH_RATE:,.0f} events/s .. "
        f"{rate:,.0f}  {'PASS' if ok_rate else 'FAIL'}"
    )
    return ok_ratio and ok_rate


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
    parser.add_argument("--quick", action="store_true", help="about 10 s instead of about 60 s")
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
