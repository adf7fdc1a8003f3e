"""Throughput and latency through real uvicorn servers, driven by a load generator.

Run ``python -m benchmarks.bench_server`` (about 2 min) or add ``--quick`` (about 30 s).
Each row is its own uvicorn server in its own process (``python -m uvicorn
benchmarks.bench_server:create_app --factory``, the row named by an environment
variable; one worker, uvicorn's defaults, no access log), serving one of bench_core's
one-route apps. This process is the load generator: asyncio (uvloop if installed), N
keep-alive HTTP/1.1 connections, each sending ``POST /`` and waiting for the whole
response before the next (a closed loop). Rows are measured by `benchmarks._harness`
in rounds, one window each per round in a rotating order, on the wall clock (the
server is another process): a warm-up, then the responses completed in a fixed
duration; latencies (send to last byte) are pooled over the windows.

Handlers run in the server after the response, so they show as lower throughput;
latency is then mostly queueing (about N / throughput). The ``srv µs/req`` column (the
server's CPU time per response, from its ``GET /count`` route, never timed) does not
depend on how the two processes shared the cores; ``srv CPU`` near 100 % says the
server was the bottleneck, as req/s ratios need. After the run every server's call
counts must equal what the requests imply. The servers die with this process.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, cast

from fastapi import FastAPI

from benchmarks import _harness as h
from benchmarks._harness import CALLS, Variant
from benchmarks.bench_core import HTTP_ROWS, http_app, load_fastapi_events

VARIANT_ENV = "FASTAPI_EVENTBUS_BENCH_SERVER_VARIANT"
ROOT = Path(__file__).resolve().parent.parent
REQUEST = b"POST / HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n"
SERVED = ("bare", "bg_task", "floor", "emit1", "emit10", "fe1", "fe10")
"""bench_core's per-request rows that run here."""

# -- the server side (runs inside uvicorn) ------------------------------------------------


def create_app() -> FastAPI:
    """The row named by ``$VARIANT_ENV``, plus ``GET /count`` (a second route, after ``/``):
    the call counters and the process's CPU time."""
    app, _ = http_app(os.environ[VARIANT_ENV])
    if not isinstance(app, FastAPI):
        raise RuntimeError("fastapi-events is not installed")

    @app.get("/count")
    async def count() -> dict[str, Any]:
        return {"calls": dict(CALLS), "cpu": time.process_time()}

    return app


# -- the servers ----------------------------------------------------------------------------


@dataclass
class Window:
    latencies: list[float]
    server_cpu: float
    """The server's CPU time over the window's wall time (1.0: one core, saturated)."""
    client_cpu: float
    server_us: float
    """The server's CPU µs per response, what it ran after the response included."""


@dataclass
class Server:
    key: str
    port: int
    process: subprocess.Popen[bytes]
    requests: int = 0
    """Requests to ``/`` answered, warm-ups included: what ``/count`` must account for."""
    windows: list[Window] = field(default_factory=list)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when this process dies, even by SIGKILL."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_server(key: str) -> Server:
    port = h.free_port()
    app, options = "benchmarks.bench_server:create_app", "--log-level warning --no-access-log"
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--factory", "--port", str(port), *options.split()],
        cwd=ROOT,
        env={**os.environ, VARIANT_ENV: key},
        stdout=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    return Server(key, port, process)


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


async def get_count(server: Server, timeout: float = 0) -> dict[str, Any]:
    """``GET /count`` on its own connection; retried for *timeout* s while the server starts."""
    deadline = time.monotonic() + timeout
    while True:
        if (code := server.process.poll()) is not None:
            raise RuntimeError(f"server {server.key!r} exited with code {code}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
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


# -- the load generator ---------------------------------------------------------------------


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
        if self.waiter is None or self.waiter.done():
            raise RuntimeError("a response to no request")
        if self.buffer:
            self.waiter.set_exception(RuntimeError(f"bytes after the response: {self.buffer!r}"))
        else:
            self.waiter.set_result(status)

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
    total = end + 4 + int(head[start + 17 : stop if stop >= 0 else None])
    if len(buffer) < total:
        return None
    del buffer[:total]
    return int(head[9:12])


async def run_window(server: Server, connections: int, warmup: float, duration: float) -> int:
    """Load *server* for *warmup* + *duration* s; the responses completed in *duration*."""
    loop = asyncio.get_running_loop()
    conns = [
        (await loop.create_connection(lambda: Connection(loop), "127.0.0.1", server.port))[1]
        for _ in range(connections)
    ]
    latencies: list[float] = []
    sent, bad = [0], []
    before = await get_count(server)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    opens = wall0 + warmup
    closes = opens + duration

    async def drive(conn: Connection) -> None:
        while (start := time.perf_counter()) < closes:
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
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    server_seconds = (await get_count(server))["cpu"] - before["cpu"]
    server.requests += sent[0]
    if bad:
        raise AssertionError(f"{server.key}: {len(bad)} non-200 responses, {bad[:5]}")
    window = Window(latencies, server_seconds / wall, cpu / wall, server_seconds / sent[0] * 1e6)
    server.windows.append(window)
    return len(latencies)


async def check_counts(server: Server, timeout: float = 10.0) -> dict[str, int]:
    """``/count`` equals what the requests imply (handlers may still be finishing: poll)."""
    per_request = {"endpoint": 1, **HTTP_ROWS[server.key][1]}
    expected = {k: v * server.requests for k, v in per_request.items()}
    deadline = time.monotonic() + timeout
    while True:
        calls: dict[str, int] = (await get_count(server))["calls"]
        actual = {k: calls.get(k, 0) for k in expected}
        if actual == expected:
            return actual
        if time.monotonic() > deadline:
            raise AssertionError(f"{server.key}: call counts: expected {expected}, got {actual}")
        await asyncio.sleep(0.1)


# -- the run --------------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def report(rows: list[Variant], servers: dict[str, Server]) -> float | None:
    """The latency and CPU table; emit1's req/s over bare's."""
    h.tables(rows, wall=True)
    print("\nkey               p50 ms   p99 ms  srv µs/req  srv CPU  cli CPU  srv µs/req ratio (x)")
    us = {k: statistics.median(w.server_us for w in s.windows) for k, s in servers.items()}
    for key, server in servers.items():
        ms = sorted(x * 1e3 for w in server.windows for x in w.latencies)
        cpu = statistics.median(w.server_cpu for w in server.windows)
        client = statistics.median(w.client_cpu for w in server.windows)
        ratios = ", ".join(f"{us[b] / us[key]:.2f}x {b}" for b in HTTP_ROWS[key][2] if b in us)
        cells = f"{percentile(ms, 0.5):>7.2f} {percentile(ms, 0.99):>8.2f} {us[key]:>11.1f}"
        print(f"{key:<16} {cells} {cpu:>8.0%} {client:>8.0%}  {ratios}")
    if statistics.median(w.server_cpu for w in servers["bare"].windows) < 0.85:
        print("note: the bare server used under 85 % of a core (the client and other processes")
        print("took the rest), which compresses the req/s ratios; srv µs/req does not depend on it")
    return h.ratio({v.key: v for v in rows}, "emit1", "bare")


async def amain(args: argparse.Namespace, servers: dict[str, Server]) -> bool:
    warmup, duration = (0.2, 0.75) if args.quick else (0.5, 2.0)
    duration = args.duration or duration
    for server in servers.values():  # lazy set-up, imports, caches: not recorded
        await get_count(server, timeout=30)
        await run_window(server, args.connections, warmup, 0.1)
        server.windows.clear()

    def batch(server: Server) -> h.Batch:
        async def window(n: int) -> tuple[int, float]:
            return await run_window(server, args.connections, warmup, duration), duration

        return window

    section = f"HTTP requests through uvicorn, {args.connections} connections"
    rows = [
        Variant(key, HTTP_ROWS[key][0], None, "req", baseline=HTTP_ROWS[key][2], section=section)
        for key in servers
    ]
    for row in rows:
        row.batch = batch(servers[row.key])
    start = time.perf_counter()
    if await h.run_variants(args, rows, rounds=(3, 6), clock=time.perf_counter) is None:
        return True
    counts = {key: await check_counts(server) for key, server in servers.items()}
    uvicorn = importlib.import_module("uvicorn")
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    extra = f"; {time.perf_counter() - start:.0f} s; uvicorn {uvicorn.__version__} ({loop}, "
    extra += f"{http}), {duration:g} s windows; {os.cpu_count()} CPUs, "
    h.header("bench_server", args.rounds, True, f"{extra}load {os.getloadavg()[0]:.2f}")
    ok = h.verdict({"server_bare": report(rows, servers)})
    print(h.counts_line({f"{k}.{c}": v for k, cs in counts.items() for c, v in cs.items()}))
    return ok


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through main's finally: the servers are stopped


def main(argv: list[str] | None = None) -> int:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--duration", type=float, help="measured seconds per window")
        parser.add_argument("--connections", type=int, default=16, help="keep-alive connections")

    args = h.parse_args(__doc__, argv, extra)
    with_fe = load_fastapi_events() is not None
    servers: dict[str, Server] = {}
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    loop_factory = None
    if importlib.util.find_spec("uvloop"):  # optional, not a dependency of the project
        loop_factory = importlib.import_module("uvloop").new_event_loop
    try:
        for key in SERVED:
            if with_fe or not key.startswith("fe"):
                servers[key] = start_server(key)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return h.exit_code(args, runner.run(amain(args, servers)))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        stop_servers(list(servers.values()))
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
