"""The "Consuming events from other producers" page: each format it shows, as it arrives.

Every message is made by software other than this library, or shaped as AWS documents it:
the CloudEvents SDK writes the CloudEvents (structured JSON on SQS, both modes of Google's
Pub/Sub binding), and the SNS and EventBridge envelopes are those of
`tests/worker/test_aws_envelopes.py`. Each is decoded as a worker decodes it and handed to
the example's handlers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cloudevents.core.bindings.http import to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from fastapi_eventbus import Event
from fastapi_eventbus.wire import decode_message
from tests._support import load_module
from tests.worker.test_aws_envelopes import eventbridge_event, sns_notification, sqs_message

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.anyio


def invoice(data: Any = None) -> CloudEvent:
    attributes = {
        "type": "com.example.billing.invoice.paid",
        "source": "https://billing.example.com",
        "id": "inv-1",
        "time": datetime(2026, 12, 1, tzinfo=UTC),
        "subject": "invoices/42",
    }
    return CloudEvent(attributes, data if data is not None else {"id": 42})


def pubsub(message: Any) -> dict[str, Any]:
    return {"data": message.body, "attributes": dict(message.headers)}


MESSAGES: dict[str, Mapping[str, Any]] = {
    "CloudEvents SDK on SQS": sqs_message(JSONFormat().write(invoice()).decode()),
    "data_base64 on SQS": sqs_message(JSONFormat().write(invoice(b'{"id": 42}')).decode()),
    "Pub/Sub binary": pubsub(to_binary(invoice(), JSONFormat())),
    "Pub/Sub structured": pubsub(to_structured(invoice(), JSONFormat())),
    "SNS of a CloudEvent": sqs_message(
        sns_notification(JSONFormat().write(invoice()).decode(), {})
    ),
}


@pytest.mark.parametrize("shape", sorted(MESSAGES))
async def test_a_cloudevent_of_another_service(shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    example = load_module(ROOT / "docs/examples/other_producers.py", monkeypatch)
    event = decode_message(MESSAGES[shape])
    assert isinstance(event, Event)
    assert await example.bus.handle(event) == []
    assert example.seen == [
        "com.example.billing.invoice.paid 42 invoices/42 from https://billing.example.com"
    ]


@pytest.mark.parametrize("wrapped", [False, True], ids=["on SQS", "through SNS"])
async def test_an_eventbridge_event(wrapped: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    example = load_module(ROOT / "docs/examples/other_producers.py", monkeypatch)
    body = eventbridge_event(detail={"id": 7})
    message = sqs_message(sns_notification(body, {}) if wrapped else body)
    assert await example.bus.handle(decode_message(message)) == []
    assert example.seen == ["Order Placed 7 from com.shop.orders"]
    assert json.loads(body)["detail-type"] == "Order Placed"
