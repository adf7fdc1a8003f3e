"""The event envelope and everything that turns ``emit`` arguments into one."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from types import UnionType
from typing import Any, TypeGuard, Union, get_args, get_origin

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from . import _ids
from ._attributes import (
    NO_EXTENSIONS,
    RESERVED_ATTRIBUTES,
    Extensions,
    FrozenDict,
    check_extensions,
    unencodable,
)
from ._payloads import check_merged_keys, to_json_data
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


def is_event_model(obj: object) -> TypeGuard[type[BaseModel]]:
    """Whether *obj* is a pydantic model class that declares ``__event_name__``."""
    return isinstance(obj, type) and issubclass(obj, BaseModel) and event_name_of(obj) is not None


def events_in_union(annotation: object) -> str | None:
    """*annotation* written out (``Cat | Dog``, ``Event | None``) if it is a union naming an
    event type (`Event` or an event model); None otherwise."""
    if get_origin(annotation) not in (Union, UnionType):
        return None
    members = get_args(annotation)
    if not any(
        (isinstance(m, type) and issubclass(m, Event)) or is_event_model(m) for m in members
    ):
        return None
    return " | ".join(
        "None" if m is type(None) else getattr(m, "__qualname__", str(m)) for m in members
    )


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


def shown(text: str) -> str:
    """*text* safe to print on one line (a log line, a terminal): what is not printable
    (newlines, ESC and the other C0 and C1 controls, line separators, bidi controls) and
    backslashes are written as Python escapes, so that text from outside cannot forge lines,
    rows or colours."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(
        c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def plain_str(text: str) -> str:
    """*text* as a plain str: a str subclass (a ``StrEnum`` member) becomes its value."""
    return text if type(text) is str else str.__str__(text)


class SchemaRegistry:
    """Payload schemas by event name, checked at emit time."""

    __slots__ = ("_schemas", "empty")

    def __init__(self) -> None:
        self._schemas: dict[str, type[BaseModel]] = {}
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
            # (a typed model's __event_name__ is literal, wildcards and all: see `pattern_of`)
            if wildcards := sorted(set("*?[").intersection(event)):
                raise ConfigurationError(
                    f"register() takes an event name, not a pattern: {event!r} has the "
                    f"wildcard(s) {' '.join(wildcards)}, and the schema would validate only "
                    "the events named exactly so. Register the schema under each name it is "
                    'for: bus.register("cat.created", Model)'
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
            data, body = to_json_data(payload, name)
            if isinstance(payload, BaseModel):  # no handler here: maybe in a worker
                self._read_back_as(type(payload), data, body, name)
            return data, body
        if not isinstance(payload, schema):
            try:
                payload = schema.model_validate(payload)
            except ValidationError as exc:
                raise InvalidEventError(
                    f"payload of event {name!r} does not match its schema "
                    f"{schema.__qualname__}:\n{exc}"
                ) from exc
        data, body = to_json_data(payload.model_dump(mode="json", by_alias=True), name)
        check_merged_keys(payload, data, name)  # model_dump already merged them
        self._read_back_as(schema, data, body, name)
        return data, body

    def _read_back_as(self, model: type[BaseModel], data: Any, text: str | None, name: str) -> None:
        """Raise `InvalidEventError` if *data* (*text*, its JSON, if made) would not validate
        as *model*, as a typed handler reads it (a computed field in a model that forbids
        extras, a serializer dropping a required field), or would read back as other values
        (written under an alias the model does not read). For every event: serializers
        can depend on the values."""
        written = orjson.dumps(data).decode() if text is None else text
        try:
            back = model.model_validate_json(written)
        except ValidationError as exc:
            raise InvalidEventError(
                f"payload of event {name!r}, written as JSON, would not validate as "
                f"{model.__qualname__} in its handlers:\n{exc}"
            ) from exc
        if back.model_dump_json(by_alias=True) == written:  # the usual case, in Rust
            return
        if (where := _changed(back.model_dump(mode="json", by_alias=True), data, "")) is not None:
            raise InvalidEventError(
                f"payload of event {name!r}, written as JSON, would read back as "
                f"{model.__qualname__} with another value at {where or 'its root'} in its "
                "handlers: check the model's aliases and serializers"
            )


def _changed(back: Any, data: Any, path: str) -> str | None:
    """Where *back* (a model's dump after reading *data*) differs from *data*, if it does:
    each key both hold must hold the same (*data* may hold more: a subclass's fields, which
    the handler's model does not read; and less: a value its serializer leaves out, which
    reads back as the field's default)."""
    if type(back) is dict and type(data) is dict:
        for key, value in back.items():
            where = f"{path}.{key}" if path else str(key)
            if key in data and (found := _changed(value, data[key], where)) is not None:
                return found
        return None
    if type(back) is list and type(data) is list and len(back) == len(data):
        for index, (item, written) in enumerate(zip(back, data, strict=True)):
            if (found := _changed(item, written, f"{path}[{index}]")) is not None:
                return None if _same_items(back, data) else found  # a set, in another order
        return None
    return None if back == data else path


def _same_items(one: list[Any], other: list[Any]) -> bool:
    """Whether two lists hold the same items, in any order (a set read back)."""
    return sorted(map(orjson.dumps, one)) == sorted(map(orjson.dumps, other))


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
