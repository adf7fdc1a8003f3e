"""Throughput and latency through real uvicorn servers, driven by a load generator.

Run ``python -m benchmarks.bench_server`` (about 90 s) or add ``--quick``
(about 20 s). The targets are ``bench_core``'s (in-process); the ratios here are
printed next to them for reference, and are not checked (``--check`` is accepted,
for ``python -m benchmarks --check``, and changes nothing).

Each variant is its own uvicorn server, in its own process (``python -m uvicorn
benchmarks.bench_server:create_app --factory``, the variant named by an
environment variable), serving the same one-route applications as
``bench_core``: a bare endpoint, one with a BackgroundTasks task, this bus
emitting 1 and 10 events to a handler with one ``Depends``, and fastapi-events
0.12 doing the same (rows 5 and 6, skipped when it is not installed; configured
as in ``bench_core``, whose docstring lists the adaptations). uvicorn runs with
its defaults (uvloop and httptools when installed), one worker, no access log.

The load generator is this process: asyncio (uvloop if installed) with raw
sockets, N keep-alive HTTP/1.1 connections, each sending ``POST /`` and waiting
for the full response before sending the next (a closed loop). Variants are
measured in rounds, one window each per round, in a rotating order, so that
they share the machine's conditions. A window opens the connections, runs a
short warm-up, then counts the responses that complete during a fixed duration;
latencies are those responses' (send to last byte), pooled over the rounds.
Requests still in flight when a window ends are completed, not counted.

Handlers, dependencies and tasks run in the server after the response is sent,
so they lengthen a response only by queueing; under a closed loop they show
as lower throughput, and latency is mostly queueing (about N / throughput).
The server and client CPU columns show who was saturated: the ratios mean
something only if the servers were at or near 100 % of a core.

Every server counts its endpoint, dependency, task and handler calls; after the
run, ``GET /count`` (never timed) must equal what the requests sent imply, so no
event was left unhandled. The servers die with this process, whatever ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, cast

from fastapi import FastAPI

from benchmarks.bench_core import (
    CALLS,
    TARGET_EMIT1_RATIO,
    TARGET_VS_FE1,
    TARGET_VS_FE10,
    background_task_app,
    bare_app,
    emitting_app,
    fastapi_events_app,
    load_fastapi_events,
)

VARIANT_ENV = "FASTAPI_EVENTBUS_BENCH_SERVER_VARIANT"
ROOT = Path(__file__).resolve().parent.parent
REQUEST = b"POST / HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n"
ASYNC_DEP = {"handler.async_dep": 1, "dep.async": 1}


@dataclass(frozen=True)
class ServerVariant:
    key: str
    label: str
    per_request: dict[str, int]
    """``CALLS`` keys and how much each request adds to them."""
    fastapi_events: bool = False


VARIANTS = (
    ServerVariant("bare", "1 bare async endpoint", {"endpoint": 1}),
    ServerVariant("bg_task", "2 + one BackgroundTasks no-op task", {"endpoint": 1, "task.noop": 1}),
    ServerVariant(
        "emit1", "3 emit 1 event -> handler w/ 1 async Depends", {"endpoint": 1, **ASYNC_DEP}
    ),
    ServerVariant(
        "emit10",
        "4 emit 10 events -> same handler",
        {"endpoint": 1, **dict.fromkeys(ASYNC_DEP, 10)},
    ),
    ServerVariant(
        "fe1",
        "5 fastapi-events: 1 event -> handler w/ 1 Depends",
        {"endpoint": 1, **ASYNC_DEP},
        fastapi_events=True,
    ),
    ServerVariant(
        "fe10",
        "6 fastapi-events: 10 events -> same handler",
        {"endpoint": 1, **dict.fromkeys(ASYNC_DEP, 10)},
        fastapi_events=True,
    ),
)


# -- the server side (runs inside uvicorn) ----------------------------------------


def create_app() -> FastAPI:
    """The application of one server: the variant named by ``$VARIANT_ENV``, plus ``GET /count``.

    ``/count`` is a second route, after ``/``, so it costs ``/`` nothing; it
    reports the call counters and the process's CPU time.
    """
    key = os.environ[VARIANT_ENV]
    app = build_app(key)

    @app.get("/count")
    async def count() -> dict[str, Any]:
        return {"calls": dict(CALLS), "cpu": time.process_time()}

    return app


def build_app(key: str) -> FastAPI:
    if key == "bare":
        return bare_app()
    if key == "bg_task":
        return background_task_app()
    if key in ("emit1", "emit10"):
        return emitting_app(1 if key == "emit1" else 10)[0]
    if key in ("fe1", "fe10"):
        fe = load_fastapi_events()
        if fe is None:
            raise RuntimeError("fastapi-events is not installed")
        return fastapi_events_app(fe, 1 if key == "fe1" else 10)
    raise ValueError(f"unknown variant {key!r}")


# -- the servers' processes -----------------------------------------------------------


@dataclass
class Server:
    variant: ServerVariant
    port: int
    process: subprocess.Popen[bytes]
    requests: int = 0
    """Requests to ``/`` answered, warm-ups included: what ``/count`` must account for."""
    windows: list[Window] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when this process dies, even by SIGKILL."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_server(variant: ServerVariant) -> Server:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "benchmarks.bench_server:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, VARIANT_ENV: variant.key},
        stdout=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    return Server(variant, port, process)


def stop_servers(servers: list[Server]) -> None:
    """Terminate every server (uvicorn shuts down gracefully); kill those that linger."""
    for server in servers:
        if server.process.poll() is None:
            server.process.terminate()
    for server in servers:
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


async def wait_ready(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = server.process.poll()
        if code is not None:
            raise RuntimeError(f"server {server.variant.key!r} exited with code {code}")
        try:
            await get_count(server.port)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {server.variant.key!r} did not start") from None
            await asyncio.sleep(0.1)


async def get_count(port: int) -> dict[str, Any]:
    """``GET /count`` on its own connection (never timed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /count HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET /count answered {head[:40]!r}")
    result: dict[str, Any] = json.loads(body)
    return result


# -- the load generator -------------------------------------------------------------


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        status = parse_response(self.buffer)
        if status is None:
            return
        waiter = self.waiter
        if waiter is None or waiter.done():
            raise RuntimeError("a response to no request")
        if self.buffer:
            waiter.set_exception(RuntimeError(f"bytes after the response: {self.buffer[:40]!r}"))
        else:
            waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"server closed the connection: {exc}"))

    def request(self) -> asyncio.Future[int]:
        """Send ``POST /``; the future gives the response's status once it is complete."""
        assert self.transport is not None
        self.waiter = self.loop.create_future()
        self.transport.write(REQUEST)
        return self.waiter


def parse_response(buffer: bytearray) -> int | None:
    """The status of the complete response at the start of *buffer*, removed; None if partial."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).lower()
    start = head.find(b"\r\ncontent-length:")
    if start < 0:
        raise RuntimeError(f"response without content-length: {head!r}")
    stop = head.find(b"\r\n", start + 2)
    length = int(head[start + 17 : stop if stop >= 0 else None])
    total = end + 4 + length
    if len(buffer) < total:
        return None
    del buffer[:total]
    return int(head[9:12])


@dataclass
class Window:
    """One measured window of one variant."""

    requests: int
    """Responses completed inside the measured duration."""
    seconds: float
    latencies: list[float]
    sent: int
    """All responses, warm-up and tail included."""
    server_cpu: float
    """The server's CPU time over the window's wall time (1.0: one core, saturated)."""
    client_cpu: float
    server_us: float
    """The server's CPU time per response, µs, everything it ran after the response included."""

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


async def run_window(server: Server, connections: int, warmup: float, duration: float) -> Window:
    loop = asyncio.get_running_loop()
    conns: list[Connection] = []
    for _ in range(connections):
        _, protocol = await loop.create_connection(
            lambda: Connection(loop), "127.0.0.1", server.port
        )
        conns.append(protocol)
    latencies: list[float] = []
    sent = [0]
    bad: list[int] = []
    before = await get_count(server.port)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    opens = wall0 + warmup
    closes = opens + duration

    async def drive(conn: Connection) -> None:
        while True:
            start = time.perf_counter()
            if start >= closes:
                return
            status = await conn.request()
            end = time.perf_counter()
            sent[0] += 1
            if status != 200:
                bad.append(status)
            if opens <= end <= closes:
                latencies.append(end - start)

    try:
        await asyncio.gather(*(drive(conn) for conn in conns))
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
    wall1, cpu1 = time.perf_counter(), time.process_time()
    after = await get_count(server.port)
    server.requests += sent[0]
    if bad:
        raise AssertionError(f"{server.variant.key}: {len(bad)} non-200 responses, {bad[:5]}")
    server_seconds = after["cpu"] - before["cpu"]
    window = Window(
        requests=len(latencies),
        seconds=duration,
        latencies=latencies,
        sent=sent[0],
        server_cpu=server_seconds / (wall1 - wall0),
        client_cpu=(cpu1 - cpu0) / (wall1 - wall0),
        server_us=server_seconds / sent[0] * 1e6,
    )
    server.windows.append(window)
    return window


async def check_counts(server: Server, timeout: float = 10.0) -> dict[str, int]:
    """``/count`` equals what the requests imply (handlers may still be finishing: poll)."""
    expected = {k: v * server.requests for k, v in server.variant.per_request.items()}
    deadline = time.monotonic() + timeout
    while True:
        calls: dict[str, int] = (await get_count(server.port))["calls"]
        actual = {k: calls.get(k, 0) for k in expected}
        if actual == expected:
            return actual
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{server.variant.key}: call counts differ: expected {expected}, got {actual}"
            )
        await asyncio.sleep(0.1)


# -- reporting ----------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


@dataclass
class Row:
    server: Server
    rate: float
    best: float
    p50: float
    p99: float
    server_cpu: float
    client_cpu: float
    server_us: float

    @classmethod
    def of(cls, server: Server) -> Row:
        windows = server.windows
        latencies = sorted(x for w in windows for x in w.latencies)
        return cls(
            server=server,
            rate=statistics.median(w.rate for w in windows),
            best=max(w.rate for w in windows),
            p50=percentile(latencies, 0.50) * 1e3,
            p99=percentile(latencies, 0.99) * 1e3,
            server_cpu=statistics.median(w.server_cpu for w in windows),
            client_cpu=statistics.median(w.client_cpu for w in windows),
            server_us=statistics.median(w.server_us for w in windows),
        )


def report(rows: dict[str, Row], header: str, fe_version: str | None) -> None:
    print(header)
    print()
    print(
        "HTTP requests through uvicorn (req/s: median window, ratio vs 1 bare; latency pooled; "
        "srv µs/req: server CPU per response)"
    )
    title = (
        f"{'variant':<52} {'req/s':>8} {'best':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'srv µs/req':>10} {'srv CPU':>7} {'cli CPU':>7}"
    )
    print(title)
    print("-" * len(title))
    bare = rows["bare"]
    for key, row in rows.items():
        ratio = "-" if key == "bare" else f"{row.rate / bare.rate:.2f}x"
        print(
            f"{row.server.variant.label:<52} {row.rate:>8,.0f} {row.best:>8,.0f} {ratio:>6} "
            f"{row.p50:>7.2f} {row.p99:>7.2f} {row.server_us:>10.1f} {row.server_cpu:>7.0%} "
            f"{row.client_cpu:>7.0%}"
        )
    if fe_version is None:
        print(
            "rows 5-6 (fastapi-events) skipped: fastapi-events is not installed "
            "(pip install -e '.[bench]')"
        )
    else:
        print(f"rows 5-6: fastapi-events {fe_version} (configured as in bench_core)")
    if bare.server_cpu < 0.85:
        print(
            f"note: the bare server used {bare.server_cpu:.0%} of a core, not ~100 %: the "
            "client or other processes took the rest, which compresses the req/s ratios; "
            "the srv µs/req ratios do not depend on it"
        )

    print()
    print(
        f"{'ratio':<38} {'req/s':>7} {'srv CPU':>8}   in-process target (bench_core), "
        "ceiling (bare / base)"
    )
    ratios = (
        ("3 emit 1 event / 1 bare", "emit1", "bare", f">= {TARGET_EMIT1_RATIO:.2f}x"),
        ("3 emit 1 event / 5 fastapi-events", "emit1", "fe1", f">= {TARGET_VS_FE1:g}x"),
        ("4 emit 10 events / 6 fastapi-events", "emit10", "fe10", f">= {TARGET_VS_FE10:g}x"),
    )
    for label, key, base, target in ratios:
        if base not in rows:
            print(f"{label:<38} {'-':>7} {'-':>8}   {target}  (fastapi-events not installed)")
            continue
        a, b = rows[key], rows[base]
        ceiling = ""
        if base != "bare":  # no bus can beat the bare endpoint
            ceiling = f", ceiling {bare.rate / b.rate:.2f}x req/s, "
            ceiling += f"{b.server_us / bare.server_us:.2f}x CPU"
        print(
            f"{label:<38} {a.rate / b.rate:>6.2f}x {b.server_us / a.server_us:>7.2f}x   "
            f"{target}{ceiling}"
        )
    print("(srv CPU ratio: the base's server CPU per response over the row's; higher is better)")
    for key, base in (("emit1", "fe1"), ("emit10", "fe10")):
        if base in rows:
            a, b = rows[key], rows[base]
            print(
                f"latency, {key} / {base}: p50 {a.p50 / b.p50:.2f}x, p99 {a.p99 / b.p99:.2f}x"
                " (lower is better)"
            )


# -- entry point ----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="about 20 s instead of about 90 s")
    parser.add_argument("--rounds", type=int, help="rounds of one window per variant")
    parser.add_argument("--duration", type=float, help="measured seconds per window")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections")
    parser.add_argument(
        "--check",
        action="store_true",
        help="accepted for `python -m benchmarks --check`: no target is checked here (the "
        "call counts and statuses always are)",
    )
    return parser.parse_args(argv)


def installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


async def amain(args: argparse.Namespace, servers: list[Server], client_loop: str) -> int:
    rounds = args.rounds or (3 if args.quick else 6)
    duration = args.duration or (0.75 if args.quick else 2.0)
    warmup = 0.2 if args.quick else 0.5
    load_before = os.getloadavg()[0]
    await asyncio.gather(*(wait_ready(server) for server in servers))
    start = time.perf_counter()
    for server in servers:  # first requests: lazy set-up, imports, caches; not recorded
        await run_window(server, args.connections, warmup, 0.1)
        server.windows.clear()
    for r in range(rounds):
        shift = r % len(servers)
        for server in servers[shift:] + servers[:shift]:
            await run_window(server, args.connections, warmup, duration)
    elapsed = time.perf_counter() - start
    counts = {s.variant.key: await check_counts(s) for s in servers}
    for server in servers:
        if server.process.poll() is not None:
            raise RuntimeError(f"server {server.variant.key!r} died during the run")

    uvicorn = importlib.import_module("uvicorn")
    fe = load_fastapi_events()
    header = (
        f"fastapi_eventbus server benchmark: {rounds} rounds x {duration:g} s per variant "
        f"(+{warmup:g} s warm-up), {args.connections} connections, {elapsed:.1f} s\n"
        f"servers: uvicorn {uvicorn.__version__}, 1 worker, loop "
        f"{'uvloop' if installed('uvloop') else 'asyncio'}, http "
        f"{'httptools' if installed('httptools') else 'h11'}; load generator: {client_loop}, "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average before the run "
        f"{load_before:.2f} (other processes skew the figures)"
    )
    report({s.variant.key: Row.of(s) for s in servers}, header, fe.version if fe else None)
    print(
        "verified call counts: "
        + "; ".join(
            f"{key} " + ", ".join(f"{k}={v:,}" for k, v in sorted(c.items()))
            for key, c in counts.items()
        )
    )
    return 0


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through main's finally: the servers are stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with_fe = load_fastapi_events() is not None
    variants = [v for v in VARIANTS if with_fe or not v.fastapi_events]
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    client_loop = "asyncio"
    if installed("uvloop"):  # optional, not a dependency of the project
        loop_factory = importlib.import_module("uvloop").new_event_loop
        client_loop = "uvloop"
    servers: list[Server] = []
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        for variant in variants:
            servers.append(start_server(variant))
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(amain(args, servers, client_loop))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        stop_servers(servers)
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
