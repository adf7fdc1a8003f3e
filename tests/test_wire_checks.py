"""What a message from another producer must be before it is an event: JSON numbers, an
RFC 3339 time (made UTC), a usable name and id. Anything else is refused with its reason
(a `MessageDecodeError`: the worker logs it and follows ``on_undecodable``), never passed
to handlers changed or half-checked."""

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fastapi_eventbus import MessageDecodeError
from fastapi_eventbus.wire import decode_message

HEAD = '"specversion":"1.0","id":"e-1","source":"//billing","type":"invoice.paid"'


def sqs(body: str) -> dict[str, Any]:
    return {"MessageId": "m-1", "ReceiptHandle": "r", "Body": body, "MessageAttributes": {}}


def cloudevent(**members: Any) -> dict[str, Any]:
    """An SQS message holding a structured CloudEvent with *members* over the usual ones."""
    body = {"specversion": "1.0", "id": "e-1", "source": "//billing", "type": "invoice.paid"}
    return sqs(json.dumps({**body, **members}))


def pubsub(data: bytes, **attributes: str) -> dict[str, Any]:
    head = {"ce-specversion": "1.0", "ce-id": "p-1", "ce-source": "//x", "ce-type": "t"}
    return {"data": base64.b64encode(data).decode(), "attributes": {**head, **attributes}}


# -- numbers: JSON's, not Python's ------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        sqs("{" + HEAD + ',"data":{"a":NaN}}'),  # what json.dumps writes for nan by default
        sqs("{" + HEAD + ',"data":{"b":-Infinity}}'),
        sqs("{" + HEAD + ',"data":{"amount":1e400}}'),  # valid JSON, no float holds it
        pubsub(b'{"a": NaN}'),
    ],
    ids=["NaN", "-Infinity", "1e400", "pubsub-NaN"],
)
def test_a_number_json_cannot_carry_is_refused(message: dict[str, Any]) -> None:
    # Found: decoded as nan or inf, a payload `emit` itself refuses ("JSON cannot carry").
    with pytest.raises(MessageDecodeError, match="JSON cannot carry"):
        decode_message(message)


# -- time: RFC 3339, held in UTC --------------------------------------------------------------


def test_a_time_with_an_offset_is_held_in_utc() -> None:
    event = decode_message(cloudevent(time="2026-05-01T14:00:00+02:00"))
    # Found: kept with its +02:00 offset; `Event.time` is documented as UTC.
    assert event.time == datetime(2026, 5, 1, 12, tzinfo=UTC)
    assert event.time.utcoffset() == timedelta(0)
    assert event.time.tzinfo is UTC


@pytest.mark.parametrize(
    ("time", "error"),
    [
        ("2026-05-01T12:00:00", "no UTC offset"),  # found: a naive datetime
        ("2026-05-01", "no UTC offset"),  # found: naive midnight
        (1777777777, "must be an RFC 3339 string"),  # found: read as a Unix timestamp
        ("noon", "not an RFC 3339 timestamp"),
    ],
)
def test_a_time_that_is_not_rfc_3339_is_refused(time: object, error: str) -> None:
    with pytest.raises(MessageDecodeError, match=error):
        decode_message(cloudevent(time=time))


def test_a_pubsub_time_attribute_is_held_in_utc_too() -> None:
    event = decode_message(pubsub(b"1", **{"ce-time": "2026-05-01T07:00:00-05:00"}))
    assert event.time == datetime(2026, 5, 1, 12, tzinfo=UTC)
    assert event.time.tzinfo is UTC


# -- names and ids: what `emit` accepts, and nothing that forges a log line ---------------


@pytest.mark.parametrize(
    ("members", "error"),
    [
        ({"type": "invoice.paid "}, "surrounding whitespace"),
        ({"type": "invoice\x1b[31m.paid"}, "control character"),
        ({"type": "x" * 5000}, "characters long"),
        ({"id": "42\nINFO fastapi_eventbus.worker: event (id=42) handled"}, "control character"),
        ({"id": "x" * 2000}, "characters long"),
        ({"id": 42}, "must be a string"),
        ({"source": "//billing\r\n"}, "control character"),
    ],
    ids=["name-space", "name-escape", "name-long", "id-newline", "id-long", "id-int", "source"],
)
def test_a_name_id_or_source_emit_would_refuse_is_refused(
    members: dict[str, Any], error: str
) -> None:
    # Found: accepted as they came, though `emit` refuses such names; an id with a line
    # break wrote a forged line into the very ERROR report that names the failed event.
    with pytest.raises(MessageDecodeError, match=error):
        decode_message(cloudevent(**members))
