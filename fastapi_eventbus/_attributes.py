"""CloudEvents attributes an `Event` carries besides its own fields: extension attributes.

The rules their names and values follow (``emit`` checks them: `check_extensions`),
the names an event's extensions cannot take (`RESERVED_ATTRIBUTES`), and the
read-only mapping events share when they have none.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeAlias

from .exceptions import InvalidEventError

Extensions: TypeAlias = Mapping[str, str | int | bool]
"""An event's CloudEvents extension attributes (`Event.extensions`), by name: ``subject``,
``dataschema`` and any other. Values are str, bool or a 32-bit int."""


class FrozenDict(dict[str, Any]):
    """A dict that refuses to change: an event's trace context or extensions, which
    `make_event` shares between events when they are empty."""

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("an Event is immutable, its trace_context and extensions too")

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = _refuse  # type: ignore[assignment]
    __ior__ = _refuse  # type: ignore[assignment]

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self  # its values are str, int or bool: nothing in it can change

    def __reduce__(self) -> tuple[type[FrozenDict], tuple[dict[str, Any]]]:
        return FrozenDict, (dict(self),)  # not item by item: that is refused


NO_EXTENSIONS: Extensions = FrozenDict()
"""The extensions of an event emitted without any: one for all."""


RESERVED_ATTRIBUTES = frozenset(
    {"specversion", "id", "source", "type", "time", "datacontenttype", "data", "data_base64"}
    | {"traceparent", "tracestate"}
)
"""Attribute names `Event.extensions` cannot hold: the envelope's own fields (the
CloudEvents context attributes an `Event` has, and its data) and the trace context,
which is `Event.trace_context`."""

_EXTENSION_NAME = re.compile(r"[a-z0-9]+")
"""What the CloudEvents spec allows as an attribute name: lower-case ASCII letters and digits."""
_INT32 = range(-(2**31), 2**31)
"""CloudEvents' Integer type: a signed 32-bit integer."""


def check_extensions(extensions: object, name: str) -> Extensions:
    """*extensions* (``emit``'s argument for event *name*) if they are CloudEvents
    extension attributes a forwarder can send; else `InvalidEventError`.

    Names: lower-case ASCII letters and digits, not an attribute the envelope owns
    (`RESERVED_ATTRIBUTES`). Values: str, bool, or a signed 32-bit int (the
    CloudEvents types JSON carries as they are). Returns a read-only copy.
    """
    if not isinstance(extensions, Mapping):
        raise InvalidEventError(
            f"extensions of event {name!r} must be a mapping of attribute names to values, "
            f"got {type(extensions).__name__}"
        )
    checked: dict[str, str | int | bool] = {}
    for key, value in extensions.items():
        if not isinstance(key, str) or not _EXTENSION_NAME.fullmatch(key):
            raise InvalidEventError(
                f"extension attribute name {key!r} of event {name!r}: CloudEvents attribute "
                "names are lower-case ASCII letters and digits only"
            )
        if key in RESERVED_ATTRIBUTES:
            raise InvalidEventError(
                f"{key!r} is not an extension attribute of event {name!r}: the envelope sets "
                "it" + (" (see Event.trace_context)" if key.startswith("trace") else "")
            )
        if isinstance(value, str):
            if (error := unencodable(value)) is not None:
                raise InvalidEventError(
                    f"extension attribute {key!r} of event {name!r} contains text UTF-8 "
                    f"cannot encode ({error.reason})"
                ) from error
        elif not isinstance(value, bool) and not (type(value) is int and value in _INT32):
            raise InvalidEventError(
                f"extension attribute {key!r} of event {name!r} is {value!r}: a value is a "
                "str, a bool or a 32-bit int (CloudEvents' types for JSON)"
            )
        checked[key] = str.__str__(value) if isinstance(value, str) else value
    return FrozenDict(checked) if checked else NO_EXTENSIONS


def unencodable(text: str) -> UnicodeEncodeError | None:
    """Why UTF-8 cannot encode *text* (lone surrogates), or None: no broker could carry it."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc
    return None
