"""Extension attributes travel with an event: emitted, forwarded, received, forwarded again.

Issue 18, item 4: ``subject`` and custom extension attributes were dropped because `Event`
had nowhere to keep them. Through real brokers: moto's SQS server (structured mode: the
JSON keeps each value's type) and Google's Pub/Sub emulator (binary mode: ``ce-*``
attributes, whose values are strings).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cloudevents.core.formats.json import JSONFormat
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_eventbus import Event, EventBus, Extensions, get_bus
from fastapi_eventbus.forwarders.pubsub import PubSubForwarder
from fastapi_eventbus.spool import Spool
from fastapi_eventbus.worker import PubSubSource, Worker
from tests._pubsub import PROJECT, Emulator
from tests._support import until
from tests.forwarders._moto import Moto
from tests.worker._helpers import create_queue, peek

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

EXTENSIONS: Extensions = {"subject": "orders/7", "tenant": "acme", "priority": 5, "urgent": True}


def shop(bus: EventBus) -> FastAPI:
    """An app whose ``POST /orders`` emits ``order.placed`` with `EXTENSIONS`."""
    app = FastAPI()
    bus.install(app)

    @app.post("/orders")
    def place(bus: EventBus = Depends(get_bus)) -> dict[str, str]:
        return {"id": bus.emit("order.placed", {"n": 7}, extensions=EXTENSIONS).id}

    return app


def recording(bus: EventBus, pattern: str = "order.*") -> dict[str, Event]:
    seen: dict[str, Event] = {}
    bus.on(pattern)(lambda event: seen.__setitem__(event.id, event))
    return seen


async def test_sqs_carries_extensions_to_the_worker_and_onwards(moto: Moto) -> None:
    """Emitted in a request, read by a worker, forwarded again by its handler: kept all along."""
    first, second = await create_queue(moto, "ext-1"), await create_queue(moto, "ext-2")
    web = EventBus()
    web.forward("order.*", moto.forwarder(first))
    local = recording(web)
    with TestClient(shop(web)) as client:
        event_id = client.post("/orders").json()["id"]
    assert local[event_id].extensions == EXTENSIONS  # the local handler sees them too

    async with moto.client() as sqs:  # what any CloudEvents consumer reads, left visible
        answer = await sqs.receive_message(QueueUrl=first, VisibilityTimeout=0)
    read = JSONFormat().read(None, answer["Messages"][0]["Body"])
    assert {name: read.get_extension(name) for name in ("tenant", "priority", "urgent")} == {
        "tenant": "acme",
        "priority": 5,
        "urgent": True,
    }
    assert read.get_subject() == "orders/7"

    worker_bus = EventBus()
    relay = worker_bus.forward("audit.*", moto.forwarder(second))
    received = recording(worker_bus)

    @worker_bus.on("order.placed")
    async def audit(event: Event, bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("audit.order", event.payload, extensions=event.extensions)

    async with Worker(worker_bus, moto.source(first, visibility_timeout=5)) as worker:
        await until(lambda: worker.stats.handled == 1, timeout=20)
    await relay.aclose()
    assert received[event_id].extensions == EXTENSIONS
    (again,) = await peek(moto, second)
    body = json.loads(again["Body"])
    assert {name: body[name] for name in EXTENSIONS} == EXTENSIONS
    assert body["type"] == "audit.order"


async def test_pubsub_carries_extensions_as_attributes(pubsub_emulator: Emulator) -> None:
    channel = pubsub_emulator.channel()
    publisher = EventBus()
    publisher.forward("order.*", PubSubForwarder(channel.topic, emulator_host=pubsub_emulator.host))
    sent = await publisher.publish("order.placed", {"n": 1}, extensions=EXTENSIONS)
    await publisher.close()
    bus = EventBus()
    received = recording(bus)
    source = PubSubSource(
        f"projects/{PROJECT}/subscriptions/{channel.subscription}",
        emulator_host=pubsub_emulator.host,
    )
    async with Worker(bus, source) as worker:
        await until(lambda: worker.stats.handled == 1, timeout=20)
    # Binary mode: attribute values are strings, in CloudEvents' canonical encoding.
    expected = {"subject": "orders/7", "tenant": "acme", "priority": "5", "urgent": "true"}
    assert received[sent.id].extensions == expected


async def test_the_spool_keeps_extensions(tmp_path: Path, moto: Moto) -> None:
    """An event sent again from the spool (after an outage, a crash) still carries them."""
    queue_url = await create_queue(moto, "ext-spool")
    spool = Spool(tmp_path / "spool.sqlite3")
    event = Event(name="order.placed", payload={"n": 1}, extensions=EXTENSIONS)
    spool.add([("sqs", event)])  # what emit wrote,
    spool.release()  # and the process that wrote it let go of at shutdown
    (row,) = spool.pending()
    assert row.event == event
    bus = EventBus(spool=spool)
    bus.forward("order.*", moto.forwarder(queue_url, name="sqs"))
    assert await bus.resend() == 1
    await bus.close()
    (message,) = await peek(moto, queue_url)
    body = json.loads(message["Body"])
    assert (body["id"], {name: body[name] for name in EXTENSIONS}) == (event.id, EXTENSIONS)
