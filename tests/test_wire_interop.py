"""Decoding what producers other than this library write (issue 18, "Interop").

The messages are made by software nobody here wrote wherever it can: the CloudEvents
Python SDK (``cloudevents``) writes structured JSON events (``JSONFormat``), with
``data_base64`` whenever the data is bytes, and its HTTP binding's binary mode gives the
``ce-*`` attributes and ``content-type`` that Google's Pub/Sub binding of CloudEvents
uses too (its attribute values are the same for the texts used here: no space, ``"`` or
``%`` to percent-encode). The other messages are shaped as the binding's own examples
are, and as SQS (``Body``) and a Pub/Sub pull (``data``, ``attributes``) deliver them.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.bindings.http import to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from fastapi_eventbus import Event, MessageDecodeError
from fastapi_eventbus.wire import decode_message, from_cloudevent
from fastapi_eventbus.worker import PubSubSource, ReceivedMessage, SQSSource

TIME = datetime(2026, 11, 24, 5, 39, 1, 123456, tzinfo=UTC)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CONTEXT = {
    "specversion": "1.0",
    "id": "e-1",
    "source": "/shop",
    "type": "order.placed",
    "time": "2026-11-24T05:39:01.123456Z",
}
"""The context attributes of the events `cloudevent` makes, as JSON carries them."""


def cloudevent(data: Any = None, datacontenttype: str | None = None) -> CloudEvent:
    """An ``order.placed`` CloudEvent made by the SDK."""
    attributes: dict[str, Any] = {
        "type": "order.placed",
        "source": "/shop",
        "id": "e-1",
        "time": TIME,
    }
    if datacontenttype is not None:
        attributes["datacontenttype"] = datacontenttype
    return CloudEvent(attributes, data)


def expected(payload: Any) -> Event:
    return Event(name="order.placed", payload=payload, id="e-1", time=TIME, source="/shop")


def sqs(event: CloudEvent) -> dict[str, Any]:
    """*event* in an SQS message as ``ReceiveMessage`` returns it (the SDK's structured JSON)."""
    return {"MessageId": "m1", "Body": JSONFormat().write(event).decode()}


def pubsub_structured(event: CloudEvent) -> dict[str, Any]:
    """*event* in a Pub/Sub message, structured mode (the SDK's JSON, its content-type)."""
    message = to_structured(event, JSONFormat())
    return {"data": message.body, "attributes": dict(message.headers)}


def pubsub_binary(event: CloudEvent) -> dict[str, Any]:
    """*event* in a Pub/Sub message, binary mode (``ce-*`` attributes, content-type, data)."""
    message = to_binary(event, JSONFormat())
    return {"data": message.body, "attributes": dict(message.headers)}


def pulled(message: dict[str, Any]) -> dict[str, Any]:
    """*message* as a pull's REST answer holds it: ``data`` in base64, in a received item."""
    data = base64.b64encode(message["data"]).decode()
    return {"ackId": "a1", "message": {**message, "data": data}}


def decoded_by_sources(message: dict[str, Any]) -> Event:
    """*message* decoded by `decode_message`, and by the source of its broker (the same)."""
    event = decode_message(message)
    source = (
        SQSSource("https://sqs.eu-west-1.amazonaws.com/123456789012/orders")
        if "Body" in message
        else PubSubSource("projects/shop/subscriptions/orders", emulator_host="localhost:1")
    )
    body = message.get("message", message)  # a source gets the pull item's inner message
    assert source.decode(ReceivedMessage(body, "m1", "r1")) == event
    return event


def refused(message: dict[str, Any], error: str) -> None:
    """*message* is refused, with *error* in the reason, by `decode_message` and its source."""
    with pytest.raises(MessageDecodeError, match=error):
        decode_message(message)
    with pytest.raises(MessageDecodeError, match=error):
        decoded_by_sources(message)


SHAPES = [sqs, pubsub_structured, pubsub_binary]
SHAPE_IDS = ["sqs", "pubsub-structured", "pubsub-binary"]


# -- finding 1: media types with parameters, compared by type/subtype -------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        'application/json; charset="utf-8"',
        "application/vnd.shop.order+json; version=2",
        "text/json",
    ],
)
def test_json_media_types_with_parameters_or_another_case_are_json(
    shape: Any, content_type: str
) -> None:
    message = shape(cloudevent({"id": 7, "note": "café"}, content_type))
    assert decoded_by_sources(message) == expected({"id": 7, "note": "café"})


@pytest.mark.parametrize("content_type", ["Application/JSON", "APPLICATION/JSON ; Charset=UTF-8"])
def test_media_types_are_compared_case_insensitively(content_type: str) -> None:
    """(Not through the SDK: it writes JSON data of such a type as Python's repr of it.)"""
    body = {**CONTEXT, "datacontenttype": content_type, "data": {"id": 7}}
    assert decoded_by_sources({"Body": json.dumps(body)}) == expected({"id": 7})
    attributes = {f"ce-{name}": value for name, value in CONTEXT.items()}
    binary = {"data": b'{"id": 7}', "attributes": {**attributes, "content-type": content_type}}
    assert decoded_by_sources(binary) == expected({"id": 7})


def test_a_pubsub_charset_other_than_utf8_is_honoured() -> None:
    message = {
        "data": json.dumps({"note": "café"}, ensure_ascii=False).encode("utf-16"),
        "attributes": {
            "ce-specversion": "1.0",
            "ce-id": "e-1",
            "ce-source": "/shop",
            "ce-type": "order.placed",
            "ce-time": "2026-11-24T05:39:01.123456Z",
            "content-type": "application/json; charset=utf-16",
        },
    }
    assert decoded_by_sources(message) == expected({"note": "café"})
    assert decoded_by_sources(pulled(message)) == expected({"note": "café"})


@pytest.mark.parametrize(
    ("content_type", "error"),
    [
        ("application/json; charset=no-such-charset", "unknown charset 'no-such-charset'"),
        ("application/json; charset=zlib", "unknown charset 'zlib'"),  # a codec, not a charset
        ("text/plain; charset=rot13", "unknown charset 'rot13'"),
        ("application/json; charset=ascii", "not ascii"),
        ("json", "not a media type"),
        ("application/xml", "unsupported datacontenttype 'application/xml'"),
    ],
)
def test_undecodable_pubsub_data_is_refused_with_the_reason(content_type: str, error: str) -> None:
    data = json.dumps({"note": "café"}, ensure_ascii=False).encode()
    refused(pubsub_binary(cloudevent(data, content_type)), error)


# -- finding 2: data_base64 --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [sqs, pubsub_structured], ids=SHAPE_IDS[:2])
@pytest.mark.parametrize(
    "content_type", [None, "application/json", "application/json; charset=utf-8"]
)
def test_data_base64_with_json_is_the_payload(shape: Any, content_type: str | None) -> None:
    """The SDK writes ``data_base64`` whenever the data is bytes: never a payload of None."""
    message = shape(cloudevent(json.dumps({"id": 7, "note": "café"}).encode(), content_type))
    assert "data_base64" in (message.get("Body") or message["data"].decode())
    assert decoded_by_sources(message) == expected({"id": 7, "note": "café"})


@pytest.mark.parametrize("shape", [sqs, pubsub_structured], ids=SHAPE_IDS[:2])
def test_data_base64_with_text_plain_is_a_string_payload(shape: Any) -> None:
    message = shape(cloudevent("café ☕".encode(), "text/plain; charset=utf-8"))
    assert decoded_by_sources(message) == expected("café ☕")


@pytest.mark.parametrize("shape", [sqs, pubsub_structured], ids=SHAPE_IDS[:2])
@pytest.mark.parametrize(
    ("data", "content_type", "error"),
    [
        (b"\x89PNG\r\n", "image/png", "unsupported datacontenttype 'image/png'"),
        (b"\x00\x01", "application/octet-stream", "unsupported datacontenttype"),
        (b"\x00\x01", None, "data_base64 is not valid JSON"),
        (b"<order/>", "application/xml", "unsupported datacontenttype"),
    ],
)
def test_data_base64_that_is_no_payload_is_refused_never_dropped(
    shape: Any, data: bytes, content_type: str | None, error: str
) -> None:
    refused(shape(cloudevent(data, content_type)), error)


@pytest.mark.parametrize(
    ("members", "error"),
    [
        ({"data": {"id": 7}, "data_base64": "eyJpZCI6IDd9"}, "both data and data_base64"),
        ({"data": None, "data_base64": "eyJpZCI6IDd9"}, "both data and data_base64"),
        ({"data_base64": "%%%"}, "data_base64 is not base64"),
        ({"data_base64": 7}, "data_base64 must be a string"),
        ({"datacontenttype": "text/plain", "data": {"id": 7}}, "text/plain data must be a string"),
        ({"datacontenttype": 7, "data": "x"}, "datacontenttype must be a string"),
    ],
)
def test_malformed_data_members_are_refused(members: dict[str, Any], error: str) -> None:
    refused({"Body": json.dumps({**CONTEXT, **members})}, error)
    with pytest.raises(MessageDecodeError, match=error):
        from_cloudevent({**CONTEXT, **members})


# -- finding 3: Google's Pub/Sub binding --------------------------------------------------------


def test_pubsub_attribute_names_are_case_insensitive() -> None:
    message = pubsub_binary(cloudevent({"id": 7}, "application/json"))
    for rename in (str.upper, str.title, lambda name: name[:3].upper() + name[3:]):
        attributes = {rename(name): value for name, value in message["attributes"].items()}
        assert "content-type" not in attributes
        renamed = {**message, "attributes": {**attributes, "traceparent": TRACEPARENT}}
        event = decoded_by_sources(renamed)
        assert event == expected({"id": 7}).model_copy(
            update={"trace_context": {"traceparent": TRACEPARENT}}
        )


def test_the_binding_example_binary_mode_with_ce_datacontenttype() -> None:
    """The binary-mode example of Google's binding names the data's type ``ce-datacontenttype``."""
    attributes = {
        "ce-specversion": "1.0",
        "ce-type": "order.placed",
        "ce-time": "2026-11-24T05:39:01.123456Z",
        "ce-id": "e-1",
        "ce-source": "/shop",
        "ce-datacontenttype": "application/json; charset=utf-8",
    }
    assert decoded_by_sources({"data": b'{"id": 7}', "attributes": attributes}) == expected(
        {"id": 7}
    )
    attributes["ce-datacontenttype"] = "text/plain"
    assert decoded_by_sources({"data": b"42", "attributes": attributes}) == expected("42")
    attributes["content-type"] = "application/json"  # the binding's rule: it wins
    assert decoded_by_sources({"data": b"42", "attributes": attributes}) == expected(42)


def test_pubsub_attributes_that_differ_only_in_case_must_agree() -> None:
    message = pubsub_binary(cloudevent({"id": 7}, "application/json"))
    conflicting = {**message["attributes"], "CE-ID": "e-2"}
    refused({**message, "attributes": conflicting}, "'ce-id' and 'CE-ID'")
    content_types = {**message["attributes"], "contentType": "text/plain"}
    refused({**message, "attributes": content_types}, "'content-type' and 'contentType'")
    agreeing = {**message["attributes"], "CE-ID": "e-1"}
    assert decoded_by_sources({**message, "attributes": agreeing}) == expected({"id": 7})


@pytest.mark.parametrize(
    "content_type",
    [
        "application/cloudevents+json",
        "application/cloudevents+json; charset=UTF-8",
        "Application/CloudEvents+JSON",
    ],
)
@pytest.mark.parametrize("name", ["content-type", "Content-Type", "contentType"])
def test_pubsub_structured_mode(content_type: str, name: str) -> None:
    """The event in ``data``, by the ``Content-Type`` attribute, as in the binding's example.

    (``contentType`` is how knative-gcp's copy of Google's binding spells it.)
    """
    message = pubsub_structured(cloudevent({"id": 7}, "application/json; charset=utf-8"))
    attributes = {name: content_type, "traceparent": TRACEPARENT}
    event = expected({"id": 7}).model_copy(update={"trace_context": {"traceparent": TRACEPARENT}})
    assert decoded_by_sources({**message, "attributes": attributes}) == event
    assert decoded_by_sources(pulled({**message, "attributes": attributes})) == event


def test_pubsub_structured_mode_ignores_ce_attributes_beside_it() -> None:
    """The binding: all attributes are in the payload, even if also in ``ce-*`` attributes."""
    message = pubsub_structured(cloudevent({"id": 7}))
    message["attributes"].update({"ce-type": "something.else", "ce-id": "other"})
    assert decoded_by_sources(message) == expected({"id": 7})


@pytest.mark.parametrize(
    ("content_type", "error"),
    [
        ("application/cloudevents+avro", "unsupported CloudEvents event format"),
        ("application/cloudevents-batch+json", "unsupported CloudEvents event format"),
    ],
)
def test_other_cloudevents_formats_are_refused(content_type: str, error: str) -> None:
    message = pubsub_structured(cloudevent({"id": 7}))
    refused({**message, "attributes": {"content-type": content_type}}, error)


def test_pubsub_structured_mode_that_is_not_json_is_refused() -> None:
    refused(
        {"data": b"not json", "attributes": {"content-type": "application/cloudevents+json"}},
        "Pub/Sub message data is not valid JSON",
    )


@pytest.mark.parametrize("name", ["content-type", "Content-Type", "contentType"])
def test_pubsub_text_plain_data_is_the_string_not_json(name: str) -> None:
    message = pubsub_binary(cloudevent("42", "text/plain"))
    attributes = {k: v for k, v in message["attributes"].items() if k != "content-type"}
    message["attributes"] = {**attributes, name: "text/plain"}
    assert decoded_by_sources(message) == expected("42")  # the text "42", not the number
    assert decoded_by_sources(pulled(message)) == expected("42")
    latin = {**message, "data": "café".encode("latin-1")}
    latin["attributes"] = {**attributes, name: "text/plain; charset=ISO-8859-1"}
    assert decoded_by_sources(latin) == expected("café")


def test_sqs_structured_text_plain_is_a_string_payload() -> None:
    """The SDK writes text data as a JSON string under ``data``."""
    assert decoded_by_sources(sqs(cloudevent("café", "text/plain"))) == expected("café")


# -- item 4: extension attributes (``subject``, ``dataschema``, custom ones) --------------


def with_extensions() -> CloudEvent:
    """An SDK event with the optional ``subject``/``dataschema`` and three extensions."""
    attributes: dict[str, Any] = {
        "type": "order.placed",
        "source": "/shop",
        "id": "e-1",
        "time": TIME,
        "subject": "orders/1",
        "dataschema": "https://shop.example/schemas/order.json",
        "tenant": "acme",
        "priority": 5,
        "urgent": True,
    }
    return CloudEvent(attributes, {"id": 1})


EXTENSIONS = {
    "subject": "orders/1",
    "dataschema": "https://shop.example/schemas/order.json",
    "tenant": "acme",
    "priority": 5,
    "urgent": True,
}


@pytest.mark.parametrize("shape", [sqs, pubsub_structured])
def test_extension_attributes_are_kept_on_the_event(shape: Any) -> None:
    """Finding 4: they were dropped; JSON keeps their types (string, integer, boolean)."""
    event = decoded_by_sources(shape(with_extensions()))
    assert event.extensions == EXTENSIONS
    assert event == expected({"id": 1}).model_copy(update={"extensions": EXTENSIONS})


def test_binary_mode_extension_attributes_are_strings() -> None:
    """Pub/Sub attributes are strings: the binding carries every attribute as text."""
    message = pubsub_binary(with_extensions())
    event = decoded_by_sources(message)
    assert event.extensions == {name: message["attributes"][f"ce-{name}"] for name in EXTENSIONS}
    assert event.extensions["priority"] == "5"  # (the SDK writes the boolean as "True")


def test_a_null_attribute_is_absent_and_an_object_is_refused() -> None:
    body = {**CONTEXT, "subject": None, "data": 1}
    assert from_cloudevent(body).extensions == {}
    refused({"Body": json.dumps({**CONTEXT, "tenant": {"id": 1}})}, "attribute 'tenant' is a dict")
    refused({"Body": json.dumps({**CONTEXT, "ratio": 0.5})}, "attribute 'ratio' is a float")


def test_the_tracing_extension_in_the_body_is_the_trace_context() -> None:
    """The distributed tracing extension written as members, where no attribute carries it."""
    body = {**CONTEXT, "traceparent": TRACEPARENT, "tracestate": "k=v", "data": 1}
    event = decode_message({"Body": json.dumps(body)})
    assert event.trace_context == {"traceparent": TRACEPARENT, "tracestate": "k=v"}
    assert event.extensions == {}
    other = "00-11111111111111111111111111111111-2222222222222222-01"
    attributes = {"traceparent": {"DataType": "String", "StringValue": other}}
    event = decode_message({"Body": json.dumps(body), "MessageAttributes": attributes})
    assert event.trace_context == {"traceparent": other}  # the message's own, never mixed


@pytest.mark.parametrize(
    "members",
    [
        {"traceparent": "0" * 257},  # longer than any attribute is kept: a forged one
        {"tracestate": "k=v"},  # a tracestate without its traceparent
        {"traceparent": "", "tracestate": "k=v"},
        {"traceparent": 7},
    ],
)
def test_tracing_members_are_held_to_what_attributes_are(members: dict[str, Any]) -> None:
    """The SQS body, an EventBridge detail and the push router read them one way."""
    body = json.dumps({**CONTEXT, **members, "data": 1})
    assert decode_message({"Body": body}).trace_context == {}
