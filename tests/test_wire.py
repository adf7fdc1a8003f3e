"""CloudEvents on the wire: encode for SQS (structured) and Pub/Sub (binary), decode both."""

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from fastapi_eventbus import Event, MessageDecodeError
from fastapi_eventbus.wire import (
    DEFAULT_SOURCE,
    decode_message,
    message_trace_context,
    pubsub_attributes,
    pubsub_data,
    sqs_body,
    to_cloudevent,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
EVENT = Event(
    name="order.placed",
    payload={"id": 7, "items": ["é", 2.5]},
    id="6f1c1a8e-3b57-4d0c-9c0e-2d8a2c1e4b11",
    time=datetime(2026, 11, 24, 5, 39, 1, 123456, tzinfo=UTC),
    source="/shop",
    trace_context={"traceparent": TRACEPARENT, "tracestate": "vendor=1"},
)


def test_structured_cloudevent() -> None:
    assert to_cloudevent(EVENT) == {
        "specversion": "1.0",
        "id": EVENT.id,
        "source": "/shop",
        "type": "order.placed",
        "time": "2026-11-24T05:39:01.123456Z",
        "datacontenttype": "application/json",
        "data": {"id": 7, "items": ["é", 2.5]},
    }
    assert to_cloudevent(Event(name="x"))["source"] == DEFAULT_SOURCE


def test_trace_context_never_enters_the_payload() -> None:
    assert "traceparent" not in sqs_body(EVENT)
    assert b"traceparent" not in pubsub_data(EVENT)
    assert pubsub_attributes(EVENT)["traceparent"] == TRACEPARENT


def test_sqs_round_trip() -> None:
    message = {
        "Body": sqs_body(EVENT),
        "MessageAttributes": {
            "traceparent": {"DataType": "String", "StringValue": TRACEPARENT},
            "tracestate": {"DataType": "String", "StringValue": "vendor=1"},
        },
    }
    assert decode_message(message) == EVENT


def test_pubsub_binary_round_trip_in_both_pull_shapes() -> None:
    attributes = pubsub_attributes(EVENT)
    assert attributes["ce-specversion"] == "1.0"
    assert attributes["ce-type"] == "order.placed"
    assert attributes["content-type"] == "application/json"
    inner = {"data": base64.b64encode(pubsub_data(EVENT)).decode(), "attributes": attributes}
    assert decode_message(inner) == EVENT
    assert decode_message({"ackId": "a1", "message": inner}) == EVENT
    assert decode_message({"data": pubsub_data(EVENT), "attributes": attributes}) == EVENT


def test_an_event_without_payload_round_trips() -> None:
    event = Event(name="ping", source="/s")
    attributes = pubsub_attributes(event)
    assert decode_message({"Body": sqs_body(event)}) == event
    assert decode_message({"data": pubsub_data(event), "attributes": attributes}) == event


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"Body": "not json"}, "not valid JSON"),
        ({"Body": "[1, 2]"}, "must be a JSON object"),
        ({"Body": json.dumps({"id": "1", "type": "x"})}, "missing specversion, source"),
        (
            {"Body": json.dumps({"specversion": "0.3", "id": "1", "source": "s", "type": "x"})},
            "unsupported CloudEvents specversion",
        ),
        (
            {
                "Body": json.dumps(
                    {
                        "specversion": "1.0",
                        "id": "1",
                        "source": "s",
                        "type": "x",
                        "datacontenttype": "text/xml",
                    }
                )
            },
            "unsupported datacontenttype",
        ),
        (
            {
                "Body": json.dumps(
                    {"specversion": "1.0", "id": "1", "source": "s", "type": "x", "time": "noon"}
                )
            },
            "not an RFC 3339 timestamp",
        ),
        ({"data": "%%%", "attributes": {}}, "not base64"),
        ({"attributes": {"ce-id": "1"}}, "missing specversion"),
        ({"something": "else"}, "neither an SQS message"),
        ("a string", "must be a mapping"),
    ],
)
def test_bad_messages_raise_a_decode_error(message: Any, error: str) -> None:
    with pytest.raises(MessageDecodeError, match=error):
        decode_message(message)


def test_message_trace_context_reads_only_the_trace_attributes() -> None:
    sqs = {
        "Body": "{}",
        "MessageAttributes": {
            "traceparent": {"DataType": "String", "StringValue": TRACEPARENT},
            "tracestate": {"DataType": "String", "StringValue": "vendor=1"},
            "baggage": {"DataType": "String", "StringValue": "user=ada"},
        },
    }
    assert message_trace_context(sqs) == {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
    inner = {"data": "", "attributes": {"traceparent": TRACEPARENT}}
    assert message_trace_context({"ackId": "a", "message": inner}) == {"traceparent": TRACEPARENT}
    assert message_trace_context(inner) == {"traceparent": TRACEPARENT}


@pytest.mark.parametrize(
    "message",
    [
        None,
        "text",
        {"Body": "{}", "MessageAttributes": "not a mapping"},
        {"Body": "{}", "MessageAttributes": {"traceparent": "no StringValue"}},
        {"Body": "{}", "MessageAttributes": {"traceparent": {"StringValue": 42}}},
        {"data": "", "attributes": ["traceparent"]},
        {"data": "", "attributes": {"traceparent": 1}},
        {"message": {"attributes": None}},
    ],
)
def test_message_trace_context_never_raises(message: object) -> None:
    assert message_trace_context(message) == {}  # type: ignore[arg-type]


def test_oversized_trace_attributes_are_ignored() -> None:
    attributes = {
        "traceparent": {"DataType": "String", "StringValue": "0" * 257},
        "tracestate": {"DataType": "String", "StringValue": "v=" + "1" * 510},
    }
    assert message_trace_context({"Body": "{}", "MessageAttributes": attributes}) == {
        "tracestate": "v=" + "1" * 510
    }


@pytest.mark.parametrize(
    "message",
    [{"Body": 42}, {"Body": None}, {"data": "", "attributes": ["ce-type"]}, {"data": 7}],
)
def test_wrongly_typed_messages_are_decode_errors(message: dict[str, Any]) -> None:
    with pytest.raises(MessageDecodeError):
        decode_message(message)


NESTED = "[" * 100_000 + "]" * 100_000
"""Valid JSON nested deeper than Python's parser recurses (a queue message can carry it)."""


@pytest.mark.parametrize(
    "message",
    [
        {"Body": NESTED},
        {"Body": '{"specversion":"1.0","id":"1","source":"s","type":"x","data":' + NESTED + "}"},
        {"data": NESTED.encode(), "attributes": pubsub_attributes(EVENT)},
        {"data": base64.b64encode(NESTED.encode()).decode(), "attributes": {}},
    ],
    ids=["sqs-body", "sqs-data", "pubsub-bytes", "pubsub-base64"],
)
def test_json_nested_too_deeply_is_a_decode_error(message: dict[str, Any]) -> None:
    """Not a `RecursionError`: the worker handles it per ``on_undecodable``, as any bad message."""
    with pytest.raises(MessageDecodeError, match="nested too deeply"):
        decode_message(message)


def _lambda_record(body: str, **attributes: dict[str, Any]) -> dict[str, Any]:
    """One record of the event an SQS event source mapping gives a Lambda function."""
    return {
        "messageId": "059f36b4-87a3-44ab-83d2-661975830a7d",
        "receiptHandle": "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a...",
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": "1545082649183",
            "SenderId": "AIDAIENQZJOLO23YVJ4VO",
            "ApproximateFirstReceiveTimestamp": "1545082649185",
        },
        "messageAttributes": attributes,
        "md5OfBody": "e4e68fb7bd0e697a0ae8f1bb342846b3",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-2:123456789012:my-queue",
        "awsRegion": "us-east-2",
    }


def test_a_lambda_sqs_record_is_decoded_as_sqs_not_pubsub() -> None:
    """Finding 8: a Lambda SQS record (lowercase ``body``, ``attributes``) was read as a
    Pub/Sub message, and refused as "not a CloudEvent"."""
    record = _lambda_record(
        sqs_body(EVENT),
        traceparent={"stringValue": TRACEPARENT, "dataType": "String"},
        tracestate={"stringValue": "vendor=1", "dataType": "String"},
    )
    assert decode_message(record) == EVENT
    assert message_trace_context(record) == EVENT.trace_context
    bare = {"messageId": "m1", "body": sqs_body(EVENT)}  # no eventSource: still a record
    assert decode_message(bare).id == EVENT.id


def test_a_lambda_record_of_another_service_or_an_unknown_shape_is_named() -> None:
    kinesis = {"eventSource": "aws:kinesis", "kinesis": {"data": "e30="}, "eventID": "x"}
    with pytest.raises(MessageDecodeError, match=r"aws:kinesis, not an SQS record"):
        decode_message(kinesis)
    with pytest.raises(MessageDecodeError, match="Lambda SQS record"):
        decode_message({"something": "else"})
    with pytest.raises(MessageDecodeError, match="SQS message body"):
        decode_message(_lambda_record("not json"))
