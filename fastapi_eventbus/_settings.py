"""A bus's settings as one frozen object, checked once, and the checks of numeric settings."""

from __future__ import annotations

import math
import os
import re
import string
from dataclasses import dataclass
from typing import Any

from ._hooks import OnDiscard, OnError, check_hook
from .exceptions import ConfigurationError


def check_int(
    name: str,
    value: object,
    minimum: int,
    *,
    optional: bool = False,
    maximum: int | None = None,
) -> int | None:
    """*value* if it is an int (not a bool) >= *minimum* (and <= *maximum*, if given), or
    None if *optional*."""
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        either = " or None" if optional else ""
        bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ConfigurationError(f"{name} must be an int {bound}{either}, got {value!r}")
    return value


def check_seconds(
    name: str,
    value: object,
    *,
    positive: bool = False,
    optional: bool = False,
    below: float | None = None,
) -> float | None:
    """*value* as seconds: a number (not a bool, not NaN) >= 0 (> 0 if *positive*), and
    less than *below* if given, or None if *optional*. Else ``math.inf`` is allowed."""
    if value is None and optional:
        return None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    within = number and (below is None or value < below)  # type: ignore[operator]
    if within and (value > 0 or (value == 0 and not positive)):  # type: ignore[operator]
        return float(value)  # type: ignore[arg-type]  # NaN compares False: refused
    bound = "> 0" if positive else ">= 0"
    if below is not None:
        bound += f" and < {below:g}"
    either = " or None" if optional else ""
    raise ConfigurationError(f"{name} must be a number of seconds {bound}{either}, got {value!r}")


# RFC 3986's characters: what each part of a URI-reference may hold (besides "%XX").
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_SUB_DELIMS = frozenset("!$&'()*+,;=")
_REG_NAME = _UNRESERVED | _SUB_DELIMS | {"%"}
_USERINFO = _REG_NAME | {":"}
_PATH = _USERINFO | {"@", "/"}
_QUERY = _PATH | {"?"}
_URI_CHARACTERS = _QUERY | {"#", "[", "]"}
_SPLIT = re.compile(r"(?:([^:/?#]+):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?", re.DOTALL)
"""RFC 3986, appendix B: a URI-reference's scheme, authority, path, query and fragment."""
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_IP_LITERAL = re.compile(r"\[(?:[0-9A-Fa-f:.]+|v[0-9A-Fa-f]+\.[-._~!$&'()*+,;=:A-Za-z0-9]+)\]")


def check_uri_reference(name: str, value: object) -> str:
    """*value* if it is a URI-reference (RFC 3986): an absolute URI or a relative reference.

    ``https://shop.example/orders``, ``urn:shop:orders``, ``/orders`` and ``my-shop``
    are; text with a space, a non-ASCII letter or a stray ``%`` or ``#`` is not.
    """
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{name} must be a non-empty str, got {value!r}")
    why = _not_a_uri_reference(value)
    if why is not None:
        raise ConfigurationError(
            f"{name} must be a URI-reference (RFC 3986), as CloudEvents requires, such as "
            f"'/orders', 'urn:shop:orders' or 'https://shop.example/orders': {value!r} has {why}"
        )
    return value


def _not_a_uri_reference(text: str) -> str | None:
    """Why *text* is not a URI-reference, or None if it is one."""
    for index, char in enumerate(text):
        if char not in _URI_CHARACTERS:
            return f"{char!r} at position {index}, which a URI cannot hold"
        digits = text[index + 1 : index + 3]
        if char == "%" and not (len(digits) == 2 and all(c in string.hexdigits for c in digits)):
            return f"a '%' not followed by two hex digits at position {index}"
    parts = _SPLIT.fullmatch(text)
    assert parts is not None  # every group is optional: any text matches
    scheme, authority = parts[1], parts[2]
    if scheme is not None and not _SCHEME.fullmatch(scheme):
        return (
            f"the scheme {scheme!r}, which is not one (a letter, then letters, digits, '+', "
            "'-' or '.'; and a relative reference cannot have ':' in its first segment)"
        )
    if authority is not None and (why := _bad_authority(authority)) is not None:
        return why
    for group, allowed in ((3, _PATH), (4, _QUERY), (5, _QUERY)):
        for index, char in enumerate(parts[group] or ""):
            if char not in allowed:
                return (
                    f"{char!r} at position {parts.start(group) + index}, where a URI cannot hold it"
                )
    return None


def _bad_authority(authority: str) -> str | None:
    """Why *authority* (``user@host:port``) is not one, or None."""
    userinfo, _, host_port = authority.rpartition("@")
    if any(char not in _USERINFO for char in userinfo):
        return f"the user information {userinfo!r}, which is not one"
    if host_port.startswith("["):
        host, bracket, rest = host_port.partition("]")
        host += bracket
        if not _IP_LITERAL.fullmatch(host) or (rest and not rest.startswith(":")):
            return f"the host {host_port!r}, which is not an IP literal"
        port = rest[1:]
    else:
        host, _, port = host_port.partition(":")
        if any(char not in _REG_NAME for char in host):
            return f"the host {host!r}, which is not a host name"
    if port and not (port.isascii() and port.isdigit()):
        return f"the port {port!r}, which is not a number"
    return None


@dataclass(frozen=True, slots=True)
class Settings:
    """What `EventBus` was created with (its keyword arguments but the spool), checked once."""

    disabled: bool = False
    max_chain_depth: int = 8
    shutdown_timeout: float = 10.0
    keep_events_on_error: bool = False
    on_error: OnError | None = None
    on_discard: OnDiscard | None = None
    source: str | None = None
    max_batch_events: int | None = 10_000
    max_pending_events: int | None = 50_000
    handler_timeout: float | None = 60.0
    """The time limit of handlers that do not set their own (seconds; None: none)."""

    def __post_init__(self) -> None:
        for flag in ("disabled", "keep_events_on_error"):  # "false" would be true
            if not isinstance(getattr(self, flag), bool):
                raise ConfigurationError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        check_int("max_chain_depth", self.max_chain_depth, 1)
        _set(self, "shutdown_timeout", check_seconds("shutdown_timeout", self.shutdown_timeout))
        check_hook("on_error", self.on_error)
        check_hook("on_discard", self.on_discard)
        if self.source is not None:
            check_uri_reference("source", self.source)
        check_int("max_batch_events", self.max_batch_events, 1, optional=True)
        check_int("max_pending_events", self.max_pending_events, 1, optional=True)
        limit = check_seconds("handler_timeout", self.handler_timeout, positive=True, optional=True)
        _set(self, "handler_timeout", None if limit == math.inf else limit)


def _set(settings: Settings, name: str, value: Any) -> None:
    object.__setattr__(settings, name, value)  # frozen: normalised once, in __post_init__


_DISABLED_VALUES = frozenset({"1", "true", "yes", "on"})


def disabled_by_env() -> bool:
    """Whether ``FASTAPI_EVENTBUS_DISABLED`` asks for a no-op bus."""
    return os.environ.get("FASTAPI_EVENTBUS_DISABLED", "").strip().lower() in _DISABLED_VALUES
