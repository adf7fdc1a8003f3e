"""``examples/worker``: the web app forwards to moto's SQS, the CLI's worker handles."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from fastapi.testclient import TestClient

from examples.worker.app import OrderPlaced, create_app, create_worker_app
from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.worker import Backoff, PubSubSource, SQSSource, Worker, WorkerStats
from tests._support import ROOT, load_module
from tests.forwarders._moto import Moto
from tests.worker._helpers import AWS_ENV, create_queue, wait_for, worker_process

pytestmark = pytest.mark.slow


@pytest.fixture
def shop(moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example's environment: a queue on moto and a database file; the database path."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", moto.endpoint)  # botocore's own variable
    monkeypatch.setenv("ORDERS_QUEUE_URL", asyncio.run(create_queue(moto, "orders")))
    monkeypatch.setenv("ORDERS_DB", str(tmp_path / "orders.sqlite3"))
    return tmp_path / "orders.sqlite3"


def receipts(db: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT order_id, email, pid FROM receipts ORDER BY order_id")
        return rows.fetchall()


def test_the_worker_sends_the_receipts_of_the_web_apps_orders(shop: Path, tmp_path: Path) -> None:
    options = ["--sqs", os.environ["ORDERS_QUEUE_URL"], "--wait-time", "1"]
    target = "examples.worker.app:create_worker_app"
    with worker_process(target, *options, log=tmp_path / "worker.log") as worker:
        with TestClient(create_app()) as client:
            for item in ("book", "lamp"):
                response = client.post("/orders", json={"item": item, "email": "ada@example.com"})
                assert response.status_code == 201
        wait_for(lambda: len(receipts(shop)) == 2, what="two receipts")
        assert worker.terminate() == 0, worker.output()
    pid = worker.process.pid
    assert receipts(shop) == [(1, "ada@example.com", pid), (2, "ada@example.com", pid)]


def test_the_web_app_handles_nothing_itself(shop: Path) -> None:
    with TestClient(create_app()) as client:
        client.post("/orders", json={"item": "book", "email": "ada@example.com"})
    assert receipts(shop) == []


@pytest.mark.anyio
async def test_a_second_delivery_of_an_event_is_harmless(shop: Path) -> None:
    app = create_worker_app()
    bus: EventBus = app.state.fastapi_eventbus
    order = OrderPlaced(order_id=7, item="book", email="a@b.c")
    event = Event(name="order.placed", payload=order.model_dump())
    async with app.router.lifespan_context(app):
        assert await bus.handle(event) == []
        assert await bus.handle(event) == []  # redelivered: same event id
    assert [row[:2] for row in receipts(shop)] == [(7, "a@b.c")]


def test_the_demo_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.worker.demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "POST /orders 'kettle' -> 201 {'id': 3}" in result.stdout
    assert "receipt for order 3 to ada@example.com, written by the worker" in result.stdout
    assert result.stdout.endswith("worker stopped with exit code 0\n")


# -- docs/examples/worker_python.py ----------------------------------------------------------


@pytest.fixture
def docs_example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh copy of ``docs/examples/worker_python.py`` (``docs/`` is not a package)."""
    path = ROOT / "docs/examples/worker_python.py"
    return load_module(path, monkeypatch, "docs_worker_python")


def test_the_documented_workers_are_configured_as_shown(
    docs_example: ModuleType, shop: Path
) -> None:
    worker: Worker = docs_example.create_worker(os.environ["ORDERS_QUEUE_URL"])
    assert (worker.concurrency, worker.shutdown_timeout) == (10, 30)
    assert (worker.on_undecodable, worker.on_unhandled) == ("retry", "retry")
    assert isinstance(worker.source, SQSSource)
    assert worker.source.visibility_backoff == Backoff(initial=5, maximum=900)
    pubsub: Worker = docs_example.create_pubsub_worker()
    assert isinstance(pubsub.source, PubSubSource)
    assert pubsub.source.subscription == "projects/my-shop/subscriptions/orders-worker"


@pytest.mark.anyio
async def test_the_documented_test_helper_handles_queued_orders(
    docs_example: ModuleType, moto: Moto, shop: Path
) -> None:
    with TestClient(create_app()) as client:
        client.post("/orders", json={"item": "book", "email": "ada@example.com"})
    queue_url = os.environ["ORDERS_QUEUE_URL"]
    stats: WorkerStats = await docs_example.handle_queued(queue_url, moto.endpoint, count=1)
    assert stats.handled == 1
    assert [row[:2] for row in receipts(shop)] == [(1, "ada@example.com")]
