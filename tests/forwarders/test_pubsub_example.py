"""examples/forward_pubsub.py, against the Pub/Sub emulator it knows how to start."""

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from examples import forward_pubsub
from examples.forward_pubsub import create_app, create_topic, production_forwarder, pull
from fastapi_eventbus import Event
from fastapi_eventbus.forwarders import DeadLetter
from fastapi_eventbus.wire import decode_message
from tests.conftest import missing_peer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def emulator_host() -> Iterator[str]:
    with ExitStack() as stack:
        try:
            host = stack.enter_context(forward_pubsub.pubsub_emulator())
        except (FileNotFoundError, RuntimeError) as exc:
            missing_peer(str(exc))
        yield host


# --8<-- [start:test]
@pytest.mark.slow
def test_orders_are_forwarded_with_the_customer_as_ordering_key(emulator_host: str) -> None:
    topic, subscription = create_topic(emulator_host, f"orders-{uuid.uuid4().hex[:8]}")
    with TestClient(create_app(topic, emulator_host=emulator_host)) as client:
        ids = [
            client.post("/orders", json={"customer": "ada", "item": item}).json()["event_id"]
            for item in ("book", "kettle")
        ]

    received = pull(emulator_host, subscription, count=2)
    events = [decode_message(message) for message in received]
    assert [event.id for event in events] == ids  # same ordering key: in order
    assert [event.payload["item"] for event in events] == ["book", "kettle"]
    assert {message["message"]["orderingKey"] for message in received} == {"ada"}
    assert {event.source for event in events} == {"//shop.example.com/orders"}


# --8<-- [end:test]


@pytest.mark.slow
@pytest.mark.parametrize("own_emulator", [True, False], ids=["starts-emulator", "env-emulator"])
def test_the_script_runs(emulator_host: str, own_emulator: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PUBSUB_EMULATOR_HOST"}
    if not own_emulator:
        env["PUBSUB_EMULATOR_HOST"] = emulator_host
    result = subprocess.run(
        [sys.executable, "examples/forward_pubsub.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert ("started the Pub/Sub emulator on 127.0.0.1:" in result.stdout) is own_emulator
    assert (lines[-1] == "stopped the Pub/Sub emulator") is own_emulator
    assert "POST /orders 'kettle' -> 201" in lines
    source = "source=//shop.example.com/orders"
    expected = [
        f"pulled order.placed key=ada data={{'customer': 'ada', 'item': 'book'}} {source}",
        f"pulled order.placed key=bob data={{'customer': 'bob', 'item': 'lamp'}} {source}",
        f"pulled order.placed key=ada data={{'customer': 'ada', 'item': 'kettle'}} {source}",
    ]
    pulled = [line for line in lines if line.startswith("pulled ")]
    assert sorted(pulled) == sorted(expected)
    assert pulled.index(expected[0]) < pulled.index(expected[2])  # ordering key "ada"


@pytest.mark.anyio
async def test_the_production_settings() -> None:
    forwarder = production_forwarder()
    assert forwarder.topic == "projects/my-shop/topics/orders"
    assert forwarder.api_root == "https://europe-west1-pubsub.googleapis.com/v1"
    assert not forwarder.emulated  # credentials are used
    event = Event(name="order.placed", payload={"customer": "ada"})
    assert forwarder.ordering_key is not None
    assert forwarder.ordering_key(event) == "ada"
    assert forwarder.dead_letter is forward_pubsub.keep_undelivered
    assert forwarder.verify_on_start
    assert forwarder.retry.attempts is None  # tries for its whole total_timeout
    await forward_pubsub.keep_undelivered(DeadLetter(forwarder.name, (event,), "test"))
    undelivered = forward_pubsub.UNDELIVERED
    assert undelivered == [event]
    undelivered.clear()
