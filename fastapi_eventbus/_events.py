"""The event envelope and everything that turns ``emit`` arguments into one."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
import pydantic
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticSerializationError, to_jsonable_python

from . import _ids
from ._attributes import (
    NO_EXTENSIONS,
    RESERVED_ATTRIBUTES,
    Extensions,
    FrozenDict,
    check_extensions,
    unencodable,
)
from .exceptions import ConfigurationError, InvalidEventError


class Event(BaseModel):
    """An immutable event envelope, as handlers and forwarders receive it.

    `payload` is always JSON-compatible data (dicts, lists, strings, numbers,
    booleans, ``None``): what a local handler sees is exactly what a remote
    worker will decode. `id` is unique per emitted event and is the key to
    deduplicate on when delivery is at-least-once.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    __slots__ = ("_payload_json",)  # the payload as JSON, once made: see `payload_json`

    name: str
    """The event name handlers are matched against, e.g. ``"cat.created"``."""
    payload: Any = None
    """JSON-compatible data carried by the event."""
    id: str = Field(default_factory=_ids.new_id)
    """A unique id (UUID4 text)."""
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    """When the event was emitted, timezone-aware UTC."""
    source: str | None = None
    """Where the event came from (CloudEvents ``source``), when known."""
    trace_context: Mapping[str, str] = Field(default_factory=dict)
    """W3C trace context (``traceparent``/``tracestate``) of the event's emit span, when the
    bus is traced (`fastapi_eventbus.otel.instrument_bus`); forwarders send it as message
    attributes, never in the payload."""
    extensions: Extensions = Field(default_factory=dict)
    """The event's other CloudEvents attributes: the optional ``subject`` and ``dataschema``,
    and extension attributes, by name. Given to ``emit(..., extensions=)``, or read from a
    received CloudEvent; forwarders send them (see `fastapi_eventbus.wire`). A message in
    binary mode (Pub/Sub attributes) carries every value as a string."""

    @field_validator("name")
    @classmethod
    def _usable_name(cls, name: str) -> str:  # what `emit` takes, not one it would refuse
        return check_name(name)

    @field_validator("id", "source")
    @classmethod
    def _usable_text(cls, value: str | None, info: ValidationInfo) -> str | None:
        return value if value is None else check_text(str(info.field_name), value)

    @field_validator("extensions")
    @classmethod
    def _no_context_attributes(cls, extensions: Extensions) -> Extensions:
        for key in extensions:
            if not key or key in RESERVED_ATTRIBUTES:
                raise ValueError(f"{key!r} is not an extension attribute (see RESERVED_ATTRIBUTES)")
        return extensions


def event_name_of(model_type: type[BaseModel]) -> str | None:
    """The ``__event_name__`` of a typed event model, or ``None`` if it has none."""
    name = getattr(model_type, "__event_name__", None)
    return name if isinstance(name, str) else None


def is_event_model(obj: object) -> bool:
    """Whether *obj* is a pydantic model class that declares ``__event_name__``."""
    return isinstance(obj, type) and issubclass(obj, BaseModel) and event_name_of(obj) is not None


MAX_NAME_LENGTH = 256
"""The longest event name, in characters. In UTF-8 that is at most 1,024 bytes, which
fits every carrier of the name: a Pub/Sub attribute value (1,024 bytes), an SQS message
attribute, a CloudEvents ``type``. It also bounds what a name costs in memory, in logs
and in the caches keyed by name."""

_LINE_BREAKS = frozenset("\u2028\u2029")
"""Unicode's line and paragraph separators: not control characters, but line breaks."""


def check_name(name: object) -> str:
    """Return *name*, as a plain str, if it is a usable event name; else raise `InvalidEventError`.

    A usable name is a non-empty str of at most `MAX_NAME_LENGTH` characters, without
    whitespace around it, control characters (C0, DEL, C1) or line separators, that UTF-8
    can encode. A str subclass (a ``StrEnum`` member) becomes its plain value."""
    if type(name) is str and name in _CHECKED_NAMES:  # most names come again and again
        return name
    if not isinstance(name, str):
        raise InvalidEventError(f"event name must be a str, got {type(name).__name__}: {name!r}")
    if len(name) > MAX_NAME_LENGTH:  # first: the other checks read the whole name
        raise InvalidEventError(
            f"event name {name[:40]!r}... is {len(name):,} characters long; "
            f"the longest allowed is {MAX_NAME_LENGTH}"
        )
    if not name or name.strip() != name:
        raise InvalidEventError(
            f"event name must be non-empty and have no surrounding whitespace, got {name!r}"
        )
    if not name.isprintable() and (bad := _control_character(name)) is not None:
        raise InvalidEventError(
            f"event name {name!r} contains the control character {bad!r} at position "
            f"{name.index(bad)}: names are printed in logs and terminals"
        )
    if (error := unencodable(name)) is not None:
        raise InvalidEventError(
            f"event name {name!r} contains text UTF-8 cannot encode ({error.reason})"
        ) from error
    if type(name) is not str:
        return plain_str(name)
    if len(_CHECKED_NAMES) < _CHECKED_NAMES_LIMIT:
        _CHECKED_NAMES.add(name)
    return name


_CHECKED_NAMES: set[str] = set()
"""Names `check_name` accepted already (plain str only), so that it checks each name once."""
_CHECKED_NAMES_LIMIT = 4096
"""How many accepted names are remembered: past that, names are checked at every use."""


MAX_ID_LENGTH = 1024
"""The longest id or source a received event may have, in characters (ours are 36)."""


def check_text(what: str, value: object, limit: int = MAX_ID_LENGTH) -> str:
    """*value* if it is a usable event id or source: a non-empty str of at most *limit*
    characters, without control characters or line separators (ids are printed in the log
    lines that report an event); else `InvalidEventError` naming *what*."""
    if not isinstance(value, str):
        raise InvalidEventError(f"{what} must be a string, got {type(value).__name__}")
    if not value or len(value) > limit:
        raise InvalidEventError(
            f"{what} {value[:40]!r} is {len(value):,} characters long: from 1 to {limit}"
        )
    if not value.isprintable() and (bad := _control_character(value)) is not None:
        raise InvalidEventError(
            f"{what} {value[:80]!r} contains the control character {bad!r}: it is printed "
            "in log lines"
        )
    return plain_str(value)


def _control_character(text: str) -> str | None:
    """The first control character (C0, DEL, C1) or line separator in *text*, if any.

    Only called for text that is not printable (rare), which also covers letters
    `str.isprintable` refuses but names may hold (other spaces, format characters).
    """
    for char in text:
        if char < " " or "\x7f" <= char <= "\x9f" or char in _LINE_BREAKS:
            return char
    return None


def plain_str(text: str) -> str:
    """*text* as a plain str: a str subclass (a ``StrEnum`` member) becomes its value."""
    return text if type(text) is str else str.__str__(text)


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
    nested = _check_json(data, name)
    if nested or type(payload) is not dict or len(payload) != len(data):  # flat dict: by size
        _check_merged_keys(payload, data, name)
    return data


def _check_merged_keys(source: Any, data: Any, name: str) -> None:
    """Raise `InvalidEventError` if converting *source* to the JSON data *data* lost a value
    without a word: two keys merged (``{1: "a", "1": "b"}`` is ``{"1": "b"}``), a model's
    secret masked. Walks both side by side through dicts, lists, tuples, models and
    dataclasses; a dict with fewer keys converted is searched for the two keys."""
    kind = type(data)
    if kind is dict:
        if type(source) is not dict and not isinstance(source, Mapping):
            for part, converted in _field_pairs(source, data):
                _check_merged_keys(part, converted, name)
            return
        if len(source) != len(data):
            _refuse_merged_keys(source, name)
        pairs = zip(source.values(), data.values())  # noqa: B905 (same length)
    elif kind is list and isinstance(source, _SEQUENCES):
        pairs = zip(source, data)  # noqa: B905 (same length)
    elif isinstance(source, pydantic.SecretStr | pydantic.SecretBytes):
        raise InvalidEventError(
            f"payload of event {name!r} holds a {type(source).__name__}, which JSON carries "
            "masked: handlers and brokers would get '**********'"
        )
    else:
        return
    for part, converted in pairs:
        kind = type(converted)
        if kind is dict or kind is list:
            _check_merged_keys(part, converted, name)


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


class SchemaRegistry:
    """Payload schemas by event name, checked at emit time."""

    __slots__ = ("_read_back", "_schemas", "empty")

    def __init__(self) -> None:
        self._schemas: dict[str, type[BaseModel]] = {}
        self._read_back: set[type[BaseModel]] = set()
        self.empty = True
        """Whether no schema is registered (an attribute: read at every ``emit``)."""

    def register(self, name: str, schema: type[BaseModel]) -> None:
        """Use *schema* to validate every payload emitted as *name*."""
        name = check_name(name)
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
            raise ConfigurationError(
                f"schema for {name!r} must be a pydantic model class, got {schema!r}"
            )
        known = self._schemas.get(name)
        if known is not None and known is not schema:
            raise ConfigurationError(
                f"event {name!r} already has the schema {known.__qualname__}; "
                f"cannot register {schema.__qualname__} too"
            )
        self._schemas[name] = schema
        self.empty = False

    def register_either(self, event: str | type[BaseModel], schema: type[BaseModel] | None) -> None:
        """`EventBus.register`'s two forms: a name and a model, or a typed event model."""
        if isinstance(event, str):
            if schema is None:
                raise ConfigurationError(
                    f"register({event!r}) needs a schema: register(name, Model)"
                )
            self.register(event, schema)
            return
        name = event_name_of(event) if schema is None and is_event_model(event) else None
        if name is None:
            raise ConfigurationError(
                "register() takes a model class with __event_name__, or a name and a model class"
            )
        self.register(name, event)

    def get(self, name: str) -> type[BaseModel] | None:
        return self._schemas.get(name)  # the schema registered for *name*, if any

    def validate(self, name: str, payload: Any) -> tuple[Any, str | None]:
        """Validate *payload* against the schema of *name*; its JSON data (see `to_json_data`)."""
        schema = self._schemas.get(name)
        if schema is None:
            return to_json_data(payload, name)
        if not isinstance(payload, schema):
            try:
                payload = schema.model_validate(payload)
            except ValidationError as exc:
                raise InvalidEventError(
                    f"payload of event {name!r} does not match its schema "
                    f"{schema.__qualname__}:\n{exc}"
                ) from exc
        data, body = to_json_data(payload.model_dump(mode="json", by_alias=True), name)
        _check_merged_keys(payload, data, name)  # model_dump already merged them
        if schema not in self._read_back:  # once per model: what its handlers will do
            try:
                schema.model_validate_json(orjson.dumps(data))
            except ValidationError as exc:
                raise InvalidEventError(
                    f"payload of event {name!r}, written as JSON, would not validate as "
                    f"{schema.__qualname__} in its handlers:\n{exc}"
                ) from exc
            self._read_back.add(schema)
        return data, body


_EMIT_USAGE = "use emit(name, payload) or emit(model) where the model class sets __event_name__"


def resolve_emit_args(
    registry: SchemaRegistry, first: object, payload: Any, has_payload: bool, text: bool = True
) -> tuple[str, Any, str | None]:
    """Turn the arguments of ``emit``/``publish`` into a validated name and JSON payload
    (with its JSON text, when the conversion made it and *text* asks for it)."""
    if type(first) is str and registry.empty:  # the common case first: no isinstance of ABCs
        checked = check_name(first)
        return (checked, *to_json_data(payload, checked, text))
    if isinstance(first, BaseModel):
        if has_payload:
            raise InvalidEventError(
                f"emit() got a {type(first).__name__} model and a payload; {_EMIT_USAGE}"
            )
        name = event_name_of(type(first))
        if name is None:
            raise InvalidEventError(
                f"{type(first).__qualname__} has no __event_name__; add "
                f'`__event_name__: ClassVar[str] = "..."` to the class, or {_EMIT_USAGE}'
            )
        name = check_name(name)
        return (name, *registry.validate(name, first))
    if isinstance(first, type) and issubclass(first, BaseModel):
        raise InvalidEventError(
            f"emit() got the class {first.__qualname__}, not an instance of it; {_EMIT_USAGE}"
        )
    name = check_name(first)
    if registry.empty:
        return (name, *to_json_data(payload, name))
    return (name, *registry.validate(name, payload))


_ALL_FIELDS = frozenset(Event.model_fields)
_FIELDS_SET = set(_ALL_FIELDS)
_set = object.__setattr__
_new = object.__new__
# `BaseModel`'s slots, set through their descriptors: no attribute lookup per event.
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


_NO_TRACE_CONTEXT: Mapping[str, str] = FrozenDict()
"""The trace context of the events of an untraced bus: one for all (see `set_trace_context`)."""


def make_event(
    name: str,
    payload: Any,
    source: str | None,
    payload_text: str | None = None,
    extensions: object = None,
) -> Event:
    """An `Event` of already validated parts (`model_construct`, minus its bookkeeping),
    with *payload_text*, its JSON if made (`payload_json`), and *extensions* (checked).

    Field by field, not one dict as ``__dict__``: the values live in the object, with the
    keys all events share (half the bytes; Python makes the dict only if it is read)."""
    checked = NO_EXTENSIONS if extensions is None else check_extensions(extensions, name)
    event = _new(Event)
    _set(event, "name", name)
    _set(event, "payload", payload)
    _set(event, "id", _ids.new_id())
    _set(event, "time", datetime.now(UTC))
    _set(event, "source", source)
    _set(event, "trace_context", _NO_TRACE_CONTEXT)
    _set(event, "extensions", checked)
    if payload_text is not None:
        _set(event, "_payload_json", payload_text)
    # One set for all events: pydantic only reads it (``model_copy`` copies it first).
    _set_fields_set(event, _FIELDS_SET)
    _set_extra(event, None)
    _set_private(event, None)
    return event


def payload_as(event: Event, model: type[BaseModel]) -> BaseModel:
    """*event*'s payload as a typed handler's *model*, from its JSON (as from a broker)."""
    return model.model_validate_json(payload_json(event))


def set_trace_context(event: Event, context: Mapping[str, str]) -> None:
    """Give a just-made *event* (not yet seen by anyone) the trace context of its emit span."""
    event.__dict__["trace_context"] = dict(context)


def payload_json(event: Event) -> str:
    """*event*'s payload as compact JSON: made once per event (at ``emit``, for an event a
    forwarder takes), and shared by the forwarders' checks and messages and the spool."""
    try:
        return event._payload_json  # type: ignore[attr-defined, no-any-return]
    except AttributeError:
        pass
    try:
        text = orjson.dumps(event.payload).decode()
    except TypeError:  # what orjson does not write, but JSON can: integers past 64 bits
        text = json.dumps(event.payload, separators=(",", ":"), ensure_ascii=False)
    _set(event, "_payload_json", text)
    return text


def event_json(event: Event) -> str:
    """*event* as JSON, as ``model_dump_json`` writes it, with its payload's JSON reused
    (`payload_json`) instead of written again: what the spool stores."""
    envelope = event.model_dump_json(exclude=_PAYLOAD)
    return f'{envelope[:-1]},"payload":{payload_json(event)}}}'


_PAYLOAD = {"payload"}
