"""The one harness every benchmark script runs on.

A `Variant` is one row: an async *op* (one request, one ``publish``, one lookup...)
that the harness calls n times under a clock, or a *batch* that runs its own units
and returns how many it timed and in how many seconds (a window of load against a
server, a queue drained by a worker). `measure` calibrates each op row to batches of
about the same duration, then times one batch of every row per round, in an order
that rotates each round, so that every row sees the same conditions. The clock is
the process's **CPU time** (`time.process_time`): the machines this runs on have two
noisy cores, and a row that is descheduled is not charged for it. Rows whose other
side is another process (a uvicorn server, a broker) are timed by the caller on the
wall clock instead.

Tables give the median µs per unit over the batches, their min-max, the rate, and
ratios against each row's baselines (throughput ratios: higher is faster). Every
handler, dependency and task counts its calls in `CALLS`; `finish` fails the run if
a count differs from what the rows' ``expected`` imply, if an event is still in
flight, or if a task is still pending. Every target threshold of every script is in
`TARGETS`; `verdict` prints them, and ``--check`` makes a missed one exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import importlib
import pstats
import re
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message

# -- every target, in one place -------------------------------------------------------


@dataclass(frozen=True)
class Target:
    label: str
    limit: float
    unit: str = "x"
    """How the value prints: ``x`` (a ratio), `` µs``, `` B``."""
    at_most: bool = False
    """The value must be <= *limit* (else >=)."""


TARGETS: dict[str, Target] = {
    # bench_core: per request (in-process ASGI), payload sizes, publish
    "floor": Target("emit 1 event -> handler w/ 1 Depends, vs the floor (emit1 / floor)", 0.85),
    "payload_10k": Target("10 KiB structured payload, vs fastapi-events", 1.5),
    "payload_all": Target("every payload row vs fastapi-events (the lowest of 6)", 1.0),
    "fe10": Target("emit 10 events, vs fastapi-events emitting 10", 5.0),
    "vs_solver": Target("publish w/ 1 Depends, vs solve_dependencies per event", 3.0),
    "per_handler": Target("publish: CPU per extra handler (1 vs 4 handlers)", 1.0, " µs", True),
    # bench_dispatch
    "patterns_10k": Target("never-seen name, 10,000 patterns, over 1 pattern", 20.0, " µs", True),
    "pending_bytes": Target("memory per pending (queued) event", 600.0, " B", True),
    # bench_server
    "server_bare": Target("through uvicorn: emit 1 event vs bare endpoint (req/s)", 0.85),
    # bench_sqs
    "sqs_batching": Target("SQSForwarder vs one SendMessage per event (1 or 10 at a time)", 5.0),
    "sqs_down": Target("p50 response, broker down vs up (one at a time)", 1.5, "x", True),
}

# -- rows ---------------------------------------------------------------------------

MOTO_KEYS: dict[str, Any] = {
    "region_name": "us-east-1",
    "aws_access_key_id": "bench",  # moto accepts any credentials
    "aws_secret_access_key": "bench",
}
"""What the SQS benchmarks give aiobotocore for moto's server."""

CALLS: Counter[str] = Counter()
"""How many times each handler, dependency, task and response really happened."""

Op = Callable[[], Awaitable[None]]
Batch = Callable[[int], Awaitable[tuple[int, float]]]
Clock = Callable[[], float]


@dataclass
class Variant:
    key: str
    label: str
    op: Op | None = None
    unit: str = "req"
    per_op: int = 1
    """Units (events, names...) per op: times and ratios are per unit."""
    expected: Mapping[str, int] = field(default_factory=dict)
    """`CALLS` keys and how much each op adds to them."""
    baseline: str | Sequence[str] = ()
    section: str = ""
    batch: Batch | None = None
    """Instead of *op*: run about *size* units, return (units timed, seconds)."""
    size: int = 1
    times: list[float] = field(default_factory=list)
    """Seconds per unit, one per measured batch."""
    ops: int = 0

    @property
    def bases(self) -> tuple[str, ...]:
        return (self.baseline,) if isinstance(self.baseline, str) else tuple(self.baseline)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    async def run(self, n: int, clock: Clock) -> float:
        """Time *n* ops (or one batch of *n*); seconds per unit."""
        if self.batch is not None:
            units, seconds = await self.batch(n)
            return seconds / units
        assert self.op is not None, self.key
        op = self.op
        start = clock()
        for _ in range(n):
            await op()
        elapsed = clock() - start
        self.ops += n
        return elapsed / (n * self.per_op)


async def calibrate(v: Variant, warmup: float, batch: float, clock: Clock) -> int:
    """Warm *v* up for about *warmup* s; the ops in a batch of about *batch* s."""
    if v.batch is not None:
        return v.size
    n, spent, per_op = 1, 0.0, 1.0
    while spent < warmup:
        per_op = await v.run(n, clock) * v.per_op
        spent += per_op * n
        n = max(1, min(n * 4, int(warmup / 2 / max(per_op, 1e-9))))
    return max(1, round(batch / max(per_op, 1e-9)))


async def measure(
    variants: Sequence[Variant], rounds: int, warmup: float, batch: float, clock: Clock
) -> None:
    """Round-robin: one batch of every variant per round, the order rotating each round."""
    sizes = {v.key: await calibrate(v, warmup, batch, clock) for v in variants}
    for r in range(rounds):
        shift = r % len(variants)
        for v in [*variants[shift:], *variants[:shift]]:
            gc.collect()  # no batch pays for the garbage of another
            v.times.append(await v.run(sizes[v.key], clock))


def ratio(by_key: Mapping[str, Variant], key: str, base: str) -> float | None:
    """Throughput of *key* over *base* (per unit, medians); None if either is absent."""
    if key not in by_key or base not in by_key:
        return None
    return by_key[base].median / by_key[key].median


# -- checks -----------------------------------------------------------------------


async def finish(variants: Iterable[Variant], buses: Iterable[Any] = ()) -> dict[str, int]:
    """Check the call counts, that no event is in flight and no task pending; the counts."""
    expected: Counter[str] = Counter()
    for v in variants:
        for key, per_op in v.expected.items():
            expected[key] += per_op * v.ops
    actual = {key: CALLS[key] for key in expected}
    if actual != dict(expected):
        raise AssertionError(f"call counts differ: expected {dict(expected)}, got {actual}")
    for bus in buses:
        if left := await bus.drain(0):
            raise AssertionError(f"{len(left)} event(s) still in flight after the run")
    if pending := asyncio.all_tasks() - {asyncio.current_task()}:
        raise AssertionError(f"{len(pending)} task(s) still pending after the run: {pending}")
    return actual


def counts_line(counts: Mapping[str, int]) -> str:
    return f"verified call counts: {len(counts)} counters, {sum(counts.values()):,} calls"


# -- driving ASGI apps in-process -----------------------------------------------------

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
RESPONSES = "http.200"
"""The `CALLS` key of complete 200 responses: add ``{RESPONSES: 1}`` to an HTTP row's expected."""


def asgi_op(app: ASGIApp) -> Op:
    """One ``POST /`` to *app*, called directly (no socket, no client), with a fresh scope."""

    async def receive() -> Message:
        return REQUEST_MESSAGE

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise AssertionError(f"status {message['status']}")
        if message["type"] == "http.response.body" and not message.get("more_body"):
            CALLS[RESPONSES] += 1

    async def op() -> None:
        await app(dict(BASE_SCOPE), receive, send)

    return op


# -- reporting ------------------------------------------------------------------------


def header(title: str, rounds: int, wall: bool = False, extra: str = "") -> None:
    fastapi = importlib.import_module("fastapi")
    clock = "wall time" if wall else "CPU time (process_time)"
    print(
        f"{title}: {rounds} rounds, round-robin, {clock}; Python {sys.version.split()[0]}, "
        f"FastAPI {fastapi.__version__}{extra}"
    )


def tables(variants: Sequence[Variant], wall: bool = False) -> None:
    """One table per section: median and min-max µs per unit, rate, ratios vs baselines."""
    by_key = {v.key: v for v in variants}
    sections: dict[str, list[Variant]] = {}
    for v in variants:
        sections.setdefault(v.section, []).append(v)
    for title, rows in sections.items():
        unit = rows[0].unit
        print(f"\n{title} ({'wall' if wall else 'CPU'} µs per {unit}, median of the batches)")
        head = (
            f"{'key':<16} {'row':<50} {'µs/' + unit:>10} {'min-max':>17} {unit + '/s':>11}  "
            "ratio (x: throughput vs)"
        )
        print(head + "\n" + "-" * len(head))
        for v in rows:
            lo, hi, digits = min(v.times) * 1e6, max(v.times) * 1e6, 2 if v.median < 1e-5 else 1
            ratios = ", ".join(
                f"{by_key[b].median / v.median:.2f}x {b}" for b in v.bases if b in by_key
            )
            print(
                f"{v.key:<16} {v.label:<50} {v.median * 1e6:>10.2f} "
                f"{f'{lo:.{digits}f}-{hi:.{digits}f}':>17} {1 / v.median:>11,.0f}  {ratios}"
            )


Check = tuple[str, str, bool]
"""A check: what it says, the measured value, whether it holds."""


def verdict(results: Mapping[str, float | None], checks: Sequence[Check] = ()) -> bool:
    """Print the targets (None: not measured, skipped) and checks; whether all are met."""
    print()
    ok = True
    for key, value in results.items():
        t = TARGETS[key]
        want = f"{'<=' if t.at_most else '>='} {t.limit:g}{t.unit}"
        if value is None:
            shown, status = "-", "SKIPPED"
        else:
            met = value <= t.limit if t.at_most else value >= t.limit
            shown, status, ok = f"{value:.2f}{t.unit}", "met" if met else "MISSED", ok and met
        label = f"target {key}: {t.label} {want}"
        print(f"{label} {'.' * max(3, 92 - len(label))} {shown:>10}  {status}")
    for label, measured, holds in checks:
        line = f"check: {label}"
        print(
            f"{line} {'.' * max(3, 92 - len(line))} {measured:>10}  {'ok' if holds else 'FAILED'}"
        )
        ok = ok and holds
    return ok


# -- profiling ------------------------------------------------------------------------


async def profile(v: Variant, seconds: float, top: int, clock: Clock) -> None:
    """cProfile one batch of *v* (of about *seconds*): where the time goes, per op."""
    n = await calibrate(v, 0.5, seconds, clock)
    gc.collect()
    profiler = cProfile.Profile()
    profiler.enable()
    await v.run(n, clock)
    profiler.disable()
    raw: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    ops = 1 if v.batch is not None else n
    total = sum(tt for _, _, tt, _, _ in raw.values())
    print(
        f"cProfile of {v.key} ({v.label}): {ops} ops, {total / ops * 1e6:.1f} µs/op profiled "
        "(cProfile inflates absolute times: compare functions, not with the table)"
    )
    for index, title in ((2, "own time"), (3, "cumulative time")):
        print(f"\ntop {top} by {title}, per op:")
        print(f"{'calls/op':>9} {'own µs':>9} {'cum µs':>9}  function")
        rows = sorted(raw.items(), key=lambda item: item[1][index], reverse=True)[:top]
        for (filename, line, func), (_, calls, tt, ct, _) in rows:
            where = f"{short_path(filename)}:{line}({func})"
            print(f"{calls / ops:>9.2f} {tt / ops * 1e6:>9.2f} {ct / ops * 1e6:>9.2f}  {where}")


_PREFIX = re.compile(r".*?(site-packages/|/work/main/|lib/python3\.\d+/)")


def short_path(filename: str) -> str:
    return _PREFIX.sub("", filename, count=1)


# -- command line ---------------------------------------------------------------------


def parse_args(
    doc: str | None,
    argv: list[str] | None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, rougher figures")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--rounds", type=int, help="rounds of round-robin batches")
    parser.add_argument("--profile", metavar="KEY", help="cProfile the row KEY instead")
    parser.add_argument("--profile-seconds", type=float, default=3.0)
    parser.add_argument("--top", type=int, default=30, help="functions per profile listing")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


async def run_variants(
    args: argparse.Namespace,
    variants: Sequence[Variant],
    buses: Iterable[Any] = (),
    *,
    rounds: tuple[int, int] = (5, 8),
    batch: tuple[float, float] = (0.14, 0.4),
    clock: Clock = time.process_time,
) -> dict[str, int] | None:
    """Measure *variants* (rounds and batch seconds: ``--quick``, full) and `finish`; or, with
    ``--profile KEY``, profile that row and return None."""
    if args.profile:
        chosen = [v for v in variants if v.key == args.profile]
        if not chosen:
            keys = ", ".join(v.key for v in variants)
            raise SystemExit(f"unknown row {args.profile!r}; choose one of: {keys}")
        await profile(chosen[0], args.profile_seconds, args.top, clock)
        await finish(chosen, buses)
        return None
    args.rounds = args.rounds or rounds[0 if args.quick else 1]
    seconds = batch[0 if args.quick else 1]
    await measure(variants, args.rounds, seconds * 0.6, seconds, clock)
    return await finish(variants, buses)


def main(
    amain: Callable[[argparse.Namespace], Coroutine[Any, Any, bool]],
    doc: str | None,
    argv: list[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse the command line, run *amain* (whether every target and check held) on the
    chosen loop; the exit code."""
    args = parse_args(doc, argv, extra)
    if args.loop == "uvloop":  # optional, not a dependency of the project
        return exit_code(args, importlib.import_module("uvloop").run(amain(args)))
    return exit_code(args, asyncio.run(amain(args)))


def exit_code(args: argparse.Namespace, ok: bool) -> int:
    return 1 if args.check and not ok else 0


def free_port() -> int:
    """A free TCP port of 127.0.0.1 (nothing listens on it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
