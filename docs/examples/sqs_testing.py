"""Testing an app that forwards to SQS: moto's server as the queue, real HTTP in between.

Run with pytest; needs ``moto[server]``. Uses the app of ``examples/forward_sqs.py``.
"""

import asyncio
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from moto.server import ThreadedMotoServer

from examples.forward_sqs import create_app, create_queue, receive_events


# --8<-- [start:fixture]
@pytest.fixture(scope="session")
def sqs_endpoint() -> Iterator[str]:
    """moto's SQS, on a free port of 127.0.0.1, for the whole test session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def fake_aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto accepts any credentials; never let a test find real ones."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # --8<-- [end:fixture]


# --8<-- [start:test]
def test_placed_orders_reach_the_queue(sqs_endpoint: str) -> None:
    queue_url = asyncio.run(create_queue("orders-test", endpoint_url=sqs_endpoint))
    app = create_app(queue_url, endpoint_url=sqs_endpoint)

    with TestClient(app) as client:  # leaving the block closes the SQS client
        client.post("/orders", json={"item": "book", "customer": "ada"})

    [event] = asyncio.run(receive_events(queue_url, endpoint_url=sqs_endpoint))
    assert event.name == "order.placed"
    assert event.payload == {"order_id": 1, "item": "book", "customer": "ada"}
    # --8<-- [end:test]
