"""Private: what `PubSubForwarder` and `PubSubSource` share (Pub/Sub through gcloud-aio-pubsub).

The ``gcp`` extra check, the REST endpoint (or emulator) and the client options,
the texts of translated errors, and the reading of a received Pub/Sub message
(CloudEvents binary mode): the event in its data and ``ce-*`` attributes, its
size as Pub/Sub counts it, and the trace context in its attributes. The SDK is
imported when a client is created, never here.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from fastapi_eventbus._events import Event
from fastapi_eventbus.exceptions import (
    ConfigurationError,
    ForwarderError,
    MessageDecodeError,
    MissingExtraError,
)
from fastapi_eventbus.wire import CONTENT_TYPE, TRACE_ATTRIBUTES, from_cloudevent

from . import byte_length, is_trace_value, parse_json, trace_or_nothing

if TYPE_CHECKING:
    import aiohttp

DEFAULT_API_ROOT = "https://pubsub.googleapis.com/v1"
"""The Pub/Sub REST endpoint used when neither ``api_root`` nor an emulator is given."""
RETRYABLE_STATUS = frozenset({408, 409, 429, 499})
"""HTTP statuses below 500 that a retry may fix."""
MAX_ERROR_TEXT = 500
"""The longest error text quoted in a translated error."""


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
    """The event in a received Pub/Sub message; `MessageDecodeError` if it holds none."""
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, Mapping):
        raise MessageDecodeError(
            f"Pub/Sub attributes must be a mapping, got {type(attributes).__name__}"
        )
    data = message.get("data") or b""
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except binascii.Error as exc:
            raise MessageDecodeError(f"Pub/Sub data is not base64: {exc}") from exc
    cloudevent: dict[str, Any] = {
        key[3:]: value
        for key, value in attributes.items()
        if isinstance(key, str) and key.startswith("ce-")
    }
    cloudevent["datacontenttype"] = attributes.get("content-type", CONTENT_TYPE)
    cloudevent["data"] = parse_json(data, "Pub/Sub message data") if data else None
    return from_cloudevent(cloudevent, _trace(message))


def trace_context(message: Mapping[str, Any]) -> dict[str, str]:
    """The W3C trace context in a Pub/Sub message's attributes; ``{}`` if none (never raises)."""
    return trace_or_nothing(_trace, message)


def _trace(message: Mapping[str, Any]) -> dict[str, str]:
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, Mapping):
        return {}
    return {
        key: attributes[key] for key in TRACE_ATTRIBUTES if is_trace_value(key, attributes.get(key))
    }


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
