"""The worker in another process (the CLI), against moto's SQS server.

A web app forwards ``order.placed`` events through `SQSForwarder`; a worker started
with ``python -m fastapi_eventbus worker`` runs `tests.worker.shop`'s handler on
them, which writes to an SQLite file through a ``yield`` dependency; the tests read
the file and the queues.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fastapi_eventbus.wire import decode_message
from tests.forwarders._moto import Moto
from tests.worker._helpers import (
    counts,
    create_queue,
    peek,
    queue_with_dlq,
    send_raw,
    sqs_options,
    wait_for,
    worker_process,
)
from tests.worker.shop import DB_ENV, OVERRIDE_ENV, execute, web_app

pytestmark = pytest.mark.slow

WORKER_APP = "tests.worker.shop:worker_app"


def place(moto: Moto, queue_url: str, *orders: dict[str, object]) -> list[str]:
    """POST each order to the web app (which forwards it to *queue_url*); the event ids."""
    with TestClient(web_app(moto.forwarder(queue_url))) as client:
        return [client.post("/orders", json=order).json()["id"] for order in orders]


def attempts(db: Path, event_id: str) -> int:
    """How many times the handler started on *event_id*."""
    ((count,),) = execute(db, "SELECT COUNT(*) FROM attempts WHERE event_id = ?", event_id)
    return int(count)


# -- one worker process, several things to check ------------------------------------------


@dataclass(frozen=True)
class Run:
    """What one worker process did with three orders and a message that is not an event."""

    ids: dict[str, str]
    raw_id: str
    db: Path
    pid: int
    log: str
    exit_code: int
    left: tuple[int, int]


@pytest.fixture(scope="module")
def run(moto: Moto, tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("worker")
    db = tmp / "shop.sqlite3"
    queue_url = asyncio.run(create_queue(moto, "orders"))
    options = [*sqs_options(moto, queue_url), "--on-undecodable", "delete", "--concurrency", "4"]
    env = {DB_ENV: str(db), OVERRIDE_ENV: "1"}
    with worker_process(WORKER_APP, *options, log=tmp / "worker.log", env=env) as worker:
        orders: dict[str, dict[str, object]] = {"book": {"item": "book"}, "lamp": {"item": "lamp"}}
        orders["flaky"] = {"item": "kettle", "fail_times": 1}
        ids = dict(zip(orders, place(moto, queue_url, *orders.values()), strict=True))
        raw_id = asyncio.run(send_raw(moto, queue_url, "not a CloudEvent"))
        wait_for(lambda: len(execute(db, "SELECT * FROM handled")) == 3, what="3 handled")
        wait_for(lambda: raw_id in worker.output(), what="the undecodable message's log line")
        wait_for(lambda: asyncio.run(counts(moto, queue_url)) == (0, 0), what="an empty queue")
        exit_code = worker.terminate()
        left = asyncio.run(counts(moto, queue_url))
    return Run(ids, raw_id, db, worker.process.pid, worker.output(), exit_code, left)


def test_the_worker_process_handles_each_forwarded_event_once(run: Run) -> None:
    rows = execute(run.db, "SELECT event_id, pid FROM handled")
    assert sorted(event_id for event_id, _ in rows) == sorted(run.ids.values())
    assert {pid for _, pid in rows} == {run.pid} != {os.getpid()}
    assert run.left == (0, 0)  # every message deleted


def test_a_failed_handler_is_redelivered_and_succeeds_on_the_second_try(run: Run) -> None:
    assert attempts(run.db, run.ids["flaky"]) == 2
    assert attempts(run.db, run.ids["book"]) == 1
    assert "injected failure, attempt 1" in run.log
    assert f"event 'order.placed' (id={run.ids['flaky']}) failed" in run.log


def test_dependency_overrides_of_the_app_apply_in_the_worker(run: Run) -> None:
    assert {label for (label,) in execute(run.db, "SELECT label FROM handled")} == {"overridden"}


def test_the_lifespan_runs_around_the_worker(run: Run) -> None:
    assert execute(run.db, "SELECT what, pid FROM lifecycle") == [
        ("startup", run.pid),
        ("shutdown", run.pid),
    ]


def test_an_undecodable_message_is_logged_and_deleted_by_policy(run: Run) -> None:
    line = next(line for line in run.log.splitlines() if run.raw_id in line)
    assert "ERROR" in line
    assert "is not an event" in line
    assert "deleting it" in line


def test_sigterm_stops_the_worker_with_exit_code_0(run: Run) -> None:
    assert run.exit_code == 0, run.log
    assert "SIGTERM: stopping" in run.log
    assert "worker stopped" in run.log


# -- dead letters --------------------------------------------------------------------------


def test_a_poison_message_reaches_the_dead_letter_queue(
    moto: Moto, db: Path, tmp_path: Path
) -> None:
    queue_url, dlq_url = asyncio.run(queue_with_dlq(moto, "poison", max_receive_count=2))
    with worker_process(
        WORKER_APP, *sqs_options(moto, queue_url), log=tmp_path / "w.log"
    ) as worker:
        (poison,) = place(moto, queue_url, {"item": "bomb", "fail_times": 99})
        raw_id = asyncio.run(send_raw(moto, queue_url, '{"not": "a CloudEvent"}'))
        dead: list[str] = []

        def two_dead_letters() -> bool:
            dead.extend(m["MessageId"] for m in asyncio.run(peek(moto, dlq_url)))
            return len(dead) == 2

        wait_for(two_dead_letters, what="two messages in the dead-letter queue")
        assert worker.terminate() == 0
    assert raw_id in dead
    assert attempts(db, poison) == 2  # maxReceiveCount deliveries, then the queue moved it
    assert execute(db, "SELECT * FROM handled") == []
    assert (
        f"giving it back (on_undecodable='retry'): {queue_url.rsplit('/', 1)[-1]} delivers it "
        "again, forever unless a dead-letter policy moves it"
    ) in worker.output()
    assert asyncio.run(counts(moto, queue_url)) == (0, 0)


def test_the_dead_letter_is_the_forwarded_message(moto: Moto, db: Path, tmp_path: Path) -> None:
    queue_url, dlq_url = asyncio.run(queue_with_dlq(moto, "poison", max_receive_count=1))
    with worker_process(
        WORKER_APP, *sqs_options(moto, queue_url), log=tmp_path / "w.log"
    ) as worker:
        (poison,) = place(moto, queue_url, {"item": "bomb", "fail_times": 99})
        (message,) = wait_for(lambda: asyncio.run(peek(moto, dlq_url)), what="a dead letter")
        assert worker.terminate() == 0
    assert decode_message(message).id == poison


# -- SIGTERM while a handler runs ----------------------------------------------------------


@pytest.mark.parametrize(
    ("shutdown_timeout", "finishes"),
    [("10", True), ("0.2", False)],
    ids=["finished-and-deleted", "given-back-and-redelivered"],
)
def test_sigterm_during_processing_loses_nothing(
    moto: Moto, db: Path, tmp_path: Path, shutdown_timeout: str, finishes: bool
) -> None:
    # A 30 s visibility timeout: only the worker giving the message back makes it visible soon.
    queue_url = asyncio.run(create_queue(moto, "slow", {"VisibilityTimeout": "30"}))
    options = [*sqs_options(moto, queue_url), "--shutdown-timeout", shutdown_timeout]
    with worker_process(WORKER_APP, *options, log=tmp_path / "w.log") as worker:
        (event_id,) = place(moto, queue_url, {"item": "slow", "sleep": 1.5})
        wait_for(lambda: attempts(db, event_id) == 1, what="the handler to start")
        assert worker.terminate() == 0, worker.output()
    handled = execute(db, "SELECT event_id FROM handled")
    if finishes:
        assert handled == [(event_id,)]
        assert asyncio.run(counts(moto, queue_url)) == (0, 0)
    else:
        assert handled == []
        assert "did not finish within 0.2s" in worker.output()
        (message,) = asyncio.run(peek(moto, queue_url, wait=2))
        assert decode_message(message).id == event_id


def test_a_second_signal_stops_without_waiting(moto: Moto, db: Path, tmp_path: Path) -> None:
    queue_url = asyncio.run(create_queue(moto, "slow", {"VisibilityTimeout": "30"}))
    options = [*sqs_options(moto, queue_url), "--shutdown-timeout", "30"]
    with worker_process(WORKER_APP, *options, log=tmp_path / "w.log") as worker:
        (event_id,) = place(moto, queue_url, {"item": "slow", "sleep": 1.0})
        wait_for(lambda: attempts(db, event_id) == 1, what="the handler to start")
        worker.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM: stopping" in worker.output(), what="the first signal")
        assert worker.terminate() == 1, worker.output()
    assert "second signal: stopping now" in worker.output()
    assert "Error: stopped by a second signal" in worker.output()
    assert execute(db, "SELECT event_id FROM handled") == []
    (message,) = asyncio.run(peek(moto, queue_url, wait=2))  # given back at once
    assert decode_message(message).id == event_id
