"""A bus's settings as one frozen object, checked once, and the checks of numeric settings."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from ._hooks import OnDiscard, OnError
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
    name: str, value: object, *, positive: bool = False, optional: bool = False
) -> float | None:
    """*value* as seconds: a number (not a bool, not NaN) >= 0 (> 0 if *positive*), or None
    if *optional*. ``math.inf`` is allowed."""
    if value is None and optional:
        return None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and (value > 0 or (value == 0 and not positive)):  # type: ignore[operator]
        return float(value)  # type: ignore[arg-type]  # NaN compares False: refused
    bound = "> 0" if positive else ">= 0"
    either = " or None" if optional else ""
    raise ConfigurationError(f"{name} must be a number of seconds {bound}{either}, got {value!r}")


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
        check_int("max_chain_depth", self.max_chain_depth, 1)
        _set(self, "shutdown_timeout", check_seconds("shutdown_timeout", self.shutdown_timeout))
        for hook_name, hook in (("on_error", self.on_error), ("on_discard", self.on_discard)):
            if hook is not None and not callable(hook):
                raise ConfigurationError(f"{hook_name} must be callable, got {hook!r}")
        if self.source is not None and (not isinstance(self.source, str) or not self.source):
            raise ConfigurationError(f"source must be a non-empty str, got {self.source!r}")
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
