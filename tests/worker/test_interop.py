"""A worker consumes events that other producers wrote, through real brokers (issue 18).

The events are made by the CloudEvents Python SDK (``cloudevents``), not by this library:
structured JSON (``JSONFormat``, ``data_base64`` for bytes data) sent to moto's SQS server,
and published to Google's Pub/Sub emulator in both modes of Google's CloudEvents binding
(structured: ``Content-Type: application/cloudevents+json`` and the event in ``data``;
binary: ``ce-*`` attributes, which the SDK's HTTP binding writes as the Pub/Sub binding
names them). `tests/test_wire_interop.py` checks the decoding of each shape in detail.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from cloudevents.core.bindings.http import to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.worker import Backoff, PubSubSource, Worker, WorkerStats
from tests._pubsub import PROJECT, Channel, Emulator
from tests._support import until
from tests.forwarders._moto import Moto
from tests.worker._helpers import counts, create_queue, send_raw

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TIME = datetime(2026, 11, 24, 5, 39, 1, tzinfo=UTC)


def cloudevent(event_id: str, data: Any, datacontenttype: str | None = None) -> CloudEvent:
    """An ``order.placed`` CloudEvent, made by the SDK."""
    attributes: dict[str, Any] = {"type": "order.placed", "source": "/shop", "id": event_id}
    attributes["time"] = TIME
    if datacontenttype is not None:
        attributes["datacontenttype"] = datacontenttype
    return CloudEvent(attributes, data)


def recording_bus() -> tuple[EventBus, dict[str, Any]]:
    """A bus whose one handler records each event's payload by its id."""
    bus = EventBus()
    payloads: dict[str, Any] = {}

    @bus.on("order.*")
    def record(event: Event) -> None:
        payloads[event.id] = event.payload

    return bus, payloads


async def test_sqs_events_of_the_cloudevents_sdk(
    moto: Moto, caplog: pytest.LogCaptureFixture
) -> None:
    queue_url = await create_queue(moto, "interop")
    sent = {
        # finding 1: a datacontenttype with parameters
        "params": cloudevent("params", {"id": 1}, "application/json; charset=utf-8"),
        # finding 2: bytes data, which the SDK writes as data_base64
        "base64": cloudevent("base64", b'{"id": 2}', "application/json"),
        "text": cloudevent("text", "café ☕".encode(), "text/plain; charset=utf-8"),
        "png": cloudevent("png", b"\x89PNG\r\n", "image/png"),  # no JSON payload: refused
    }
    for event in sent.values():
        await send_raw(moto, queue_url, JSONFormat().write(event).decode())
    bus, payloads = recording_bus()
    source = moto.source(queue_url, visibility_backoff=Backoff(initial=0))
    async with Worker(bus, source, on_undecodable="delete") as worker:
        await until(lambda: worker.stats.handled + worker.stats.undecodable == 4, timeout=20)
    assert worker.stats == WorkerStats(received=4, handled=3, undecodable=1)
    assert payloads == {"params": {"id": 1}, "base64": {"id": 2}, "text": "café ☕"}
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "unsupported datacontenttype 'image/png'" in line
    assert line.endswith("deleting it")
    assert await counts(moto, queue_url) == (0, 0)


def subscription_path(channel: Channel) -> str:
    return f"projects/{PROJECT}/subscriptions/{channel.subscription}"


def publish(channel: Channel, data: bytes, attributes: dict[str, str]) -> str:
    """Publish one message through the emulator's REST API, as any producer can; its id."""
    url = f"http://{channel.emulator.host}/v1/{channel.topic}:publish"
    message = {"data": base64.b64encode(data).decode(), "attributes": attributes}
    response = httpx.post(url, json={"messages": [message]})
    response.raise_for_status()
    message_id: str = response.json()["messageIds"][0]
    return message_id


def structured(event: CloudEvent) -> tuple[bytes, dict[str, str]]:
    message = to_structured(event, JSONFormat())
    return message.body, dict(message.headers)


def binary(event: CloudEvent) -> tuple[bytes, dict[str, str]]:
    message = to_binary(event, JSONFormat())
    return message.body, dict(message.headers)


async def test_pubsub_events_in_both_modes_of_googles_binding(pubsub_emulator: Emulator) -> None:
    channel = pubsub_emulator.channel()
    data, attributes = binary(cloudevent("upper", {"id": 3}, "application/json"))
    messages = [
        # finding 1: a content-type with parameters
        binary(cloudevent("params", {"id": 1}, "application/json; charset=utf-8")),
        # finding 2: data_base64 in a structured event
        structured(cloudevent("base64", b'{"id": 2}', "application/json")),
        # finding 3: attribute names in another case, structured mode, text/plain
        (data, {name.upper(): value for name, value in attributes.items()}),
        structured(cloudevent("structured", {"id": 4}, "application/json")),
        binary(cloudevent("text", "42", "text/plain")),
    ]
    for body, attrs in messages:
        publish(channel, body, attrs)
    bus, payloads = recording_bus()
    source = PubSubSource(subscription_path(channel), emulator_host=pubsub_emulator.host)
    async with Worker(bus, source) as worker:
        await until(lambda: worker.stats.handled == 5, timeout=20)
    assert worker.stats == WorkerStats(received=5, handled=5)
    assert payloads == {
        "params": {"id": 1},
        "base64": {"id": 2},
        "upper": {"id": 3},
        "structured": {"id": 4},
        "text": "42",
    }
    assert channel.pull(1, timeout=1.5) == []


async def test_an_undecodable_pubsub_message_is_logged_as_what_happens_to_it(
    pubsub_emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """No dead-letter policy: given back, the message comes back; the log line says so."""
    channel = pubsub_emulator.channel()
    message_id = publish(channel, *binary(cloudevent("png", b"\x89PNG\r\n", "image/png")))
    source = PubSubSource(
        subscription_path(channel),
        emulator_host=pubsub_emulator.host,
        nack_backoff=Backoff(initial=0.1, maximum=0.1),
    )
    async with Worker(EventBus(), source, on_undecodable="retry") as worker:
        await until(lambda: worker.stats.undecodable >= 2, timeout=20)  # it came back
        await asyncio.sleep(0)
    lines = [r.getMessage() for r in caplog.records if message_id in r.getMessage()]
    assert len(lines) >= 2
    for line in lines:
        assert "unsupported datacontenttype 'image/png'" in line
        assert "dead-letter queue will take it" not in line
        assert line.endswith(
            f"giving it back (on_undecodable='retry'): {source.name} delivers it again, "
            "forever unless a dead-letter policy moves it"
        )
