"""Pattern matching at 500 and 10,000 patterns, and memory per pending event.

Run ``python -m benchmarks.bench_dispatch`` (about 2.5 min: it queues 1,000,000 events)
or add ``--quick`` (100,000 events); ``--pending N`` queues N.

1. Patterns (CPU time, `benchmarks._harness`): ``PatternIndex.match`` for names seen
   before and never seen, against a naive ``fnmatch`` loop over 500 patterns;
   ``publish`` to a bus with 500 handlers against one with only the handlers the names
   match; ``publish`` of never-seen names to a bus with 10,000 patterns against a bus
   with 1 (each name matches one handler on both): the difference is the lookup.
   Whether the match cache stays bounded: traced memory per never-seen name.
2. Memory (tracemalloc, after a full collection at each sample): one request emits
   N events (``max_pending_events=None, max_batch_events=None``), which stay queued
   until the response is sent, sampled at 1, 10, 50 and 100 % (no handler may have run
   yet), then released; a 10,000-event warm-up request shows where the bytes go. Then,
   with the default caps, ``publish`` calls blocked in a handler up to
   ``max_pending_events``: one more must raise ``CapacityError``; they are released
   twice, and what stays must not grow.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import gc
import inspect
import itertools
import linecache
import logging
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI

from benchmarks import _harness as h
from benchmarks._harness import CALLS, Check, Op, Variant
from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus._patterns import PatternIndex
from fastapi_eventbus.exceptions import CapacityError

PAYLOAD = {"id": 1, "name": "cat"}
FLAT_SPREAD = 0.05
"""Bytes per queued event may vary by this fraction across the samples."""
RELEASED_SHARE = 0.01
"""What may stay after a release, as a share of the peak."""
CACHE_GROWTH_LIMIT = 16.0
"""Bytes per never-seen name; an unbounded cache costs about 150."""

# -- 1. patterns ----------------------------------------------------------------------------


def pattern_mix(n: int) -> list[str]:
    """*n* patterns: 40 % exact names, 30 % ``svc{i}.*``, 20 % classes, ``?``, ``*.deleted``."""
    a, b, c = n * 2 // 5, n * 7 // 10, n * 9 // 10
    mix = [f"svc{i}.created" for i in range(a)]
    mix += [f"svc{i}.*" for i in range(a, b)]
    mix += [f"svc{i}.v[0-9].updated" for i in range(b, c)]
    mix += [f"svc{i}.archiv?d" for i in range(c, n - 1)]
    return [*mix, "*.deleted"]


def hit_names() -> list[str]:
    """122 names matching one or two of the 500 patterns, looked up again and again."""
    names = [f"svc{i}.created" for i in range(0, 350, 7)]
    names += [f"svc{i}.deleted" for i in range(0, 350, 7)]
    names += [f"svc{i}.v{i % 10}.updated" for i in range(350, 450, 7)]
    return names + [f"svc{i}.archived" for i in range(450, 499, 7)]


Names = Callable[[], list[str]]


def fresh_names(services: range) -> Names:
    """Each call: names never seen before, ``svc{i}.item{n}.deleted``, one per service."""
    counter = itertools.count()

    def names() -> list[str]:
        n = next(counter)
        return [f"svc{i}.item{n}.deleted" for i in services]

    return names


def naive_match(patterns: Sequence[str], name: str) -> list[str]:
    return [p for p in patterns if fnmatch.fnmatchcase(name, p)]


def lookup_op(match: Callable[[str], Sequence[object]], names: Names, key: str) -> Op:
    async def op() -> None:
        found = 0
        for name in names():
            found += len(match(name))
        CALLS[key] += found

    return op


def counting_handler(key: str) -> Callable[[Event], Awaitable[None]]:
    async def handler(event: Event) -> None:
        CALLS[key] += 1

    handler.__qualname__ = f"handler[{key}]"
    return handler


@dataclass
class PatternBus:
    prefix: str
    patterns: list[str]
    bus: EventBus

    @classmethod
    def of(cls, prefix: str, patterns: list[str]) -> PatternBus:
        """A bus with one counting handler per pattern."""
        app, bus = FastAPI(), EventBus()
        bus.install(app)
        for pattern in patterns:
            bus.on(pattern)(counting_handler(f"{prefix}:{pattern}"))
        return cls(prefix, patterns, bus)

    def row(self, key: str, label: str, names: Names, base: str = "") -> Variant:
        """Publish each of ``names()``; every call reaches the same handlers as often."""
        sample, bus = names(), self.bus
        calls = Counter(f"{self.prefix}:{p}" for n in sample for p in naive_match(self.patterns, n))

        async def op() -> None:
            for name in names():
                await bus.publish(name, PAYLOAD)

        section = "Patterns: publish, each name matching 1 or 2 handlers"
        return Variant(key, label, op, "event", len(sample), calls, base or (), section)


def pattern_rows() -> tuple[list[Variant], list[EventBus]]:
    patterns, hits = pattern_mix(500), hit_names()
    index: PatternIndex[str] = PatternIndex()
    for pattern in patterns:
        index.add([pattern], pattern)
    misses = range(0, 500, 25)

    def naive(name: str) -> list[str]:
        return naive_match(patterns, name)

    for name in hits + fresh_names(misses)():
        if list(index.match(name)) != naive(name) or not 1 <= len(naive(name)) <= 2:
            raise AssertionError(f"{name!r}: index {index.match(name)}, fnmatch {naive(name)}")
    rows = []
    lookups: list[tuple[str, str, Callable[[str], Sequence[object]], Names]] = [
        ("match_hit", "PatternIndex.match, names seen before", index.match, lambda: hits),
        ("naive_hit", "  naive fnmatch loop, same names", naive, lambda: hits),
        ("match_miss", "PatternIndex.match, never-seen names", index.match, fresh_names(misses)),
        ("naive_miss", "  naive fnmatch loop, never-seen names", naive, fresh_names(misses)),
    ]
    for key, label, match, names in lookups:
        sample = names()
        found = {f"patterns.{key}": sum(len(naive(n)) for n in sample)}
        op = lookup_op(match, names, f"patterns.{key}")
        base = key.replace("match", "naive") if match is not naive else ()
        section = "Patterns: lookups among 500 patterns"
        rows.append(Variant(key, label, op, "name", len(sample), found, base, section))
    matched = [p for p in patterns if any(p in naive_match(patterns, n) for n in hits)]
    big, few = PatternBus.of("p500", patterns), PatternBus.of("few", matched)
    huge, one = PatternBus.of("p10k", pattern_mix(10_000)), PatternBus.of("one", ["*.deleted"])
    seen, unseen = (lambda: hits), fresh_names(misses)
    tenk = fresh_names(range(0, 4000, 400))  # names matching only "*.deleted", on both buses
    rows += [
        big.row("publish_500", "500 handlers, names seen before", seen, "publish_few"),
        few.row("publish_few", f"  only the {len(matched)} handlers matched", seen),
        big.row("publish_500_miss", "500 handlers, never-seen names", unseen, "publish_500"),
        huge.row("publish_10k_miss", "10,000 patterns, never-seen names", tenk, "publish_1_miss"),
        one.row("publish_1_miss", "  1 pattern (*.deleted), never-seen names", tenk),
    ]
    return rows, [b.bus for b in (big, few, huge, one)]


async def cache_growth(names: int) -> float:
    """Traced bytes per never-seen name published (a least-squares slope over 10 samples)."""
    patterns = ["svc1.created", "svc2.*", "svc3.v[0-9].updated", "*.deleted"]
    bus = PatternBus.of("growth", patterns).bus
    before = CALLS["growth:*.deleted"]
    xs: list[float] = []
    ys: list[float] = []
    tracemalloc.start()
    try:
        for n in range(names):
            await bus.publish(f"svc{n % 4}.item{n}.deleted", PAYLOAD)
            if (n + 1) % (names // 10) == 0:
                xs.append(n + 1)
                ys.append(traced())
    finally:
        tracemalloc.stop()
    if CALLS["growth:*.deleted"] - before != names:
        raise AssertionError("a never-seen name was not handled")
    return statistics.linear_regression(xs[1:], ys[1:]).slope


# -- 2. memory ------------------------------------------------------------------------------


def traced() -> int:
    """Bytes tracemalloc sees allocated now, after a full collection."""
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def settle() -> int:
    """`traced`, once the loop has dropped what the last step still referenced."""
    for _ in range(3):
        await asyncio.sleep(0)
    return traced()


def remember_sources() -> None:
    """Read the package's sources into linecache now: they may be edited during the run,
    and allocation sites must show the lines that ran (read before tracemalloc starts)."""
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if name.split(".")[0] == "fastapi_eventbus" and path.endswith(".py"):
            linecache.getline(path, 1)


Site = tuple[float, str, int]
"""Bytes per event (or call), file, line."""


def top_sites(before: tracemalloc.Snapshot, count: int, top: int = 8) -> list[Site]:
    """The allocation sites that grew most since *before*, per one of *count* events."""
    stats = tracemalloc.take_snapshot().compare_to(before, "lineno")[:top]
    return [
        (s.size_diff / count, s.traceback[0].filename, s.traceback[0].lineno)
        for s in stats
        if s.size_diff > 0
    ]


def print_sites(title: str, sites: list[Site], unit: str = "bytes/event") -> None:
    print(f"  {title}:\n  {unit:>11}  site")
    for size_, filename, lineno in sites:
        where = f"{h.short_path(filename)}:{lineno}"
        print(f"  {size_:>11,.0f}  {where:<34} {linecache.getline(filename, lineno).strip()[:64]}")


@dataclass
class Queued:
    """One request emitting *events* events, sampling traced memory at *checkpoints*."""

    events: int = 0
    checkpoints: frozenset[int] = frozenset()
    baseline: int = 0
    handled: int = 0
    samples: list[tuple[int, int]] = field(default_factory=list)
    """(pending events, traced bytes over *baseline*)."""
    clock: list[float] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    """Where the first request's events were allocated."""

    def sample(self, pending: int) -> None:
        if CALLS["memory:queued"] != self.handled:
            raise AssertionError("a queued event was handled before the response")
        self.samples.append((pending, traced() - self.baseline))
        self.clock.append(time.perf_counter())

    def app(self) -> FastAPI:
        app, bus = FastAPI(), EventBus(max_pending_events=None, max_batch_events=None)
        bus.install(app)
        bus.on("memory.queued")(counting_handler("memory:queued"))

        @app.post("/")
        async def endpoint(bus: EventBus = Depends(get_bus)) -> dict[str, bool]:
            self.sample(0)
            before = None if self.sites else tracemalloc.take_snapshot()
            for i in range(self.events):
                bus.emit("memory.queued", {"id": i})
                if i + 1 in self.checkpoints:
                    self.sample(i + 1)
            if before is not None:
                self.sites = top_sites(before, self.events)
            return {"ok": True}

        return app

    async def request(self, op: Op) -> float:
        start = time.perf_counter()
        await op()
        self.handled += self.events
        if CALLS["memory:queued"] != self.handled:
            raise AssertionError(f"{CALLS['memory:queued']} queued events handled")
        return time.perf_counter() - start


async def queued_memory(total: int) -> tuple[Queued, int, float]:
    """Events queued in one request's batch, sampled up to *total*: the plan, what stayed
    after they were handled, the request's seconds."""
    plan = Queued(events=10_000)  # a warm-up request, that shows where the bytes go
    op = h.asgi_op(plan.app())
    tracemalloc.start()
    try:
        await plan.request(op)
        plan.samples, plan.clock, plan.events = [], [], total
        plan.checkpoints = frozenset({total // 100, total // 10, total // 2, total})
        plan.baseline = await settle()
        seconds = await plan.request(op)
        retained = await settle() - plan.baseline
    finally:
        tracemalloc.stop()
    return plan, retained, seconds


def default_cap(name: str) -> int:
    """The default of the `EventBus` argument *name*."""
    default = inspect.signature(EventBus).parameters[name].default
    if not isinstance(default, int):
        raise AssertionError(f"{name} has no int default: {default!r}")
    return default


@dataclass
class Blocked:
    cap: int
    samples: list[tuple[int, int]]
    """(publish calls blocked, traced bytes over the baseline), first cycle."""
    refused: bool
    retained: list[int]
    """Traced bytes over the baseline after each release."""
    sites: list[Site]
    kept: list[Site]


async def blocked_memory(cycles: int = 2) -> Blocked:
    """Publish calls blocked in a handler, up to the default cap, released *cycles* times."""
    cap = default_cap("max_pending_events")
    app, bus = FastAPI(), EventBus()
    bus.install(app)
    gates: list[asyncio.Event] = []

    @bus.on("memory.blocked")
    async def blocked(event: Event) -> None:
        await gates[-1].wait()
        CALLS["memory:blocked"] += 1

    report = Blocked(cap, [], True, [], [], [])
    logger = logging.getLogger("fastapi_eventbus")
    tracemalloc.start()
    try:
        start = tracemalloc.take_snapshot()  # alive to the end: counted alike in every cycle
        baseline = await settle()
        for _ in range(cycles):
            gates.append(asyncio.Event())
            tasks: list[asyncio.Task[Event]] = []
            before = tracemalloc.take_snapshot() if not report.sites else None
            for step in (cap // 5, cap // 2, cap):
                while len(tasks) < step:
                    tasks.append(asyncio.create_task(bus.publish("memory.blocked", PAYLOAD)))
                await asyncio.sleep(0)  # each new task runs up to the handler's wait
                if before is not None:
                    report.samples.append((step, traced() - baseline))
                    report.sites = report.sites or top_sites(before, step)
            logger.disabled = True  # the refusal's warning is expected
            try:
                await bus.publish("memory.blocked", PAYLOAD)
                report.refused = False
            except CapacityError:
                pass
            finally:
                logger.disabled = False
            handled = CALLS["memory:blocked"]
            gates[-1].set()
            await asyncio.gather(*tasks)
            del tasks  # their results, the events, must not count as retained
            if CALLS["memory:blocked"] != handled + cap:
                raise AssertionError(f"{CALLS['memory:blocked'] - handled} publishes handled")
            report.retained.append(await settle() - baseline)
            report.kept = report.kept or top_sites(start, 1, top=3)
    finally:
        tracemalloc.stop()
    return report


# -- reporting ------------------------------------------------------------------------------


def size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def report_queued(q: Queued, retained: int, seconds: float) -> tuple[float, list[Check]]:
    """Print the queued-memory table; bytes per event at the most pending, and the checks."""
    print('\nMemory: events queued in one request\'s batch, not handled yet (payload {"id": i})')
    print(" pending events  traced over baseline  bytes/event  marginal\n" + "-" * 60)
    previous = (0, 0)
    for n, traced_bytes in q.samples[1:]:
        marginal = (traced_bytes - previous[1]) / (n - previous[0])
        print(f"{n:>15,} {size(traced_bytes):>21} {traced_bytes / n:>12,.0f} {marginal:>9,.0f}")
        previous = (n, traced_bytes)
    per_event = [b / n for n, b in q.samples if n]
    total, peak = q.samples[-1]
    emitting = q.clock[-1] - q.clock[0]
    print(f"  emitting {total:,} events: {emitting:.1f} s; with their handling {seconds:.1f} s")
    print(f"  after all were handled: {size(retained)} over the baseline before the request")
    print_sites("where one queued event's bytes go (10,000-event warm-up request)", q.sites)
    spread = max(per_event) / min(per_event) - 1
    flat = f"bytes per queued event flat (spread <= {FLAT_SPREAD:.0%})"
    released = f"queued events released (<= {RELEASED_SHARE:.0%} of peak left)"
    return per_event[-1], [
        (flat, f"{spread:.2%}", spread <= FLAT_SPREAD),
        (released, size(retained), retained <= RELEASED_SHARE * peak),
    ]


def report_blocked(b: Blocked, per_event: float) -> list[Check]:
    print(f"\nMemory: publish calls blocked in a handler (max_pending_events={b.cap:,})")
    print(" blocked publishes  traced over baseline  bytes/publish\n" + "-" * 55)
    for n, traced_bytes in b.samples:
        print(f"{n:>18,} {size(traced_bytes):>21} {traced_bytes / n:>14,.0f}")
    growth = b.retained[-1] - b.retained[0]
    print(f"  after each release: {', '.join(size(r) for r in b.retained)} over the baseline")
    where = f"where one blocked publish's bytes go (first {b.samples[0][0]:,})"
    print_sites(where, b.sites, "bytes/call")
    print_sites("what stays after the first release", b.kept, "bytes")
    batch = default_cap("max_batch_events")
    per_publish = b.samples[-1][1] / b.samples[-1][0]
    print(
        f"\nDefault caps bound pending memory to: queued {b.cap:,} x {per_event:,.0f} B = "
        f"{size(b.cap * per_event)} (one request: {batch:,} x: {size(batch * per_event)}); "
        f"blocked publishes {size(b.cap * per_publish)}"
    )
    no_growth = f"no growth between release cycles (<= {RELEASED_SHARE:.0%} of peak)"
    return [
        ("publish refused at the default max_pending_events", "", b.refused),
        (no_growth, size(growth), abs(growth) <= RELEASED_SHARE * b.samples[-1][1]),
    ]


async def amain(args: argparse.Namespace) -> bool:
    rows, buses = pattern_rows()
    counts = await h.run_variants(args, rows, buses)
    if counts is None:
        return True
    started = time.perf_counter()
    growth = await cache_growth(50_000 if args.quick else 200_000)
    queued = await queued_memory(args.pending or (100_000 if args.quick else 1_000_000))
    blocked = await blocked_memory()
    h.header("bench_dispatch", args.rounds, extra=f"; memory {time.perf_counter() - started:.0f} s")
    h.tables(rows)
    by_key = {v.key: v for v in rows}
    lookup = (by_key["publish_10k_miss"].median - by_key["publish_1_miss"].median) * 1e6
    per_event, checks = report_queued(*queued)
    checks += report_blocked(blocked, per_event)
    bounded = f"match cache bounded (<= {CACHE_GROWTH_LIMIT:.0f} B per never-seen name)"
    checks.append((bounded, f"{growth:.1f} B", growth <= CACHE_GROWTH_LIMIT))
    ok = h.verdict({"patterns_10k": lookup, "pending_bytes": per_event}, checks)
    print(h.counts_line(counts))
    return ok


def main(argv: list[str] | None = None) -> int:
    remember_sources()

    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--pending", type=int, help="events queued in the memory run")

    return h.main(amain, __doc__, argv, extra)


if __name__ == "__main__":
    raise SystemExit(main())
