"""Private: what a broker's forwarder and its worker source share, one module per broker.

`aws` (SQS) and `gcp` (Pub/Sub) each hold their SDK's extra check, client
settings, error translation and the reading of a received message (its event,
size and trace context). The forwarders in `fastapi_eventbus.forwarders` and the
sources in `fastapi_eventbus.worker` import them; they never import each other.
This module holds what the brokers' message readers have in common, and what
`fastapi_eventbus.wire` reads a structured CloudEvent with: media types, compared
by type/subtype whatever their case and parameters, and the payload that data of
a media type carries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi_eventbus._events import check_name, check_text
from fastapi_eventbus.exceptions import InvalidEventError, MessageDecodeError

TRACE_LIMITS = {"traceparent": 256, "tracestate": 512}
"""Longest values kept (W3C: a version-00 traceparent is 55 characters, a tracestate at
most 512): longer ones are ignored, so a forged attribute cannot grow every event."""


class _NotJSONNumber(Exception):
    """Raised inside `json.loads` by `_refuse_constant` and `_finite`."""


def _refuse_constant(token: str) -> float:
    raise _NotJSONNumber(f"{token}, which JSON cannot carry (Python's json writes it)")


def _finite(text: str) -> float:
    value = float(text)
    if value - value != 0.0:  # an infinity: beyond a float's range
        raise _NotJSONNumber(f"the number {text[:40]}, which JSON cannot carry as a float")
    return value


def parse_json(text: object, what: str) -> Any:
    """*text* parsed as JSON; `MessageDecodeError` naming *what* if it is not JSON.

    Only JSON's numbers: ``NaN`` and the infinities (Python's `json` writes them) and
    numbers past a float's range are refused, as `emit` refuses them in a payload."""
    if not isinstance(text, str | bytes | bytearray):
        raise MessageDecodeError(f"{what} must be text or bytes, got {type(text).__name__}")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)
    except _NotJSONNumber as exc:
        raise MessageDecodeError(f"{what} holds {exc}") from None
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


# -- media types (RFC 2046/9110: type/subtype, parameters; compared case-insensitively) ------

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(rf"\s*({_TOKEN})/({_TOKEN})\s*(;.*)?", re.DOTALL)
_PARAMETER = re.compile(rf'\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|{_TOKEN})\s*')


@dataclass(frozen=True, slots=True)
class MediaType:
    """A media type as a ``datacontenttype`` or ``Content-Type`` gives it, parsed.

    ``essence`` is ``type/subtype`` in lower case: what media types are compared by;
    ``charset`` is the ``charset`` parameter (lower case) if there is one. Other
    parameters are not kept: no type read here depends on them.
    """

    text: str
    essence: str
    charset: str | None = None

    @property
    def is_json(self) -> bool:
        """JSON data: ``application/json``, ``text/json`` or a ``+json`` subtype (RFC 6839)."""
        kind, _, subtype = self.essence.partition("/")
        return kind in ("application", "text") and (subtype == "json" or subtype.endswith("+json"))

    @property
    def is_text(self) -> bool:
        """Plain text, which an event carries as a string payload."""
        return self.essence == "text/plain"

    def json_of(self, data: bytes, what: str) -> Any:
        """*data* parsed as JSON: in this type's charset, or JSON's own UTF-8/16/32."""
        return parse_json(self.text_of(data, what) if self.charset else data, what)

    def text_of(self, data: bytes, what: str) -> str:
        """*data* decoded by this type's charset (UTF-8 without one)."""
        charset = self.charset or "utf-8"
        try:
            return data.decode(charset)
        except LookupError:  # no such codec, or not a text encoding (zlib, rot13...)
            raise MessageDecodeError(
                f"{what} has the unknown charset {charset!r} ({self.text!r})"
            ) from None
        except UnicodeError as exc:
            raise MessageDecodeError(f"{what} is not {charset}: {exc}") from exc


def media_type(text: object, what: str) -> MediaType:
    """*text* parsed as a media type; `MessageDecodeError` naming *what* if it is none."""
    if not isinstance(text, str):
        raise MessageDecodeError(f"{what} must be a string, got {type(text).__name__}")
    match = _MEDIA_TYPE.fullmatch(text)
    if match is None:
        raise MessageDecodeError(f"{what} {text!r} is not a media type (type/subtype)")
    charset = None
    for parameter in (match[3] or "").split(";")[1:]:
        found = _PARAMETER.fullmatch(parameter)
        if found is not None and found[1].lower() == "charset":
            charset = found[2].strip('"').lower()
    return MediaType(text, f"{match[1]}/{match[2]}".lower(), charset)


def payload_of(data: bytes, media: MediaType | None, what: str) -> Any:
    """The event payload that *data* of type *media* (None: JSON) carries.

    JSON data is parsed (bytes in the charset *media* names, or JSON's own UTF-8/16/32
    without one); ``text/plain`` is the text itself. Any other type is refused: an
    event's payload is JSON data, and bytes of another type cannot be one.
    """
    if media is None:
        return parse_json(data, what)
    if media.is_json:
        return media.json_of(data, what)
    if media.is_text:
        return media.text_of(data, what)
    raise unsupported(media)


def unsupported(media: MediaType) -> MessageDecodeError:
    """The error for data of a type no payload can hold."""
    return MessageDecodeError(
        f"unsupported datacontenttype {media.text!r}: an event's payload is JSON data, "
        "so only JSON types (application/json, */*+json) and text/plain can be decoded"
    )


def parse_time(value: object, what: str) -> datetime:
    """An event's *value* of ``time`` as an aware UTC datetime; `MessageDecodeError` unless
    it is an RFC 3339 timestamp (a string, with its UTC offset)."""
    if not isinstance(value, str):
        raise MessageDecodeError(
            f"{what} time must be an RFC 3339 string, got {type(value).__name__} {value!r}"
        )
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise MessageDecodeError(
            f"{what} time {value[:60]!r} is not an RFC 3339 timestamp"
        ) from None
    if parsed.tzinfo is None:
        raise MessageDecodeError(
            f"{what} time {value!r} has no UTC offset (RFC 3339 requires one: Z or +hh:mm)"
        )
    return parsed.astimezone(UTC)


def envelope(what: str, name: object, event_id: object, source: object) -> dict[str, Any]:
    """A received event's name, id and source, held to what `emit` accepts (names, ids and
    sources are printed in log lines); `MessageDecodeError` naming *what* otherwise."""
    try:
        return {
            "name": check_name(name),
            "id": check_text("id", event_id),
            "source": None if source is None else check_text("source", source),
        }
    except InvalidEventError as exc:
        raise MessageDecodeError(f"{what}: {exc}") from None
