"""Faults with real processes and real peers: SIGKILL, a broker outage, SIGTERM under load.

`tests.faults_app` runs in ``python -m uvicorn`` subprocesses with a spool file,
forwarding ``order.placed`` events to moto's SQS server (in this process),
reached through a `tests._proxy.Proxy` that plays a hanging or unreachable
broker. The client records every event id the server answered with; the
tests then read the queue and count by id: duplicates are allowed
(at-least-once), a missing id is a lost event.

Each test prints its figures (run with ``-s`` to see them) and records them
with ``record_property`` (``--junitxml``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from fastapi_eventbus.spool import Spool
from fastapi_eventbus.wire import decode_message
from tests._proxy import Proxy
from tests._support import ROOT, ServerProcess
from tests.faults_app import (
    ENDPOINT_ENV,
    HANDLED_ENV,
    HANDLER_SECONDS,
    QUEUE_ENV,
    SHUTDOWN_TIMEOUT,
    SPOOL_ENV,
)
from tests.forwarders._moto import Moto, running_moto
from tests.worker._helpers import AWS_ENV, wait_for

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

pytestmark = pytest.mark.slow

APP = "tests.faults_app:create_app"

Record = Callable[[str, object], None]


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with running_moto() as server:
        yield server


@pytest.fixture
def proxy(moto: Moto) -> Iterator[Proxy]:
    proxy = Proxy(moto.port)
    try:
        yield proxy
    finally:
        proxy.close()


# -- the server in a subprocess -------------------------------------------------------------


class Server(ServerProcess):
    """``python -m uvicorn tests.faults_app:create_app --factory`` running in a subprocess."""

    def rss_mb(self) -> float:
        """The server's resident memory (VmRSS), in MB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(env: Mapping[str, str], log: Path, *options: str, app: str = APP) -> Server:
    """Start *app*'s server in ``python -m uvicorn`` with *env* (and uvicorn *options*)."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", app, "--factory", "--no-access-log"]
    command += ["--host", "127.0.0.1", "--port", str(port), *options]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **AWS_ENV, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Server(process, log, f"http://127.0.0.1:{port}")


@contextmanager
def running_server(
    env: Mapping[str, str], log: Path, *options: str, app: str = APP
) -> Iterator[Server]:
    """`start_server`, and wait for its startup; kill it when the block ends."""
    server = start_server(env, log, *options, app=app)
    try:
        wait_for(server.started, 30, "the server to start")
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait()


def stop(server: Server, within: float) -> tuple[int, float]:
    """SIGTERM *server*; its exit status and how long it took. Fails after *within* seconds."""
    begin = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(timeout=within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server was still running {within}s after SIGTERM:\n{server.output()}")
    return code, time.monotonic() - begin


def app_env(spool: Path, queue_url: str, endpoint: str) -> dict[str, str]:
    return {SPOOL_ENV: str(spool), QUEUE_ENV: queue_url, ENDPOINT_ENV: endpoint}


def place(client: httpx.Client, n: int) -> list[str]:
    """``POST /orders?n=...``: the ids of the *n* events the server emitted."""
    response = client.post("/orders", params={"n": n})
    response.raise_for_status()
    ids: list[str] = response.json()["ids"]
    return ids


def pending_ids(path: Path) -> set[str]:
    """The ids of the events the spool file holds, waiting to be sent."""
    spool = Spool(path)
    try:
        return {item.event.id for item in spool.pending()}
    finally:
        spool.close()


# -- the queue ------------------------------------------------------------------------------


class Consumer:
    """Receives and deletes a queue's messages in a thread, counting them by event id.

    It receives all along, not at the end: moto's SQS calls take time in
    proportion to the messages waiting in the queue, so a long queue slows the
    broker itself down.
    """

    def __init__(self, moto: Moto, queue_url: str) -> None:
        self._moto = moto
        self._queue_url = queue_url
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> Consumer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def seen(self) -> Counter[str]:
        """How often each event id arrived so far."""
        self._check()
        with self._lock:
            return self._seen.copy()

    def missing(self, expected: set[str]) -> set[str]:
        """The ids of *expected* that have not arrived (yet)."""
        self._check()
        with self._lock:
            return {event_id for event_id in expected if event_id not in self._seen}

    def _check(self) -> None:
        if self._error is not None:
            raise AssertionError(f"receiving from the queue failed: {self._error!r}")

    def wait_for(self, expected: set[str], timeout: float) -> set[str]:
        """Wait until every id of *expected* arrived, or *timeout*; what is still missing."""
        deadline = time.monotonic() + timeout
        while (missing := self.missing(expected)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return missing

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by `missing`
            self._error = exc

    async def _run(self) -> None:
        async with self._moto.client() as sqs:
            while await self._receive(sqs) or not self._stop.is_set():
                pass  # after `stop`: until the queue is empty (late duplicates)

    async def _receive(self, sqs: SQSClient) -> int:
        response = await sqs.receive_message(QueueUrl=self._queue_url, MaxNumberOfMessages=10)
        messages = response.get("Messages", [])
        if messages:
            await sqs.delete_message_batch(
                QueueUrl=self._queue_url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": message["ReceiptHandle"]}
                    for i, message in enumerate(messages)
                ],
            )
            with self._lock:
                self._seen.update(decode_message(message).id for message in messages)
        else:
            await asyncio.sleep(0.05)
        return len(messages)


def report(record: Record, **figures: object) -> None:
    """Print the figures of a test and record them as its properties."""
    for name, value in figures.items():
        record(name, value)
    print(
        "\n" + "\n".join(f"  {name.replace('_', ' ')}: {value}" for name, value in figures.items())
    )


# -- SIGKILL ---------------------------------------------------------------------------------


def test_sigkill_with_events_in_flight_loses_nothing(
    moto: Moto, proxy: Proxy, tmp_path: Path, record_property: Record
) -> None:
    """1,000 events answered; the broker hangs; SIGKILL; a new process sends the rest."""
    queue_url = moto.queue("faults-kill")
    spool = tmp_path / "events.sqlite3"
    env = app_env(spool, queue_url, proxy.endpoint)
    with Consumer(moto, queue_url) as queue:
        with running_server(env, tmp_path / "killed.log") as server:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                sent = [event_id for _ in range(30) for event_id in place(client, 10)]
                wait_for(lambda: not pending_ids(spool), 30, "the first 300 events to be sent")
                proxy.stall()  # the broker hangs: the next events' sends cannot finish
                stuck = [event_id for _ in range(70) for event_id in place(client, 10)]
            wait_for(lambda: proxy.held, 10, "sends held by the hanging broker")
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(timeout=10)
        ids = {*sent, *stuck}
        assert len(ids) == 1_000
        in_spool = pending_ids(spool)
        assert in_spool == set(stuck)  # answered, never acknowledged: only the spool has them
        assert not queue.wait_for(set(sent), 30)
        assert queue.missing(set(stuck)) == set(stuck)

        proxy.heal()
        begin = time.monotonic()
        with running_server(env, tmp_path / "restarted.log"):
            queue.wait_for(ids, 60)
            recovery = time.monotonic() - begin
            wait_for(lambda: not pending_ids(spool), 30, "an empty spool")
    received = queue.seen()
    missing = ids - received.keys()
    report(
        record_property,
        events_answered=len(ids),
        delivered_before_the_kill=len(sent),
        pending_in_spool_at_kill=len(in_spool),
        events_lost=len(missing),
        duplicates=received.total() - len(received),
        recovery_seconds=round(recovery, 2),
    )
    assert not missing, f"{len(missing)} answered event(s) never reached the queue"
    assert received.keys() == ids


# -- the broker down for 10 s ------------------------------------------------------------------

RATE = 25
"""Requests a second in the load test."""
EVENTS_PER_REQUEST = 2
LOAD_SECONDS = 20.0
OUTAGE = (5.0, 15.0)
"""When the broker is down, in seconds since the load started."""


@dataclass
class RssSampler:
    """Samples a server's resident memory every half second, in a thread."""

    server: Server
    samples: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.server.rss_mb())
            except (OSError, StopIteration):  # the server exited
                return
            self._stop.wait(0.5)

    def stop(self) -> float:
        """Stop sampling; the peak."""
        self._stop.set()
        self._thread.join(timeout=5)
        return max(self.samples)


@dataclass
class Request:
    started: float
    """Seconds since the load started."""
    latency: float
    ids: list[str]


@dataclass
class SteadyLoad:
    requests: list[Request] = field(default_factory=list)
    held: int = 0
    """Events in the spool when the broker came back."""
    healed_at: float = 0.0
    """When the broker came back (`time.monotonic`)."""


def steady_load(client: httpx.Client, proxy: Proxy, spool: Path) -> SteadyLoad:
    """*RATE* requests a second for *LOAD_SECONDS*, the broker down during *OUTAGE*."""
    load = SteadyLoad()
    down = False
    start = time.monotonic()
    for number in range(int(RATE * LOAD_SECONDS)):
        time.sleep(max(0.0, start + number / RATE - time.monotonic()))
        elapsed = time.monotonic() - start
        if not down and OUTAGE[0] <= elapsed < OUTAGE[1]:
            proxy.down()
            down = True
        elif down and elapsed >= OUTAGE[1]:
            load.held = len(pending_ids(spool))
            proxy.heal()
            load.healed_at, down = time.monotonic(), False
        begin = time.monotonic()
        ids = place(client, EVENTS_PER_REQUEST)
        load.requests.append(Request(elapsed, time.monotonic() - begin, ids))
    return load


def percentiles(requests: list[Request]) -> tuple[float, float]:
    """p50 and p99 latency of *requests*, in milliseconds."""
    latencies = [request.latency * 1000 for request in requests]
    p99 = statistics.quantiles(latencies, n=100, method="inclusive")[98]
    return statistics.median(latencies), p99


def test_a_broker_outage_under_load_loses_nothing(
    moto: Moto, proxy: Proxy, tmp_path: Path, record_property: Record
) -> None:
    """Steady load; connections to the broker refused for 10 s; every event arrives after."""
    if not Path("/proc/self/status").exists():
        pytest.skip("reads the server's memory from /proc")
    queue_url = moto.queue("faults-outage")
    spool = tmp_path / "events.sqlite3"
    env = app_env(spool, queue_url, proxy.endpoint)
    with Consumer(moto, queue_url) as queue, running_server(env, tmp_path / "s.log") as server:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for _ in range(20):  # warm up: imports, connections to the broker
                place(client, EVENTS_PER_REQUEST)
            baseline = server.rss_mb()
            sampler = RssSampler(server)
            load = steady_load(client, proxy, spool)
        ids = {event_id for request in load.requests for event_id in request.ids}
        queue.wait_for(ids, 60)
        recovery = time.monotonic() - load.healed_at
        peak = sampler.stop()
    received = queue.seen()
    requests = load.requests
    missing = ids - received.keys()
    before = percentiles([r for r in requests if r.started < OUTAGE[0]])
    during = percentiles([r for r in requests if OUTAGE[0] <= r.started < OUTAGE[1]])
    duplicates = sum(received[event_id] - 1 for event_id in ids if event_id in received)
    report(
        record_property,
        events=len(ids),
        events_lost=len(missing),
        duplicates=duplicates,
        pending_in_spool_when_the_broker_came_back=load.held,
        seconds_from_broker_back_to_all_received=round(recovery, 2),
        rss_baseline_mb=round(baseline, 1),
        rss_peak_mb=round(peak, 1),
        latency_before_ms=f"p50 {before[0]:.1f}, p99 {before[1]:.1f}",
        latency_during_outage_ms=f"p50 {during[0]:.1f}, p99 {during[1]:.1f}",
    )
    assert load.held > 0, "the outage held no event back: it proves nothing"
    assert not missing, f"{len(missing)} answered event(s) never reached the queue"
    assert peak - baseline < 150
    assert during[1] < 3 * before[1] + 50


# -- SIGTERM under load ------------------------------------------------------------------------


@dataclass
class Load:
    """Client threads posting orders until the server stops answering."""

    url: str
    answered: list[str] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, threads: int) -> None:
        for _ in range(threads):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.wait(0.05):
                try:
                    response = client.post("/orders", params={"n": 3})
                except httpx.TransportError:  # the server stopped listening
                    return
                if response.is_success:
                    self.answered.extend(response.json()["ids"])
                else:
                    self.failures.append(response.status_code)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)


def handled_ids(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_sigterm_under_load_drains_in_flight_work(
    moto: Moto, tmp_path: Path, record_property: Record
) -> None:
    """SIGTERM while handlers run: what was answered is handled and forwarded before exit."""
    queue_url = moto.queue("faults-term")
    spool, handled = tmp_path / "events.sqlite3", tmp_path / "handled.txt"
    env = {**app_env(spool, queue_url, moto.endpoint), HANDLED_ENV: str(handled)}
    with Consumer(moto, queue_url) as queue, running_server(env, tmp_path / "s.log") as server:
        load = Load(server.url)
        load.start(threads=4)
        try:
            wait_for(lambda: len(load.answered) >= 300, 30, "300 answered events")
            with httpx.Client(base_url=server.url, timeout=10) as client:
                last = place(client, 5)  # its handler calls take 5 x 0.2 s: still running
            in_flight = {*load.answered, *last} - set(handled_ids(handled))
            code, drain = stop(server, within=SHUTDOWN_TIMEOUT + 10)
        finally:
            load.stop()
        log = server.output()
        answered = {*load.answered, *last}
        queue.wait_for(answered, 30)  # returns at once unless events are missing
    done = set(handled_ids(handled))
    received = queue.seen()
    report(
        record_property,
        events_answered=len(answered),
        in_flight_at_sigterm=len(in_flight),
        drain_seconds=round(drain, 2),
        exit_code=code,
        not_handled=len(answered - done),
        not_forwarded=len(answered - received.keys()),
    )
    assert in_flight, "nothing was in flight at SIGTERM: the test proves nothing"
    assert (len(last) - 1) * HANDLER_SECONDS < drain < SHUTDOWN_TIMEOUT + 3
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -15).
    assert code in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log
    assert "did not finish" not in log
    assert load.failures == []
    assert answered <= done, "answered events not handled before the exit"
    assert answered <= received.keys(), "answered events not forwarded before the exit"
    assert not pending_ids(spool)


# -- a hanging broker at shutdown ----------------------------------------------------------------
#
# uvicorn waits for a request's background tasks (the flush, its sends) before it runs the
# lifespan's shutdown, so only `--timeout-graceful-shutdown` bounds that wait: it cancels the
# flush, and the spool keeps what was not sent for the next process.


def test_a_flush_cancelled_at_shutdown_leaves_unsent_events_in_the_spool(
    moto: Moto, proxy: Proxy, tmp_path: Path
) -> None:
    queue_url = moto.queue("faults-cancelled")
    spool, handled = tmp_path / "events.sqlite3", tmp_path / "handled.txt"
    env = {**app_env(spool, queue_url, proxy.endpoint), HANDLED_ENV: str(handled)}
    grace = ("--timeout-graceful-shutdown", "1")  # then uvicorn cancels the request tasks
    with Consumer(moto, queue_url) as queue:
        with running_server(env, tmp_path / "cancelled.log", *grace) as server:
            proxy.stall()  # the broker hangs; the handlers take 25 x 0.2 s
            with httpx.Client(base_url=server.url, timeout=10) as client:
                ids = set(place(client, 25))
            wait_for(lambda: proxy.held, 10, "sends held by the hanging broker")
            stop(server, within=10)
        assert pending_ids(spool) == ids  # not sent: the next process sends them
        proxy.heal()
        with running_server(env, tmp_path / "restarted.log"):
            assert not queue.wait_for(ids, 30)


def test_sigterm_while_the_broker_hangs_exits_within_the_graceful_timeout(
    moto: Moto, proxy: Proxy, tmp_path: Path
) -> None:
    queue_url = moto.queue("faults-hanging")
    spool = tmp_path / "events.sqlite3"
    env = app_env(spool, queue_url, proxy.endpoint)
    grace = ("--timeout-graceful-shutdown", "2")
    with running_server(env, tmp_path / "s.log", *grace) as server:
        proxy.stall()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            ids = set(place(client, 10))
        wait_for(lambda: proxy.held, 10, "sends held by the hanging broker")
        stop(server, within=2 + SHUTDOWN_TIMEOUT + 3)
    assert pending_ids(spool) == ids  # not sent: left for the next process
