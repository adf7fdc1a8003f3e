"""``examples/forward_sqs.py`` and the SQS docs examples, run against moto's SQS server."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from examples.forward_sqs import create_app, log_undelivered, receive_events
from fastapi_eventbus import Event, ForwarderError
from fastapi_eventbus.forwarders import DeadLetter, Retry
from tests._support import ROOT, load_module
from tests.forwarders._moto import KEY_ID, REGION, SECRET, Moto, running_moto


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with running_moto() as server:
        yield server


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example reads botocore's usual variables: point them at moto's fake account."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_SQS", raising=False)


def test_placed_orders_arrive_as_events(moto: Moto) -> None:
    queue_url = moto.queue("orders")
    with TestClient(create_app(queue_url, endpoint_url=moto.endpoint)) as client:
        for item in ("book", "lamp"):
            response = client.post("/orders", json={"item": item, "customer": "ada"})
            assert response.status_code == 201
    events = asyncio.run(receive_events(queue_url, endpoint_url=moto.endpoint, count=2))
    assert sorted((e.name, e.source, e.payload["item"]) for e in events) == [
        ("order.placed", "//shop.example.com/orders", "book"),
        ("order.placed", "//shop.example.com/orders", "lamp"),
    ]
    assert sorted(e.payload["order_id"] for e in events) == [1, 2]


def test_the_app_does_not_start_with_a_queue_that_does_not_exist(moto: Moto) -> None:
    queue_url = moto.endpoint + "/123456789012/no-such-queue"
    app = create_app(queue_url, endpoint_url=moto.endpoint)  # verify_on_start=True
    with pytest.raises(ForwarderError, match="NonExistentQueue"), TestClient(app):
        pytest.fail("the app started")


def test_the_queue_and_endpoint_can_come_from_the_environment(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue_url = moto.queue("orders")
    monkeypatch.setenv("ORDERS_QUEUE_URL", queue_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", moto.endpoint)  # botocore's own variable
    with TestClient(create_app()) as client:
        client.post("/orders", json={"item": "kettle", "customer": "bob"})
    [event] = asyncio.run(receive_events(queue_url, count=1))
    assert event.payload == {"order_id": 1, "item": "kettle", "customer": "bob"}


def test_undelivered_events_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    events = (Event(name="order.placed"), Event(name="order.placed"))
    log_undelivered(DeadLetter("SQSForwarder", events, "gave up after 5 attempt(s)"))
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == (
        f"not sent to SQS (gave up after 5 attempt(s)): {events[0].id}, {events[1].id}"
    )


def test_the_example_runs_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, "examples/forward_sqs.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "POST /orders 'kettle' -> 201 {'id': 3}" in lines
    received = [line for line in lines if line.startswith("received order.placed")]
    assert [line.split(": ", 1)[1].rsplit(" (id", 1)[0] for line in received] == [
        "{'order_id': 1, 'item': 'book', 'customer': 'ada'}",
        "{'order_id': 2, 'item': 'lamp', 'customer': 'ada'}",
        "{'order_id': 3, 'item': 'kettle', 'customer': 'ada'}",
    ]
    assert all("from //shop.example.com/orders" in line for line in received)


def test_docs_options_build_the_forwarders_they_describe(monkeypatch: pytest.MonkeyPatch) -> None:
    options = load_module(ROOT / "docs/examples/sqs_options.py", monkeypatch)
    assert options.fifo.fifo
    assert options.customer_of(Event(name="order.placed", payload={"customer": 7})) == "7"
    assert options.local.queue_url.startswith("http://localhost:4566/")
    assert options.patient.retry == Retry(initial_delay=0.5, max_delay=10, total_timeout=120)
    assert options.patient.max_message_bytes == 1_048_576
    assert options.patient.name == "orders-queue"
    assert "test" not in repr(options.local).replace("localhost", "")


def test_docs_testing_example_passes_under_pytest() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "docs/examples/sqs_testing.py",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
