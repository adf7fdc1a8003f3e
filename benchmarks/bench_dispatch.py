"""Dispatch throughput, pattern matching at scale, and memory per pending event.

Run ``python -m benchmarks.bench_dispatch`` (about two and a half minutes: it
queues 1,000,000 events) or add ``--quick`` (about 45 s, 100,000 events). ``--check``
exits 1 if a target or a check fails; ``--profile VARIANT`` runs one throughput
row under cProfile instead.

1. ``await bus.publish()`` to a handler with 0, 1 and 3 dependencies (one of
   them a ``yield`` dependency), each against FastAPI's ``solve_dependencies``
   called directly for the same signature (bench_core's ``solver_op``: fresh
   exit stacks per call, so the ``yield`` dependency is entered and closed).
2. 500 registered patterns: ``PatternIndex.match`` for cached and never-seen
   names against a naive ``fnmatch`` loop over the patterns, ``publish`` to a bus
   with 500 handlers, and whether the match cache stays bounded.
3. tracemalloc: bytes per event queued in one request's batch up to 1,000,000
   events, then released; ``publish`` calls blocked in a handler up to the
   default ``max_pending_events`` cap, released twice.

Throughput rows use bench_core's harness (round-robin batches, medians) and its
``CALLS`` counter: every handler, dependency and lookup row counts what it did,
and the run fails if a count is off.
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
import re
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import fastapi
from fastapi import Depends, FastAPI
from starlette.types import Message

from benchmarks.bench_core import (
    CALLS,
    Op,
    Variant,
    check_responses,
    http_op,
    measure,
    median,
    profile,
    solver_op,
    verify_counts,
)
from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus import _patterns as patterns_module
from fastapi_eventbus._patterns import PatternIndex
from fastapi_eventbus.exceptions import CapacityError

PAYLOAD = {"id": 1, "name": "cat"}
TARGET_PUBLISH_RATE = 100_000.0
TARGET_SOLVER_RATIO = 2.0
FLAT_SPREAD = 0.05
"""Bytes per pending event may vary by this fraction across sample points."""
RELEASED_SHARE = 0.01
"""What stays after releasing pending events, as a share of the peak."""
CACHE_GROWTH_LIMIT = 16.0
"""Bytes per never-seen name; an unbounded cache costs about 150."""

# -- part 1: handlers and their dependencies ----------------------------------------


async def one_value() -> int:
    CALLS["dispatch.dep.value"] += 1
    return 1


async def config_value() -> int:
    CALLS["dispatch.dep.config"] += 1
    return 2


async def current_user() -> str:
    CALLS["dispatch.dep.user"] += 1
    return "cat"


class Session:
    """What the ``yield`` dependency hands out: open until the dependency's exit."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = True


async def open_session() -> AsyncIterator[Session]:
    """A ``yield`` dependency (async generator): entered before the handler, closed after."""
    CALLS["dispatch.dep.session_open"] += 1
    session = Session()
    try:
        yield session
    finally:
        session.open = False
        CALLS["dispatch.dep.session_close"] += 1


Value = Annotated[int, Depends(one_value)]
Config = Annotated[int, Depends(config_value)]


async def no_deps(event: Event) -> None:
    CALLS["dispatch.handler.0"] += 1


async def one_dep(event: Event, value: Value) -> None:
    CALLS["dispatch.handler.1"] += value


async def three_deps_yield(
    event: Event, value: Value, config: Config, session: Annotated[Session, Depends(open_session)]
) -> None:
    if value == 1 and config == 2 and session.open:  # the session is closed only afterwards
        CALLS["dispatch.handler.3y"] += 1


async def three_deps(
    event: Event, value: Value, config: Config, user: Annotated[str, Depends(current_user)]
) -> None:
    if value == 1 and config == 2 and user == "cat":
        CALLS["dispatch.handler.3"] += 1


def _calls(*keys: str) -> dict[str, int]:
    return {f"dispatch.{key}": 1 for key in keys}


DEP_CALLS = {
    "0": _calls("handler.0"),
    "1": _calls("handler.1", "dep.value"),
    "3y": _calls("handler.3y", "dep.value", "dep.config", "dep.session_open", "dep.session_close"),
    "3": _calls("handler.3", "dep.value", "dep.config", "dep.user"),
}
"""``CALLS`` keys each handler call adds to, by handler."""

HANDLERS: list[tuple[str, str, Callable[..., Awaitable[None]]]] = [
    ("0", "publish, handler w/ 0 Depends", no_deps),
    ("1", "publish, handler w/ 1 async Depends", one_dep),
    ("3y", "publish, 3 Depends, one a yield (async gen)", three_deps_yield),
    ("3", "(context) publish, 3 async Depends, no yield", three_deps),
]


def publish_op(bus: EventBus, name: str) -> Op:
    async def op() -> None:
        await bus.publish(name, PAYLOAD)

    return op


def dispatch_variants() -> tuple[list[Variant], EventBus]:
    """For each handler: publish to it, and the solver baseline for the same signature."""
    app, bus = FastAPI(), EventBus()
    bus.install(app)
    variants: list[Variant] = []
    for key, label, handler in HANDLERS:
        bus.on(f"dispatch.{key}")(handler)
        variants += [
            Variant(
                f"publish_{key}",
                label,
                publish_op(bus, f"dispatch.{key}"),
                "events/s",
                events_per_op=1,
                expected=DEP_CALLS[key],
                baseline=f"solve_{key}",
            ),
            Variant(
                f"solve_{key}",
                "  solve_dependencies + call, same handler",
                solver_op(handler, app),
                "events/s",
                events_per_op=1,
                expected=DEP_CALLS[key],
            ),
        ]
    return variants, bus


# -- part 2: 500 patterns -------------------------------------------------------------

MISS_SERVICES = tuple(range(0, 500, 25))
"""The services of the never-seen names, ``svc{i}.item{n}.deleted``: 20 names per operation."""
ROTATION_CHUNK = 100


def pattern_mix() -> list[str]:
    """500 patterns: exact names, prefix wildcards, character classes, ``?``, ``*.deleted``."""
    mix = [f"svc{i}.created" for i in range(200)]
    mix += [f"svc{i}.*" for i in range(200, 350)]
    mix += [f"svc{i}.v[0-9].updated" for i in range(350, 450)]
    mix += [f"svc{i}.archiv?d" for i in range(450, 499)]
    mix.append("*.deleted")
    return mix


def hit_names() -> list[str]:
    """Names each matching one or two of the patterns (the same few, looked up again)."""
    names = [f"svc{i}.created" for i in range(0, 350, 7)]
    names += [f"svc{i}.deleted" for i in range(0, 350, 7)]
    names += [f"svc{i}.v{i % 10}.updated" for i in range(350, 450, 7)]
    names += [f"svc{i}.archived" for i in range(450, 499, 7)]
    return names


def rotation_names() -> list[str]:
    """5,000 distinct names, more than the match cache holds, in chunks that match alike.

    Chunk *k* of 100 names has the services ``i = k mod 5``: 30 of them in 200-349,
    so every chunk makes 130 matches.
    """
    return [
        f"svc{i}.r{j}.deleted"
        for j in range(10)
        for start in range(5)
        for i in range(start, 500, 5)
    ]


def naive_match(patterns: Sequence[str], name: str) -> list[str]:
    return [p for p in patterns if fnmatch.fnmatchcase(name, p)]


def fresh_names() -> Callable[[], list[str]]:
    """Each call: 20 names never seen before, one per service of `MISS_SERVICES`."""
    counter = itertools.count()

    def names() -> list[str]:
        n = next(counter)
        return [f"svc{i}.item{n}.deleted" for i in MISS_SERVICES]

    return names


def rotating(names: list[str], size: int) -> Callable[[], list[str]]:
    """Each call: the next *size* names of *names*, round and round."""
    chunks = itertools.cycle([names[k : k + size] for k in range(0, len(names), size)])
    return lambda: next(chunks)


def lookup_op(
    match: Callable[[str], Sequence[object]], names: Callable[[], list[str]], key: str
) -> Op:
    async def op() -> None:
        found = 0
        for name in names():
            found += len(match(name))
        CALLS[key] += found

    return op


def counting_handler(prefix: str, pattern: str) -> Callable[[Event], Awaitable[None]]:
    key = f"{prefix}:{pattern}"

    async def handler(event: Event) -> None:
        CALLS[key] += 1

    handler.__qualname__ = f"handler[{key}]"
    return handler


def pattern_bus(prefix: str, patterns: Sequence[str]) -> EventBus:
    """A bus with one counting handler per pattern."""
    app, bus = FastAPI(), EventBus()
    bus.install(app)
    for pattern in patterns:
        bus.on(pattern)(counting_handler(prefix, pattern))
    return bus


def publish_names_op(bus: EventBus, names: Callable[[], list[str]]) -> Op:
    async def op() -> None:
        for name in names():
            await bus.publish(name, PAYLOAD)

    return op


def expected_handlers(prefix: str, patterns: Sequence[str], names: list[str]) -> dict[str, int]:
    calls: Counter[str] = Counter()
    for name in names:
        calls.update(f"{prefix}:{p}" for p in naive_match(patterns, name))
    return dict(calls)


def check_index(index: PatternIndex[str], patterns: list[str], names: list[str]) -> None:
    """The index finds what fnmatch finds, and every name matches one or two patterns."""
    for name in names:
        ours, naive = list(index.match(name)), naive_match(patterns, name)
        if ours != naive or not 1 <= len(ours) <= 2:
            raise AssertionError(f"{name!r}: index {ours}, fnmatch {naive} (want 1-2 matches)")


@dataclass
class PatternSetup:
    variants: list[Variant]
    index: PatternIndex[str]
    buses: list[EventBus]


Names = Callable[[], list[str]]
Match = Callable[[str], Sequence[object]]


def lookup_variants(patterns: list[str], index: PatternIndex[str]) -> list[Variant]:
    """Lookups by the index and by the naive loop; each row counts the matches it found."""
    hits = hit_names()

    def naive(name: str) -> list[str]:
        return naive_match(patterns, name)

    ours, fresh = index.match, fresh_names()
    rotation = rotating(rotation_names(), ROTATION_CHUNK)
    rows: list[tuple[str, str, Match, Names, str | None]] = [
        ("match_hit", "PatternIndex.match, cached names", ours, lambda: hits, "naive_hit"),
        ("naive_hit", "  naive fnmatch loop, same names", naive, lambda: hits, None),
        ("match_miss", "PatternIndex.match, never-seen names", ours, fresh, "naive_miss"),
        ("naive_miss", "  naive fnmatch loop, never-seen names", naive, fresh_names(), None),
        ("match_rotate", "(context) match, 5,000 names in rotation", ours, rotation, "naive_miss"),
    ]
    variants = []
    for key, label, match, names, base in rows:
        sample = names()  # every call of *names* makes as many matches
        found = {f"patterns.{key}": sum(len(naive(name)) for name in sample)}
        op = lookup_op(match, names, f"patterns.{key}")
        variants.append(Variant(key, label, op, "lookups/s", len(sample), found, baseline=base))
    return variants


def publish_variant(
    key: str, label: str, bus: EventBus, handlers: tuple[str, list[str]], names: Names
) -> Variant:
    """Publish each of ``names()``; *handlers* is the bus's (counter prefix, patterns)."""
    sample = names()  # every call of *names* reaches the same handlers as often
    expected = expected_handlers(*handlers, sample)
    return Variant(key, label, publish_names_op(bus, names), "events/s", len(sample), expected)


def pattern_variants() -> PatternSetup:
    patterns, hits = pattern_mix(), hit_names()
    index: PatternIndex[str] = PatternIndex()
    for pattern in patterns:
        index.add([pattern], pattern)
    check_index(index, patterns, hits + fresh_names()() + rotation_names())
    matched = [p for p in patterns if any(p in naive_match(patterns, n) for n in hits)]
    big, few = pattern_bus("p500", patterns), pattern_bus("few", matched)
    all_500, only = ("p500", patterns), ("few", matched)

    def cached() -> list[str]:
        return hits

    on_500 = publish_variant(
        "publish_500", "publish, 500 handlers, cached names", big, all_500, cached
    )
    label = f"  publish, only the {len(matched)} handlers matched"
    on_few = publish_variant("publish_few", label, few, only, cached)
    label = "publish, 500 handlers, never-seen names"
    unseen = publish_variant("publish_500_miss", label, big, all_500, fresh_names())
    on_500.baseline, unseen.baseline = on_few.key, on_500.key
    variants = [*lookup_variants(patterns, index), on_500, on_few, unseen]
    return PatternSetup(variants, index, [big, few])


# -- part 3: memory -------------------------------------------------------------------


def traced() -> int:
    """Bytes tracemalloc sees allocated now, after a full collection."""
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def settle() -> int:
    """`traced`, after letting the loop drop what the last step still referenced."""
    for _ in range(3):
        await asyncio.sleep(0)
    return traced()


SOURCES: dict[str, list[str]] = {}
"""Source lines of the fastapi_eventbus modules as imported (`remember_sources`)."""


def remember_sources() -> None:
    """Keep the source of the imported fastapi_eventbus modules: the files may be edited while
    this runs, and allocation sites must name the lines that ran."""
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.split(".")[0] == "fastapi_eventbus" and path and path.endswith(".py"):
            with open(path, encoding="utf-8") as source:
                SOURCES[path] = source.read().splitlines()


def _line(filename: str, lineno: int) -> str:
    lines = SOURCES.get(filename)
    if lines is None:
        return linecache.getline(filename, lineno)
    return lines[lineno - 1] if 0 < lineno <= len(lines) else ""


@dataclass
class Site:
    """An allocation site; its source is looked up when printed, once tracemalloc has stopped
    (linecache keeps what it reads, which would count as retained memory)."""

    bytes_per_event: float
    filename: str
    lineno: int

    def describe(self) -> tuple[str, str]:
        """``file:line function`` and the line's source text."""
        where = f"{_short(self.filename)}:{self.lineno} {_function_at(self.filename, self.lineno)}"
        return where, _line(self.filename, self.lineno).strip()


def top_sites(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, count: int, top: int = 8
) -> list[Site]:
    """The allocation sites that grew most between the snapshots, per one of *count* events."""
    stats = after.compare_to(before, "lineno")[:top]
    return [
        Site(stat.size_diff / count, stat.traceback[0].filename, stat.traceback[0].lineno)
        for stat in stats
        if stat.size_diff > 0
    ]


_PREFIX = re.compile(r".*?(site-packages/|/work/main/|lib/python3\.\d+/)")
_DEF = re.compile(r"\s*(?:async\s+)?def\s+(\w+)")


def _short(filename: str) -> str:
    return _PREFIX.sub("", filename, count=1)


def _function_at(filename: str, lineno: int) -> str:
    """The name of the function whose body holds *lineno* (the nearest ``def`` above it)."""
    for number in range(lineno, 0, -1):
        found = _DEF.match(_line(filename, number))
        if found:
            return found.group(1)
    return "<module>"


@dataclass
class Plan:
    """What the next request of `queued_app` emits, and where it samples memory."""

    events: int = 0
    checkpoints: frozenset[int] = frozenset()
    baseline: int = 0
    handled: int = 0
    """Queued events handled before this request: none may be handled during it."""
    samples: list[tuple[int, int, float]] = field(default_factory=list)
    """(pending events, traced bytes over *baseline*, `time.perf_counter`)."""
    snapshots: list[tracemalloc.Snapshot] | None = None
    """If a list: a snapshot before and after the emits (where the bytes go)."""

    def sample(self, pending: int) -> None:
        if CALLS["memory:queued"] != self.handled:
            raise AssertionError("a queued event was handled before the response")
        self.samples.append((pending, traced() - self.baseline, time.perf_counter()))

    def snapshot(self) -> None:
        if self.snapshots is not None:
            self.snapshots.append(tracemalloc.take_snapshot())


def queued_app(plan: Plan) -> FastAPI:
    """One route emitting ``plan.events`` events: they stay queued until the response is sent."""
    app = FastAPI()
    bus = EventBus(max_pending_events=None, max_batch_events=None)
    bus.install(app)
    bus.on("memory.queued")(counting_handler("memory", "queued"))

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> dict[str, bool]:
        plan.sample(0)
        plan.snapshot()
        for i in range(plan.events):
            bus.emit("memory.queued", {"id": i})
            if i + 1 in plan.checkpoints:
                plan.sample(i + 1)
        plan.snapshot()
        return {"ok": True}

    return app


async def queued_request(plan: Plan, op: Op, sent: list[Message]) -> float:
    """Send one request to the app of *plan*; the seconds it took, handlers included."""
    start = time.perf_counter()
    await op()
    elapsed = time.perf_counter() - start
    check_responses(sent, 1)
    plan.handled += plan.events
    if CALLS["memory:queued"] != plan.handled:
        raise AssertionError(f"{CALLS['memory:queued']} queued events handled, want {plan.handled}")
    return elapsed


@dataclass
class QueuedReport:
    samples: list[tuple[int, int, float]]
    retained: int
    """Traced bytes after the request, over those before it."""
    sites: list[Site]
    seconds: float

    def per_event(self) -> list[float]:
        return [size / n for n, size, _ in self.samples if n]

    def emit_seconds(self) -> float:
        return self.samples[-1][2] - self.samples[0][2]


async def queued_memory(total: int) -> QueuedReport:
    """Events queued in one request's batch (emitted, not flushed), sampled up to *total*."""
    plan, sent = Plan(), list[Message]()
    op = http_op(queued_app(plan), sent)
    tracemalloc.start()
    try:
        plan.events, plan.snapshots = 10_000, []  # a warm-up request, that shows where bytes go
        await queued_request(plan, op, sent)
        before, after = plan.snapshots
        sites = top_sites(before, after, plan.events)
        del before, after
        plan.snapshots, plan.samples = None, []
        plan.events = total
        plan.checkpoints = frozenset({total // 100, total // 10, total // 2, total})
        plan.baseline = await settle()
        seconds = await queued_request(plan, op, sent)
        retained = await settle() - plan.baseline
    finally:
        tracemalloc.stop()
    return QueuedReport(plan.samples, retained, sites, seconds)


@dataclass
class BlockedReport:
    cap: int
    samples: list[tuple[int, int]]
    """(publish calls blocked, traced bytes over the baseline), first cycle."""
    refused: bool
    """Whether one more publish was refused (`CapacityError`) at the cap, in every cycle."""
    retained: list[int]
    """Traced bytes over the baseline after each cycle's release."""
    sites: list[Site]
    kept: list[Site]
    """Where the bytes that stay after the first release were allocated."""


def default_cap(name: str) -> int:
    """The default of the `EventBus` argument *name* (``max_pending_events``...)."""
    default = inspect.signature(EventBus).parameters[name].default
    if not isinstance(default, int):
        raise AssertionError(f"{name} has no int default: {default!r}")
    return default


async def fill(
    bus: EventBus, cap: int, baseline: int, sites: list[Site] | None
) -> tuple[list[asyncio.Task[Event]], list[tuple[int, int]]]:
    """Start *cap* publish calls that block in the handler; sample traced memory as they do."""
    samples: list[tuple[int, int]] = []
    tasks: list[asyncio.Task[Event]] = []
    before = tracemalloc.take_snapshot() if sites is not None else None
    for step in sorted({cap // 5, cap // 2, cap}):
        while len(tasks) < step:
            tasks.append(asyncio.create_task(bus.publish("memory.blocked", PAYLOAD)))
        await asyncio.sleep(0)  # each new task runs up to the handler's wait
        samples.append((step, traced() - baseline))
        if before is not None and sites is not None:
            sites += top_sites(before, tracemalloc.take_snapshot(), step)
            before = None
    if any(task.done() for task in tasks):
        raise AssertionError("a blocked publish finished before its gate opened")
    return tasks, samples


async def refused_at_cap(bus: EventBus) -> bool:
    """Whether one more publish is refused (its warning, expected, is not printed)."""
    logger = logging.getLogger("fastapi_eventbus")
    quiet = logging.Filter("none")  # passes only records of a logger named "none"
    logger.addFilter(quiet)
    try:
        await bus.publish("memory.blocked", PAYLOAD)
    except CapacityError:
        return True
    finally:
        logger.removeFilter(quiet)
    return False


async def blocked_cycle(
    bus: EventBus, gates: list[asyncio.Event], cap: int, baseline: int, sites: list[Site] | None
) -> tuple[list[tuple[int, int]], bool]:
    """Block *cap* publish calls, try one more, then open the gate and wait for them all."""
    gates.append(asyncio.Event())
    handled = CALLS["memory:blocked"]
    tasks, samples = await fill(bus, cap, baseline, sites)
    refused = await refused_at_cap(bus)
    gates[-1].set()
    await asyncio.gather(*tasks)
    if CALLS["memory:blocked"] != handled + cap:
        raise AssertionError(f"{CALLS['memory:blocked'] - handled} blocked publishes handled")
    return samples, refused


async def blocked_memory(cycles: int = 2) -> BlockedReport:
    """Publish calls blocked in a handler, up to the default cap, released *cycles* times."""
    cap = default_cap("max_pending_events")
    app, bus = FastAPI(), EventBus()
    bus.install(app)
    gates: list[asyncio.Event] = []

    @bus.on("memory.blocked")
    async def blocked(event: Event) -> None:
        await gates[-1].wait()
        CALLS["memory:blocked"] += 1

    samples: list[tuple[int, int]] = []
    retained: list[int] = []
    sites: list[Site] = []
    kept: list[Site] = []
    refused = True
    tracemalloc.start()
    try:
        start = tracemalloc.take_snapshot()  # alive to the end: counted alike in every cycle
        baseline = await settle()
        for _ in range(cycles):
            cycle_samples, cycle_refused = await blocked_cycle(
                bus, gates, cap, baseline, None if samples else sites
            )
            samples, refused = samples or cycle_samples, refused and cycle_refused
            retained.append(await settle() - baseline)
            kept = kept or top_sites(start, tracemalloc.take_snapshot(), 1, top=3)
    finally:
        tracemalloc.stop()
    return BlockedReport(cap, samples, refused, retained, sites, kept)


async def cache_growth(names: int) -> float:
    """Traced bytes per never-seen name published (a least-squares slope over 10 samples),
    on a bus with 4 patterns so that *names* misses stay quick."""
    patterns = ["svc1.created", "svc2.*", "svc3.v[0-9].updated", "*.deleted"]
    bus = pattern_bus("growth", patterns)
    handled = {key: CALLS[key] for key in (f"growth:{p}" for p in patterns)}
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
    want = {"growth:*.deleted": names, "growth:svc2.*": len(range(2, names, 4))}
    got = {key: CALLS[key] - handled[key] for key in want}
    if got != want:
        raise AssertionError(f"never-seen names: handled {got}, want {want}")
    return statistics.linear_regression(xs[1:], ys[1:]).slope


def cache_size(index: PatternIndex[Any]) -> int | None:
    """Entries in *index*'s match cache, if this version keeps one as a dict."""
    cache = getattr(index, "_cache", None)
    return len(cache) if isinstance(cache, dict) else None


# -- reporting ----------------------------------------------------------------------


def size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:+,.1f} {unit}".lstrip("+")
    return f"{n:,.0f} B"


def unit_rate(v: Variant) -> float:
    """Median events (or lookups) per second of *v*."""
    return median(v) * v.events_per_op


def rate_table(title: str, variants: list[Variant], by_key: dict[str, Variant]) -> None:
    each = variants[0].unit.removesuffix("s/s").removesuffix("/s")
    print()
    print(title)
    header = f"{'variant':<44} {'best':>11} {'median':>11} {'µs/' + each:>11} {'ratio':>9}"
    print(header)
    print("-" * len(header))
    for v in variants:
        rate = unit_rate(v)
        base = by_key.get(v.baseline) if v.baseline else None
        ratio = f"{rate / unit_rate(base):.2f}x" if base else "-"
        best = max(v.rates) * v.events_per_op
        print(f"{v.label:<44} {best:>11,.0f} {rate:>11,.0f} {1e6 / rate:>11.2f} {ratio:>9}")


def report_throughput(variants: list[Variant], index_cache: int | None) -> None:
    by_key = {v.key: v for v in variants}
    rate_table(
        "Publish (events/s; ratio = publish / solve_dependencies per event, same signature)",
        [by_key[f"{kind}_{key}"] for key, _, _ in HANDLERS for kind in ("publish", "solve")],
        by_key,
    )
    for key, label, _ in HANDLERS:
        extra = 1e6 / unit_rate(by_key[f"publish_{key}"]) - 1e6 / unit_rate(by_key[f"solve_{key}"])
        print(f"  {label.removeprefix('(context) ')}: {extra:+.2f} µs/event over the solver")
    rate_table(
        "500 patterns: lookups (lookups/s; ratio vs the naive fnmatch loop)",
        [v for v in variants if v.unit == "lookups/s"],
        by_key,
    )
    rate_table(
        "500 patterns: publish, each event matching 1-2 handlers (events/s)",
        [v for v in variants if v.key in ("publish_500", "publish_few", "publish_500_miss")],
        by_key,
    )
    limit = getattr(patterns_module, "_CACHE_LIMIT", None)
    print(f"  match cache after the never-seen rows: {index_cache} entries (limit {limit})")


Check = tuple[str, str, bool]
"""What a target or check says, the measured value, and whether it holds."""


def report_queued(q: QueuedReport) -> list[Check]:
    print()
    print('Memory: events queued in one request\'s batch, not handled yet (payload {"id": i})')
    header = (
        f"{'pending events':>15} {'traced over baseline':>21} {'bytes/event':>12} {'marginal':>9}"
    )
    print(header)
    print("-" * len(header))
    previous = (0, 0)
    for n, traced_bytes, _ in q.samples[1:]:
        marginal = (traced_bytes - previous[1]) / (n - previous[0])
        print(f"{n:>15,} {size(traced_bytes):>21} {traced_bytes / n:>12,.0f} {marginal:>9,.0f}")
        previous = (n, traced_bytes)
    per_event = q.per_event()
    spread = max(per_event) / min(per_event) - 1
    total, peak = q.samples[-1][:2]
    print(
        f"  emitting {total:,} events took {q.emit_seconds():.1f} s, the whole request with "
        f"their handling {q.seconds:.1f} s (under tracemalloc)"
    )
    print(
        f"  after release (all {total:,} handled): {size(q.retained)} against the baseline "
        f"before the request ({q.retained / total:+.3f} bytes/event)"
    )
    print_sites("where one queued event's bytes go (10,000-event warm-up request)", q.sites)
    return [
        (
            f"check: bytes per queued event flat (spread <= {FLAT_SPREAD:.0%})",
            f"{spread:.2%}",
            spread <= FLAT_SPREAD,
        ),
        (
            f"check: queued events released (<= {RELEASED_SHARE:.0%} of peak left)",
            size(q.retained),
            q.retained <= RELEASED_SHARE * peak,
        ),
    ]


def print_sites(title: str, sites: list[Site], unit: str = "bytes/event") -> None:
    print(f"  {title}:")
    print(f"  {unit:>11}  site")
    for site in sites:
        where, code = site.describe()
        print(f"  {site.bytes_per_event:>11,.0f}  {where:<44} {code[:56]}")


def report_blocked(b: BlockedReport) -> list[Check]:
    print()
    print(
        f"Memory: publish calls blocked in a handler, default caps (max_pending_events={b.cap:,})"
    )
    header = f"{'blocked publishes':>18} {'traced over baseline':>21} {'bytes/publish':>14}"
    print(header)
    print("-" * len(header))
    for n, traced_bytes in b.samples:
        print(f"{n:>18,} {size(traced_bytes):>21} {traced_bytes / n:>14,.0f}")
    print(f"  publish #{b.cap + 1:,}: {'refused (CapacityError)' if b.refused else 'ACCEPTED'}")
    cycles = ", ".join(f"cycle {i + 1} {size(r)}" for i, r in enumerate(b.retained))
    growth = b.retained[-1] - b.retained[0]
    print(f"  after release: {cycles} over the baseline; cycle 2 - cycle 1: {size(growth)}")
    title = f"where one blocked publish's bytes go (first {b.samples[0][0]:,})"
    print_sites(title, b.sites, "bytes/call")
    print_sites("what stays after the first release", b.kept, "bytes")
    return [
        ("check: publish refused at the default max_pending_events", "", b.refused),
        (
            f"check: no growth between release cycles (<= {RELEASED_SHARE:.0%} of peak)",
            size(growth),
            abs(growth) <= RELEASED_SHARE * b.samples[-1][1],
        ),
    ]


def report_caps(q: QueuedReport, b: BlockedReport) -> None:
    pending, batch = default_cap("max_pending_events"), default_cap("max_batch_events")
    per_event = q.samples[-1][1] / q.samples[-1][0]
    per_publish = b.samples[-1][1] / b.samples[-1][0]
    print()
    print("What the default caps bound pending memory to (this payload):")
    print(
        f"  queued emits:      max_pending_events {pending:,} x {per_event:,.0f} B = "
        f"{size(pending * per_event)}; one request: max_batch_events {batch:,} x "
        f"{per_event:,.0f} B = {size(batch * per_event)}"
    )
    print(
        f"  blocked publishes: max_pending_events {pending:,} x {per_publish:,.0f} B = "
        f"{size(pending * per_publish)} (measured at the cap)"
    )


def targets(by_key: dict[str, Variant], growth: float) -> list[Check]:
    rate = unit_rate(by_key["publish_1"])
    ratio = rate / unit_rate(by_key["solve_1"])
    return [
        (
            f"target: publish w/ 1 Depends >= {TARGET_PUBLISH_RATE:,.0f} events/s",
            f"{rate:,.0f}",
            rate >= TARGET_PUBLISH_RATE,
        ),
        (
            f"target: publish w/ 1 Depends >= {TARGET_SOLVER_RATIO:.1f}x solve_dependencies",
            f"{ratio:.2f}x",
            ratio >= TARGET_SOLVER_RATIO,
        ),
        (
            f"check: match cache bounded (<= {CACHE_GROWTH_LIMIT:.0f} B per never-seen name)",
            f"{growth:.1f} B",
            growth <= CACHE_GROWTH_LIMIT,
        ),
    ]


def print_checks(checks: list[Check]) -> bool:
    print()
    for label, value, ok in checks:
        print(f"{label} {'.' * max(3, 64 - len(label))} {value:>10}  {'PASS' if ok else 'FAIL'}")
    return all(ok for _, _, ok in checks)


# -- entry point --------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="about 45 s, 100,000 pending events")
    parser.add_argument("--rounds", type=int, help="rounds of round-robin batches")
    parser.add_argument("--pending", type=int, help="events queued in the memory run")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--profile", metavar="VARIANT", help="cProfile one variant instead")
    parser.add_argument("--profile-seconds", type=float, default=3.0)
    parser.add_argument("--top", type=int, default=30, help="rows per profile listing")
    return parser.parse_args(argv)


async def run_profile(variants: list[Variant], args: argparse.Namespace) -> int:
    chosen = [v for v in variants if v.key == args.profile]
    if not chosen:
        keys = ", ".join(v.key for v in variants)
        raise SystemExit(f"unknown variant {args.profile!r}; choose one of: {keys}")
    await profile(chosen[0], args.profile_seconds, args.top)
    verify_counts(chosen)
    return 0


async def amain(args: argparse.Namespace) -> int:
    variants, bus = dispatch_variants()
    patterns = pattern_variants()
    variants += patterns.variants
    if args.profile:
        return await run_profile(variants, args)
    start = time.perf_counter()
    rounds = args.rounds or (5 if args.quick else 8)
    await measure(variants, rounds, *((0.08, 0.14) if args.quick else (0.3, 0.45)))
    counts = verify_counts(variants)
    for one in (bus, *patterns.buses):
        if left := await one.drain(0):
            raise AssertionError(f"{len(left)} event(s) still in flight after the run")
    middle = time.perf_counter()
    growth = await cache_growth(50_000 if args.quick else 200_000)
    queued = await queued_memory(args.pending or (100_000 if args.quick else 1_000_000))
    blocked = await blocked_memory()
    print(
        f"fastapi_eventbus dispatch benchmark: {rounds} rounds, round-robin, asyncio loop, "
        f"Python {sys.version.split()[0]}, FastAPI {fastapi.__version__}; "
        f"throughput {middle - start:.0f} s, memory {time.perf_counter() - middle:.0f} s"
    )
    report_throughput(variants, cache_size(patterns.index))
    checks = report_queued(queued) + report_blocked(blocked)
    report_caps(queued, blocked)
    ok = print_checks(targets({v.key: v for v in variants}, growth) + checks)
    print(f"verified call counts: {len(counts)} counters, {sum(counts.values()):,} in all")
    return 0 if ok or not args.check else 1


def main(argv: list[str] | None = None) -> int:
    remember_sources()
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
