"""A worker that also reads messages no CloudEvents producer wrote: a decode hook."""

import json
from collections.abc import Mapping
from typing import Any

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.worker import SQSSource, Worker

bus = EventBus()


# --8<-- [start:hook]
def decode_legacy(message: Mapping[str, Any]) -> Event | None:
    """fastapi-events' ``["name", payload]`` and plain ``{"event": name, ...}`` JSON bodies."""
    try:
        body = json.loads(message["Body"])  # an SQS message, as ReceiveMessage returns it
    except (KeyError, TypeError, ValueError):
        return None  # not ours: the built-in decoding reads it (or refuses it)
    same_id = {"id": message["MessageId"]}  # the same on every redelivery: handlers can dedupe
    if isinstance(body, list) and len(body) == 2 and isinstance(body[0], str):
        return Event(name=body[0], payload=body[1], **same_id)
    if isinstance(body, dict) and isinstance(body.get("event"), str):
        payload = {key: value for key, value in body.items() if key != "event"}
        return Event(name=body["event"], payload=payload, **same_id)
    return None  # a CloudEvent, an SNS notification, an EventBridge event: built-in


def create_worker(queue_url: str, **options: Any) -> Worker:
    return Worker(bus, SQSSource(queue_url, decode=decode_legacy, **options))


# --8<-- [end:hook]
