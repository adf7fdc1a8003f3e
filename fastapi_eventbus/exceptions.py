"""Exceptions raised by fastapi_eventbus.

Every error the library raises on purpose derives from `EventBusError`, so one
``except EventBusError`` catches them all::

    EventBusError
    ├── ConfigurationError        a handler, pattern, schema or install call is wrong
    │   └── BusNotInstalledError  get_bus used in an app where no bus was installed
    ├── InvalidEventError         emit/publish got a bad name or payload (also a ValueError)
    ├── OutsideRequestError       emit on the application bus, which has no request batch
    └── EventChainError           chained events went deeper than ``max_chain_depth``

Errors are raised where the mistake was made: at decoration time for handlers, in
the constructor for settings, in the caller of ``emit`` for events. Nothing is
deferred to the background.
"""

from __future__ import annotations

__all__ = [
    "BusNotInstalledError",
    "ConfigurationError",
    "EventBusError",
    "EventChainError",
    "InvalidEventError",
    "OutsideRequestError",
]


class EventBusError(Exception):
    """Base class of every error raised by fastapi_eventbus."""


class ConfigurationError(EventBusError):
    """The bus, a handler, a pattern or a schema is set up wrongly."""


class BusNotInstalledError(ConfigurationError):
    """`get_bus` was used in an application where `EventBus.install` was never called."""


class InvalidEventError(EventBusError, ValueError):
    """An event name or payload was rejected at the `emit`/`publish` call site."""


class OutsideRequestError(EventBusError):
    """`emit` was called on the application bus, which has no request to attach events to."""


class EventChainError(EventBusError):
    """A handler emitted an event deeper in a chain than `max_chain_depth` allows."""
