"""Private: what `PubSubForwarder` and `PubSubSource` share (Pub/Sub through gcloud-aio-pubsub).

The ``gcp`` extra check, the REST endpoint (or emulator) and the client options,
the texts of translated errors, and the reading of a received Pub/Sub message
(Google's CloudEvents binding, binary or structured mode): the event in its data
and attributes, its size as Pub/Sub counts it, and the trace context in its
attributes (or, in structured mode, in its CloudEvent's members). The SDK is
imported when a client is created, never here.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import os
from collections.abc import Mapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any, cast

from fastapi_eventbus._events import Event
from fastapi_eventbus.exceptions import (
    ConfigurationError,
    ForwarderError,
    MessageDecodeError,
    MissingExtraError,
)
from fastapi_eventbus.wire import (
    PUBSUB_TRACE_PREFIX,
    TRACE_ATTRIBUTES,
    cloudevent_trace_context,
    from_cloudevent,
)

from . import MediaType, byte_length, is_trace_value, media_type, payload_of, trace_or_nothing

if TYPE_CHECKING:
    import aiohttp

DEFAULT_API_ROOT = "https://pubsub.googleapis.com/v1"
"""The Pub/Sub REST endpoint used when neither ``api_root`` nor an emulator is given."""
RETRYABLE_STATUS = frozenset({408, 409, 429, 499})
"""HTTP statuses below 500 that a retry may fix."""
MAX_ERROR_TEXT = 500
"""The longest error text quoted in a translated error."""
CONTENT_TYPE = "content-type"
"""The attribute with the media type of a message's data (any case; also ``contentType``)."""
CLOUDEVENTS_MEDIA_TYPE = "application/cloudevents"
"""What a ``Content-Type`` of a structured-mode message begins with (the binding)."""
STRUCTURED_JSON = "application/cloudevents+json"
"""The one event format read in structured mode: JSON."""


def require_sdk() -> None:
    """Raise `MissingExtraError` if gcloud-aio-pubsub (the ``gcp`` extra) is not installed."""
    try:
        found = importlib.util.find_spec("gcloud.aio.pubsub") is not None
    except (ImportError, ValueError):  # a parent package is missing or broken
        found = False
    if not found:
        raise MissingExtraError("gcp", "gcloud-aio-pubsub")


def endpoint(api_root: str | None, emulator_host: str | None) -> tuple[str, bool]:
    """The REST root to use and whether it is an emulator (no credentials)."""
    if api_root is not None and emulator_host is not None:
        raise ConfigurationError("pass api_root or emulator_host, not both")
    if api_root is not None:
        if not api_root.startswith(("https://", "http://")):
            raise ConfigurationError(f"api_root must be an http(s) URL, got {api_root!r}")
        return api_root.rstrip("/"), api_root.startswith("http://")
    host = emulator_host or os.environ.get("PUBSUB_EMULATOR_HOST")
    if host:
        if "/" in host or not host.strip():
            raise ConfigurationError(
                "emulator_host must be 'host:port' without a scheme, e.g. 'localhost:8085'; "
                f"got {host!r}"
            )
        return f"http://{host}/v1", True
    return DEFAULT_API_ROOT, False


class NoToken:
    """Stands in for gcloud-aio's `Token` with an emulator, where none is ever asked for."""

    async def get(self) -> str:
        """Never called with an emulator: raise if it is."""
        raise ForwarderError("an access token was requested for a Pub/Sub emulator")

    async def close(self) -> None:
        """Nothing to close."""


async def auth_headers(client: Any, emulated: bool) -> dict[str, str]:
    """The headers of a request made through a gcloud-aio *client*'s session, as its own
    methods make them: its token's, but with an emulator (none is ever asked for)."""
    return {} if emulated else {"Authorization": f"Bearer {await client.token.get()}"}


def client_options(
    session: aiohttp.ClientSession, api_root: str, emulated: bool, service_file: str | None
) -> dict[str, Any]:
    """The keyword arguments of a gcloud-aio publisher or subscriber client.

    With an emulator, no credentials file is even read (a stale
    ``GOOGLE_APPLICATION_CREDENTIALS`` must not break local runs).
    """
    return {
        "session": cast(
            Any, session
        ),  # typed as requests.Session: gcloud-aio follows its sync twin
        "api_root": api_root,
        "api_is_dev": emulated,
        "service_file": service_file,
        "token": cast(Any, NoToken()) if emulated else None,
    }


def describe(exc: BaseException) -> str:
    """*exc* as one clipped line: its type and text."""
    text = str(exc)
    return clip(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def clip(value: object) -> str:
    """*value* as one line of at most `MAX_ERROR_TEXT` characters."""
    text = " ".join(str(value).split())
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "..."


# -- received messages (a pull's inner message: data, attributes) ----------------------


def decode(message: Mapping[str, Any]) -> Event:
    """The event in a received Pub/Sub message; `MessageDecodeError` if it holds none.

    Google's CloudEvents binding: attribute names are case-insensitive; a
    ``Content-Type`` (or ``contentType``) attribute of ``application/cloudevents+json``
    (parameters allowed) means *structured* mode, the whole event as JSON in the
    data; else *binary* mode, the context in ``ce-*`` attributes, the data's type
    in ``Content-Type`` (or ``ce-datacontenttype``), the data as it is.
    """
    attributes = _attributes(message)
    data = _data(message)
    structured = _structured(attributes)
    if structured is not None:
        return from_cloudevent(structured.json_of(data, "Pub/Sub message data"), _trace(message))
    return _binary(attributes, data, message)


def _structured(attributes: dict[str, Any]) -> MediaType | None:
    """The media type of a structured-mode message (by its lower-case *attributes*), whose
    data is the whole event as JSON; None in binary mode."""
    content_type = attributes.get(CONTENT_TYPE)
    media = None if content_type is None else media_type(content_type, "Pub/Sub content-type")
    if media is None or not media.essence.startswith(CLOUDEVENTS_MEDIA_TYPE):
        return None
    if media.essence != STRUCTURED_JSON:
        raise MessageDecodeError(
            f"unsupported CloudEvents event format {content_type!r}: only {STRUCTURED_JSON} is read"
        )
    return media


def _binary(attributes: dict[str, Any], data: bytes, message: Mapping[str, Any]) -> Event:
    """The event of a binary-mode message: its context in ``ce-*`` attributes."""
    cloudevent: dict[str, Any] = {
        key[3:]: value
        for key, value in attributes.items()
        if key.startswith("ce-") and key not in ("ce-data", "ce-data_base64")
    }
    if CONTENT_TYPE in attributes:  # the binding maps it to datacontenttype
        cloudevent["datacontenttype"] = attributes[CONTENT_TYPE]
    content_type = cloudevent.get("datacontenttype")
    media = None if content_type is None else media_type(content_type, "datacontenttype")
    if data:
        cloudevent["data"] = payload_of(data, media, "Pub/Sub message data")
    return from_cloudevent(cloudevent, _trace(message))


def _attributes(message: Mapping[str, Any]) -> dict[str, Any]:
    """The message's attributes by lower-case name (names are case-insensitive).

    ``contentType`` (knative-gcp's spelling of the binding) is ``content-type``.
    """
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, Mapping):
        raise MessageDecodeError(
            f"Pub/Sub attributes must be a mapping, got {type(attributes).__name__}"
        )
    named: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in attributes.items():
        if not isinstance(key, str):
            continue
        name = CONTENT_TYPE if key.lower() == "contenttype" else key.lower()
        if name in named and named[name] != value:
            raise MessageDecodeError(
                f"Pub/Sub attributes {spelled[name]!r} and {key!r} are one attribute "
                "(names are case-insensitive) with two values"
            )
        named[name], spelled[name] = value, key
    return named


def rest_data(data: object) -> object:
    """A REST message's ``data`` (a pull's answer, a push request) as decoders take it:
    base64 text as bytes; anything else as it is, for `decode` to refuse with the reason
    (text that is not base64, a number), that message alone."""
    if isinstance(data, str):
        with suppress(ValueError):  # binascii.Error
            return base64.b64decode(data, validate=True)
    return data


def _data(message: Mapping[str, Any]) -> bytes:
    """The message's data as bytes (a pull's REST answer holds it in base64)."""
    data = message.get("data")
    if data is None:
        return b""
    if isinstance(data, str):
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error as exc:
            raise MessageDecodeError(f"Pub/Sub data is not base64: {exc}") from exc
    if not isinstance(data, bytes | bytearray):
        raise MessageDecodeError(
            f"Pub/Sub message data must be text or bytes, got {type(data).__name__}"
        )
    return bytes(data)


def trace_context(message: Mapping[str, Any]) -> dict[str, str]:
    """The W3C trace context of a Pub/Sub message; ``{}`` if none (never raises).

    ``traceparent``/``tracestate``, as this library and the CloudEvents binding write
    them; without a (valid) ``traceparent``, ``googclient_traceparent``/``googclient_tracestate``,
    as Google's client libraries write them. The two pairs are never mixed: a
    tracestate only goes with its own traceparent. The keys returned are always
    ``traceparent``/``tracestate``. A structured-mode message without these
    attributes has the ``traceparent``/``tracestate`` members of its CloudEvent
    read (its data is parsed for that), as `decode` gives them to its event.
    """
    return trace_or_nothing(_message_trace, message)


def _message_trace(message: Mapping[str, Any]) -> dict[str, str]:
    trace = _trace(message)
    if trace:
        return trace
    structured = _structured(_attributes(message))
    if structured is None:
        return {}
    cloudevent = structured.json_of(_data(message), "Pub/Sub message data")
    return cloudevent_trace_context(cloudevent) if isinstance(cloudevent, Mapping) else {}


def _trace(message: Mapping[str, Any]) -> dict[str, str]:
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, Mapping):
        return {}
    ours = _trace_pair(attributes, "")
    if "traceparent" in ours:
        return ours
    google = _trace_pair(attributes, PUBSUB_TRACE_PREFIX)
    return google if "traceparent" in google else ours


def _trace_pair(attributes: Mapping[str, Any], prefix: str) -> dict[str, str]:
    """The trace attributes named *prefix* + ``traceparent``/``tracestate``, unprefixed."""
    found = {key: attributes.get(prefix + key) for key in TRACE_ATTRIBUTES}
    return {key: str(value) for key, value in found.items() if is_trace_value(key, value)}


def size(message: Mapping[str, Any]) -> int:
    """Bytes Pub/Sub counts for a received message: the data, and each attribute's name and value.

    Base64 ``data`` counts its decoded length (nothing is decoded).
    """
    data = message.get("data")
    # base64 text: 4 characters for 3 bytes, less one byte per "=" of padding
    total = len(data.rstrip("=")) * 3 // 4 if isinstance(data, str) else byte_length(data)
    attributes = message.get("attributes")
    if isinstance(attributes, Mapping):
        total += sum(byte_length(key) + byte_length(value) for key, value in attributes.items())
    return total
