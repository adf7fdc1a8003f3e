"""docs/examples/fanout.py, the example of docs/forwarders-sns-eventbridge.md, on moto.

The orders API publishes to an SNS topic and puts on an EventBridge bus; one queue is
subscribed to the topic, another is the target of the bus's rule; the example's worker
reads each queue and ships every order once per queue, by the id the API returned.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from types import ModuleType

import pytest
from fastapi.testclient import TestClient

from tests._support import ROOT, load_module, until
from tests.forwarders._fanout import bus_with_rule, subscribed_topic
from tests.forwarders._moto import KEY_ID, REGION, SECRET, Moto, running_moto

AWS = {
    "region_name": REGION,
    "aws_access_key_id": KEY_ID,
    "aws_secret_access_key": SECRET,
}


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with running_moto() as server:
        yield server


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_module(ROOT / "docs/examples/fanout.py", monkeypatch, "docs_fanout")


async def ship_all(example: ModuleType, moto: Moto, queue_url: str, count: int) -> None:
    worker = example.create_worker(
        queue_url, endpoint_url=moto.endpoint, wait_time_seconds=1, **AWS
    )
    async with worker:
        await until(lambda: worker.stats.handled == count, timeout=20)


@pytest.mark.slow
def test_orders_reach_both_services_and_each_worker_ships_them_once(
    moto: Moto, example: ModuleType
) -> None:
    from_sns, from_rule = moto.queue("from-sns"), moto.queue("from-rule")
    topic = asyncio.run(subscribed_topic(moto, from_sns, raw=False))
    bus_name = asyncio.run(bus_with_rule(moto, from_rule, {"source": ["com.example.shop"]}))
    app = example.create_app(topic, bus_name, endpoint_url=moto.endpoint, **AWS)
    with TestClient(app) as client:
        ids = [
            client.post("/orders", json={"item": "book", "customer": name}).json()["event_id"]
            for name in ("ada", "bob", "cy")
        ]
    asyncio.run(ship_all(example, moto, from_sns, 3))
    asyncio.run(ship_all(example, moto, from_rule, 3))
    assert Counter(example.shipped) == dict.fromkeys(ids, 2)  # once per queue


def test_the_fifo_forwarder_is_configured(example: ModuleType) -> None:
    assert example.fifo.fifo
    assert example.fifo.destination == "orders.fifo"
