"""The wire format: CloudEvents 1.0, as forwarders send events and workers receive them.

- SQS: *structured* mode, the whole CloudEvent as JSON in the message body.
- Pub/Sub: Google's CloudEvents binding, *binary* mode: the payload as JSON in
  ``data``, the context attributes as ``ce-*`` message attributes.

W3C trace context (``traceparent``, ``tracestate``) travels in message
attributes, never inside the payload; on Pub/Sub also as ``googclient_traceparent``
and ``googclient_tracestate``, where Google's client libraries write and read it
(`PUBSUB_TRACE_PREFIX`). `decode_message` turns a received SQS or
Pub/Sub message back into an `Event`, whoever wrote it: CloudEvents with
``data_base64``, a ``datacontenttype`` with parameters or ``text/plain`` data,
and Pub/Sub's structured mode too (see `from_cloudevent`); `message_size`
measures one before that, so that a worker can refuse to decode what is too
large. These guess the message's shape; a worker's source knows it, and reads
its messages itself (`fastapi_eventbus.worker.Source.decode`).
"""

from __future__ import annotations

import base64
import binascii
import json
import socket
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeAlias, cast

from pydantic import ValidationError

from ._attributes import RESERVED_ATTRIBUTES
from ._brokers import envelope, is_trace_value, media_type, parse_time, payload_of, unsupported
from ._events import Event, payload_json
from .exceptions import ConfigurationError, MessageDecodeError

__all__ = [  # noqa: RUF022 - plain sorted(), as tests/test_exports.py checks
    "CONTENT_TYPE",
    "DEFAULT_SOURCE",
    "DEFAULT_SOURCE_PREFIX",
    "Decoder",
    "PUBSUB_TRACE_PREFIX",
    "SPECVERSION",
    "TRACE_ATTRIBUTES",
    "check_decoder",
    "cloudevent_trace_context",
    "decode_message",
    "decode_with",
    "from_cloudevent",
    "message_size",
    "message_trace_context",
    "pubsub_attributes",
    "pubsub_data",
    "pubsub_data_size",
    "sqs_body",
    "to_cloudevent",
    "trace_attributes",
    "utf8_size",
]

SPECVERSION = "1.0"
"""The CloudEvents version written and the only one read."""
CONTENT_TYPE = "application/json"
"""The ``datacontenttype`` written (the payload is JSON). Read are JSON types, with any
parameters and in any case, and ``text/plain`` (a string payload): see `from_cloudevent`."""
TRACE_ATTRIBUTES = ("traceparent", "tracestate")
"""Message attributes that carry W3C trace context."""
PUBSUB_TRACE_PREFIX = "googclient_"
"""The prefix of the Pub/Sub attributes in which Google's client libraries (with
OpenTelemetry enabled) carry W3C trace context: ``googclient_traceparent`` and
``googclient_tracestate``. `pubsub_attributes` writes them beside ``traceparent``
and ``tracestate``; a received message's are read when it has no ``traceparent``."""

DEFAULT_SOURCE_PREFIX = "//fastapi-eventbus/"
"""How `DEFAULT_SOURCE` starts, on every host."""
DEFAULT_SOURCE = f"{DEFAULT_SOURCE_PREFIX}{socket.gethostname()}"
"""The CloudEvents ``source`` of events whose bus sets none: this host, as a URI reference."""

_REQUIRED = ("specversion", "id", "source", "type")


def _time_text(time: datetime) -> str:
    return time.astimezone(UTC).isoformat().replace("+00:00", "Z")


def to_cloudevent(event: Event) -> dict[str, Any]:
    """The event as a structured-mode CloudEvent (a JSON-ready dict), its extension
    attributes (`Event.extensions`) included."""
    cloudevent: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": event.id,
        "source": event.source or DEFAULT_SOURCE,
        "type": event.name,
        "time": _time_text(event.time),
        "datacontenttype": CONTENT_TYPE,
    }
    if event.extensions:
        cloudevent.update(event.extensions)
    cloudevent["data"] = event.payload
    return cloudevent


def sqs_body(event: Event) -> str:
    """The SQS message body: the structured CloudEvent as compact JSON.

    The payload's JSON is the event's own (`payload_json`, made once per event):
    only the small envelope around it is written here.
    """
    context = to_cloudevent(event)
    del context["data"]
    envelope = json.dumps(context, separators=(",", ":"), ensure_ascii=False)
    return f'{envelope[:-1]},"data":{payload_json(event)}}}'


def pubsub_data(event: Event) -> bytes:
    """The Pub/Sub message data (binary mode): the payload as JSON (`payload_json`)."""
    return payload_json(event).encode()


def pubsub_data_size(event: Event) -> int:
    """The bytes of `pubsub_data`, without encoding it."""
    return utf8_size(payload_json(event))


def utf8_size(text: str) -> int:
    """The bytes of *text* in UTF-8: its length when it is ASCII (known without a scan)."""
    return len(text) if text.isascii() else len(text.encode())


def pubsub_attributes(event: Event) -> dict[str, str]:
    """The Pub/Sub message attributes (binary mode): ``ce-*`` context plus trace context.

    The trace context is written twice: as ``traceparent``/``tracestate``, and as
    ``googclient_traceparent``/``googclient_tracestate`` (`PUBSUB_TRACE_PREFIX`), so
    that subscribers using Google's client libraries continue the trace too.
    """
    attributes = {
        "ce-specversion": SPECVERSION,
        "ce-id": event.id,
        "ce-source": event.source or DEFAULT_SOURCE,
        "ce-type": event.name,
        "ce-time": _time_text(event.time),
        "content-type": CONTENT_TYPE,
    }
    for name, value in event.extensions.items():
        attributes["ce-" + name] = _attribute_text(value)
    trace = trace_attributes(event)
    attributes.update(trace)
    attributes.update({PUBSUB_TRACE_PREFIX + key: value for key, value in trace.items()})
    return attributes


def _attribute_text(value: str | int | bool) -> str:
    """An extension attribute's value as binary mode writes it: CloudEvents' canonical
    string encoding (``true``/``false`` for a boolean)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def trace_attributes(event: Event) -> dict[str, str]:
    """The event's W3C trace context, for message attributes."""
    return {k: v for k, v in event.trace_context.items() if k in TRACE_ATTRIBUTES and v}


def from_cloudevent(
    cloudevent: Mapping[str, Any], trace_context: Mapping[str, str] | None = None
) -> Event:
    """Build an `Event` from a structured CloudEvent; `MessageDecodeError` if it is not one.

    The data is ``data`` (JSON), or ``data_base64`` (bytes, as the CloudEvents
    SDKs write bytes data), never both. ``datacontenttype`` is compared by
    type/subtype, whatever the case, its parameters aside (a ``charset`` decodes
    ``data_base64``): JSON types (absent, ``application/json``, ``*/*+json``)
    give the JSON data as the payload, ``text/plain`` gives its text; any other
    type is refused, since a payload is JSON data. *trace_context*
    (``traceparent``/``tracestate`` from the message's attributes) becomes the
    event's ``trace_context``; without it, the CloudEvent's own ``traceparent``
    and ``tracestate`` members do. Every other attribute (``subject``,
    ``dataschema``, extensions) is kept in `Event.extensions`.
    """
    if not isinstance(cloudevent, Mapping):
        raise MessageDecodeError(
            f"a CloudEvent must be a JSON object, got {type(cloudevent).__name__}"
        )
    missing = [key for key in _REQUIRED if not cloudevent.get(key)]
    if missing:
        raise MessageDecodeError(f"not a CloudEvent: missing {', '.join(missing)}")
    if cloudevent["specversion"] != SPECVERSION:
        raise MessageDecodeError(
            f"unsupported CloudEvents specversion {cloudevent['specversion']!r}"
        )
    what = "CloudEvent"
    fields = envelope(what, cloudevent["type"], cloudevent["id"], cloudevent["source"])
    fields["payload"] = _payload(cloudevent)
    fields["trace_context"] = dict(trace_context or cloudevent_trace_context(cloudevent))
    fields["extensions"] = _extensions(cloudevent)
    if (time := cloudevent.get("time")) is not None:
        fields["time"] = parse_time(time, what)
    try:
        return Event.model_validate(fields)
    except ValidationError as exc:
        raise MessageDecodeError(f"invalid CloudEvent: {exc}") from exc
    except RecursionError as exc:
        raise MessageDecodeError("invalid CloudEvent: nested too deeply") from exc


def _extensions(cloudevent: Mapping[str, Any]) -> dict[str, Any]:
    """The CloudEvent's other attributes (``subject``, ``dataschema``, extensions).

    A null attribute is an absent one (the JSON format's rule); a value that is
    an object or an array is no CloudEvents attribute and is refused.
    """
    extensions: dict[str, Any] = {}
    for name, value in cloudevent.items():
        if name in RESERVED_ATTRIBUTES or value is None:  # the envelope's, the trace's
            continue
        if not isinstance(value, str | int | bool) or isinstance(value, float):
            raise MessageDecodeError(
                f"CloudEvent attribute {name!r} is a {type(value).__name__}: an attribute "
                "is a string, a number or a boolean"
            )
        extensions[name] = value
    return extensions


def cloudevent_trace_context(cloudevent: Mapping[str, Any]) -> dict[str, str]:
    """The ``traceparent``/``tracestate`` members of a structured CloudEvent (the
    distributed tracing extension): for a message whose attributes carry none, an
    EventBridge ``detail``, an HTTP request's headers read as members.

    A value kept is a non-empty str within the length every trace attribute is held
    to; a ``tracestate`` only goes with a ``traceparent``; ``{}`` without one.
    """
    found = {key: cloudevent.get(key) for key in TRACE_ATTRIBUTES}
    trace = {key: value for key, value in found.items() if value and is_trace_value(key, value)}
    return trace if "traceparent" in trace else {}


def _payload(cloudevent: Mapping[str, Any]) -> Any:
    """The payload a structured CloudEvent's ``data`` or ``data_base64`` carries."""
    content_type = cloudevent.get("datacontenttype")
    media = None if content_type is None else media_type(content_type, "datacontenttype")
    if media is not None and not (media.is_json or media.is_text):
        raise unsupported(media)
    if "data_base64" in cloudevent:
        if "data" in cloudevent:
            raise MessageDecodeError("a CloudEvent has both data and data_base64")
        return payload_of(_base64(cloudevent["data_base64"]), media, "data_base64")
    data = cloudevent.get("data")
    if media is not None and media.is_text and data is not None and not isinstance(data, str):
        raise MessageDecodeError(
            f"text/plain data must be a string, got {type(data).__name__} ({content_type!r})"
        )
    return data


def _base64(text: object) -> bytes:
    if not isinstance(text, str):
        raise MessageDecodeError(f"data_base64 must be a string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise MessageDecodeError(f"data_base64 is not base64: {exc}") from exc


Decoder: TypeAlias = Callable[[Mapping[str, Any]], Event | None]
"""A decode hook: the `Event` a received message (as `decode_message` takes it) carries,
or ``None`` to let the built-in decoding read it. Raise `MessageDecodeError` to refuse it."""


def check_decoder(decode: object) -> Decoder | None:
    """*decode* if it is a decode hook (or None); else `ConfigurationError`."""
    if decode is not None and not callable(decode):
        raise ConfigurationError(
            f"decode must be a callable (message) -> Event | None, got {decode!r}"
        )
    return cast("Decoder | None", decode)


def decode_with(decode: Decoder | None, message: Mapping[str, Any]) -> Event | None:
    """What the hook *decode* makes of *message*: an `Event`, or None (no hook, or it has none).

    `MessageDecodeError` if the hook returns something else than an `Event` or None.
    """
    if decode is None:
        return None
    event = check_decoder(decode)(message)  # type: ignore[misc]  # checked: not None
    if event is not None and not isinstance(event, Event):
        raise MessageDecodeError(
            f"decode hook {decode!r} returned a {type(event).__name__}, not an Event or None"
        )
    return event


def decode_message(message: Mapping[str, Any], decode: Decoder | None = None) -> Event:
    """Turn a received SQS or Pub/Sub message back into the `Event` that was forwarded.

    Accepts an SQS message as ``ReceiveMessage`` returns it (``Body`` and
    ``MessageAttributes``), a record of the event an SQS event source mapping
    gives a Lambda function (``body`` and ``messageAttributes``, ``eventSource``
    ``"aws:sqs"``), and a Pub/Sub message as a pull returns it, either the
    ``{"ackId": ..., "message": {...}}`` item or the inner message (``data``, base64
    or bytes, and ``attributes``). An SQS body may also be an SNS notification of
    an event, or an EventBridge event. Raises `MessageDecodeError` for anything
    else, JSON nested too deeply to decode (Python's recursion limit) included.

    *decode*, a `Decoder`, reads other formats: its event is returned, unless it
    returns None, and then *message* is read as above.
    """
    event = decode_with(decode, message)
    if event is not None:
        return event
    if not isinstance(message, Mapping):
        raise MessageDecodeError(f"a message must be a mapping, got {type(message).__name__}")
    from ._brokers import aws, gcp  # they read this module's names: imported once it is loaded

    sqs = _sqs_message(message)
    if sqs is not None:
        return aws.decode(sqs)
    service = aws.lambda_event_source(message)
    if service is not None:
        raise MessageDecodeError(f"a Lambda record from {service}, not an SQS record")
    inner = message.get("message")
    if isinstance(inner, Mapping):
        message = inner
    if "attributes" in message or "data" in message:
        return gcp.decode(message)
    raise MessageDecodeError(
        "neither an SQS message (Body), a Lambda SQS record (body, eventSource 'aws:sqs') "
        "nor a Pub/Sub message (data, attributes)"
    )


def _sqs_message(message: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """*message* in ReceiveMessage's shape if it is an SQS message or a Lambda SQS record."""
    from ._brokers import aws

    if "Body" in message:
        return message
    if aws.is_lambda_record(message):
        return aws.from_lambda_record(message)
    return None


def message_trace_context(message: Mapping[str, Any]) -> dict[str, str]:
    """The W3C trace context (``traceparent``/``tracestate``) of a received message: the one
    `decode_message` gives its event.

    Takes the same SQS, Lambda and Pub/Sub shapes as `decode_message`, but never
    raises: a message that is not an event, or carries no (or malformed)
    trace context, gives ``{}``. Only these two attributes are read, and only for
    tracing; a Pub/Sub message without a ``traceparent`` has its
    ``googclient_traceparent``/``googclient_tracestate`` read instead
    (`PUBSUB_TRACE_PREFIX`). A message without them whose event is a structured
    CloudEvent (an EventBridge ``detail`` too) has that CloudEvent's
    ``traceparent``/``tracestate`` members read (`cloudevent_trace_context`). The
    result's keys are ``traceparent``/``tracestate``.
    """
    from ._brokers import aws, gcp

    try:
        if not isinstance(message, Mapping):
            return {}
        sqs = _sqs_message(message)
        if sqs is not None:
            return aws.trace_context(sqs)
        inner = message.get("message")
        return gcp.trace_context(inner if isinstance(inner, Mapping) else message)
    except Exception:  # a mapping that fails when read: the message is decoded (and refused) later
        return {}


def message_size(message: Mapping[str, Any]) -> int:
    """The bytes of a received message as the brokers count them: body plus attributes.

    SQS: the ``Body`` in UTF-8, plus each message attribute's name, data type
    and value. Pub/Sub: the ``data`` (its decoded length when it is base64
    text), plus each attribute's name and value. Takes the same shapes as
    `decode_message`, without decoding anything, and never raises: a value that
    is neither text nor bytes counts 0, and so does a message that is not a
    mapping. A `Worker` refuses messages over its ``max_message_bytes``.
    """
    from ._brokers import aws, gcp

    if not isinstance(message, Mapping):
        return 0
    sqs = _sqs_message(message)
    if sqs is not None:
        return aws.size(sqs)
    inner = message.get("message")
    return gcp.size(inner if isinstance(inner, Mapping) else message)
