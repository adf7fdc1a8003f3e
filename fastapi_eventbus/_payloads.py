"""A payload turned into JSON data: converted, copied and checked at ``emit``.

What `fastapi_eventbus._events` uses to make an event's payload (`to_json_data`), and to
check what a model's conversion lost (`check_merged_keys`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
import pydantic
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, to_jsonable_python

from ._attributes import unencodable
from .exceptions import InvalidEventError

_LONG_INT_BITS = 13_000
"""Ints longer than this are checked: past ``sys.get_int_max_str_digits()`` (4,300 digits by
default) Python refuses to write them as text, and so as JSON."""


def _check_text(text: str, name: str) -> None:
    """Refuse payload text that UTF-8 cannot encode (see `unencodable`)."""
    if (error := unencodable(text)) is not None:
        raise InvalidEventError(
            f"payload of event {name!r} contains text UTF-8 cannot encode "
            f"({error.reason} at position {error.start})"
        ) from error


def _check_json(value: Any, name: str) -> bool:
    """Refuse what the converted payload holds that JSON or UTF-8 cannot carry.

    *value* comes from ``to_jsonable_python``: only dicts, lists, str, int, float,
    bool and None, so exact type checks suffice (a fast path for flat payloads).
    Returns whether *value* is a dict holding dicts or lists, or a list.
    """
    kind = type(value)
    nested = False
    if kind is dict:
        for key, item in value.items():
            if type(key) is str and not key.isascii():
                _check_text(key, name)
            kind = type(item)  # the common cases inline: most payloads are flat
            if kind is str:
                if not item.isascii():
                    _check_text(item, name)
            elif kind is bool or item is None or (kind is int and item.bit_length() < 64):
                pass
            else:
                nested = nested or kind is dict or kind is list
                _check_item(item, name)
    elif kind is list:
        nested = True
        for item in value:
            _check_item(item, name)
    else:
        _check_item(value, name)
    return nested


def _check_item(value: Any, name: str) -> None:
    kind = type(value)
    if kind is str:
        if not value.isascii():
            _check_text(value, name)
    elif kind is int:
        if value.bit_length() > _LONG_INT_BITS:  # rare: only then ask Python whether it can
            try:
                str(value)
            except ValueError as exc:  # sys.get_int_max_str_digits()
                raise InvalidEventError(
                    f"payload of event {name!r} contains an integer too long to write as JSON "
                    f"({exc}); send it as a string"
                ) from exc
    elif kind is float:
        if not math.isfinite(value):
            raise InvalidEventError(
                f"payload of event {name!r} contains {value!r}, which JSON cannot carry"
            )
    elif kind is dict or kind is list:
        _check_json(value, name)
    elif value is not None and kind is not bool:  # a subclass: check it as its base type
        base: type[Any]
        for base in (str, int, float, dict, list):
            if isinstance(value, base):
                _check_item(base(value), name)
                break


_SCALARS = frozenset({str, int, float, bool})

_ONLY_AS_PYDANTIC_WRITES = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
"""With no ``default``, orjson refuses what these name: pydantic writes them otherwise."""


_NULL = re.compile(b"null")
"""What orjson writes for ``None``, ``NaN`` and the infinities. Searched with a regular
expression: in a 10 KiB body, about half the time ``b"null" in body`` takes."""


def _equal(data: Any, payload: Any) -> bool:
    """Whether *payload* equals its JSON copy *data* (False if comparing them fails)."""
    try:
        return bool(data == payload)
    except Exception:
        return False


def to_json_data(payload: Any, name: str, text: bool = True) -> tuple[Any, str | None]:
    """Convert *payload* to plain JSON data, raising `InvalidEventError` if it cannot be;
    with the data's JSON text, when the conversion made it and *text* asks for it (see
    `payload_json`).

    Dicts and lists (the common payload) are serialised once, in C, and read back as the
    copy handlers get. orjson refuses (and pydantic's conversion then takes) what it would
    write differently from pydantic: datetimes, dataclasses, str/int/dict/list subclasses,
    sets, bytes, decimals, models, non-str keys, integers past 64 bits, text UTF-8 cannot
    encode. It writes ``NaN`` and infinities as ``null``: text with no ``null`` had none;
    else the copy equal to the payload proves it (``None != nan``)."""
    kind = type(payload)
    if payload is None:
        return None, None
    if kind is dict and not text and (copy := _flat_copy(payload)) is not None:
        return copy, None
    if kind is dict or kind is list:
        try:
            body = orjson.dumps(payload, option=_ONLY_AS_PYDANTIC_WRITES)
        except TypeError:  # see above: pydantic's conversion decides
            pass
        else:
            data = orjson.loads(body)
            if _NULL.search(body) is None or _equal(data, payload):
                # Decoded: orjson's bytes keep a big buffer.
                return data, body.decode() if text else None
    elif kind in _SCALARS:
        _check_item(payload, name)
        return payload, None
    return _converted(payload, name), None


_FLAT_KEYS = 16
"""The most keys `_flat_copy` looks at: past that, serialising in C is quicker."""


def _flat_copy(payload: dict[Any, Any]) -> dict[str, Any] | None:
    """A copy of *payload*, a small dict of ASCII str keys to values JSON carries exactly as
    they are (ASCII str, bool, None, int within 64 bits, finite float); None if it holds
    anything else (`to_json_data`'s general way decides). Such a copy is the data the
    JSON round trip would give, without the round trip."""
    if len(payload) > _FLAT_KEYS:
        return None
    for key, value in payload.items():
        if type(key) is not str or not key.isascii():
            return None
        kind = type(value)
        if kind is str:
            if not value.isascii():
                return None
        elif kind is int:
            if value.bit_length() >= 64:
                return None
        elif kind is float:
            if value - value != 0.0:  # NaN or an infinity
                return None
        elif value is not None and kind is not bool:
            return None
    return payload.copy()


def _converted(payload: Any, name: str) -> Any:
    """*payload* converted by pydantic to JSON data, each part checked (see `to_json_data`)."""
    try:
        data = to_jsonable_python(payload)
    except (PydanticSerializationError, ValueError, TypeError, RecursionError) as exc:
        raise InvalidEventError(
            f"payload of event {name!r} cannot be serialised to JSON: {exc}"
        ) from exc
    _check_json(data, name)
    check_merged_keys(payload, data, name)
    return data


def check_merged_keys(source: Any, data: Any, name: str) -> None:
    """Raise `InvalidEventError` if converting *source* to the JSON data *data* lost a value
    without a word: two keys merged (``{1: "a", "1": "b"}`` is ``{"1": "b"}``), a model's
    secret masked. Walks both side by side through dicts, lists, tuples, models and
    dataclasses; a dict with fewer keys converted is searched for the two keys."""
    kind = type(data)
    if kind is dict:
        if type(source) is not dict and not isinstance(source, Mapping):
            for part, converted in _field_pairs(source, data):
                check_merged_keys(part, converted, name)
            return
        if len(source) != len(data):
            _refuse_merged_keys(source, name)
        pairs = zip(source.values(), data.values())  # noqa: B905 (same length)
    elif kind is list and isinstance(source, _SEQUENCES):
        pairs = zip(source, data)  # noqa: B905 (same length)
    elif isinstance(source, _SECRETS):
        raise InvalidEventError(
            f"payload of event {name!r} holds a {type(source).__name__}, which JSON carries "
            "masked: handlers and brokers would get '**********'"
        )
    else:
        return
    for part, converted in pairs:
        kind = type(converted)
        if kind is dict or kind is list or isinstance(part, _SECRETS):
            check_merged_keys(part, converted, name)


_SECRETS = (pydantic.SecretStr, pydantic.SecretBytes)
"""What pydantic writes masked (``'**********'``): the value would be lost."""

_SEQUENCES = (list, tuple)
"""What pydantic turns into a list in the same order."""


def _field_pairs(source: Any, data: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    """The fields of a pydantic model or dataclass *source*, each with its converted
    value in *data* (found by field name, or by alias: pydantic writes either)."""
    if isinstance(source, BaseModel):
        for field_name, info in type(source).model_fields.items():
            key = field_name if field_name in data else info.serialization_alias
            if key in data:
                yield getattr(source, field_name, None), data[key]
    elif dataclasses.is_dataclass(source) and not isinstance(source, type):
        for field in dataclasses.fields(source):
            if field.name in data:
                yield getattr(source, field.name, None), data[field.name]


def _refuse_merged_keys(source: Mapping[Any, Any], name: str) -> None:
    """Raise naming two keys of *source* that become the same JSON key, if there are."""
    seen: dict[str, Any] = {}
    for key in source:
        try:
            text = next(iter(to_jsonable_python({key: None})))
        except (PydanticSerializationError, ValueError, TypeError, StopIteration):
            continue
        if text in seen:
            raise InvalidEventError(
                f"payload of event {name!r} has the keys {seen[text]!r} and {key!r}, which "
                f"are both {text!r} in JSON: one value would be lost; make the keys distinct"
            )
        seen[text] = key
