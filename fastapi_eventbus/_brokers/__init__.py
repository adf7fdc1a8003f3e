"""Private: what a broker's forwarder and its worker source share, one module per broker.

`aws` (SQS) and `gcp` (Pub/Sub) each hold their SDK's extra check, client
settings, error translation and the reading of a received message (its event,
size and trace context). The forwarders in `fastapi_eventbus.forwarders` and the
sources in `fastapi_eventbus.worker` import them; they never import each other.
This module holds what the brokers' message readers have in common.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from fastapi_eventbus.exceptions import MessageDecodeError

TRACE_LIMITS = {"traceparent": 256, "tracestate": 512}
"""Longest values kept (W3C: a version-00 traceparent is 55 characters, a tracestate at
most 512): longer ones are ignored, so a forged attribute cannot grow every event."""


def parse_json(text: object, what: str) -> Any:
    """*text* parsed as JSON; `MessageDecodeError` naming *what* if it is not JSON."""
    if not isinstance(text, str | bytes | bytearray):
        raise MessageDecodeError(f"{what} must be text or bytes, got {type(text).__name__}")
    try:
        return json.loads(text)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MessageDecodeError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # arrays or objects nested deeper than the parser recurses
        raise MessageDecodeError(f"{what} is JSON nested too deeply to decode") from exc


def is_trace_value(key: str, value: object) -> bool:
    """Whether *value* is kept as the trace attribute *key*: a str within `TRACE_LIMITS`."""
    return isinstance(value, str) and len(value) <= TRACE_LIMITS[key]


def byte_length(value: object) -> int:
    """Bytes of *value*: UTF-8 for a str, its length for bytes; 0 for anything else."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes | bytearray):
        return len(value)
    return 0


def trace_or_nothing(
    read: Callable[[Mapping[str, Any]], dict[str, str]], message: Mapping[str, Any]
) -> dict[str, str]:
    """The trace context *read* finds in *message*; ``{}`` if reading it raises (a mapping
    that fails when read: the message is decoded, and refused, later)."""
    try:
        return read(message)
    except Exception:
        return {}
