"""Exceptions raised by fastapi_eventbus.

Every error the library raises on purpose derives from `EventBusError`, so one
``except EventBusError`` catches them all::

    EventBusError
    ├── ConfigurationError        a handler, pattern, schema or install call is wrong
    │   └── BusNotInstalledError  get_bus used in an app where no bus was installed
    ├── InvalidEventError         emit/publish got a bad name or payload (also a ValueError)
    ├── OutsideRequestError       emit on the application bus, which has no request batch
    ├── EventChainError           chained events went deeper than ``max_chain_depth``
    ├── CapacityError             emit/publish refused: too many events pending (bounded memory)
    ├── SpoolError                the spool file cannot be read or written
    ├── MessageDecodeError        a received queue message is not a valid event (a ValueError)
    ├── ForwarderError            a forwarder failed; ``transient`` says whether a retry may help
    │   └── MissingExtraError     an optional SDK is not installed (names the extra to install)
    └── SourceError               a worker's queue or subscription failed; ``transient`` as above

Errors are raised where the mistake was made: at decoration time for handlers, in
the constructor for settings, in the caller of ``emit`` for events. Nothing is
deferred to the background.
"""

from __future__ import annotations

__all__ = [
    "BusNotInstalledError",
    "CapacityError",
    "ConfigurationError",
    "EventBusError",
    "EventChainError",
    "ForwarderError",
    "InvalidEventError",
    "MessageDecodeError",
    "MissingExtraError",
    "OutsideRequestError",
    "SourceError",
    "SpoolError",
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


class CapacityError(EventBusError):
    """`emit`/`publish` refused an event: a batch or the bus holds as many as allowed.

    Raised in the caller, with a WARNING log line, instead of letting memory grow
    without bound (``max_batch_events``, ``max_pending_events`` of `EventBus`).
    An endpoint may turn it into a 503.
    """


class SpoolError(EventBusError):
    """The spool file could not be opened, read or written (disk full, locked too long)."""


class MessageDecodeError(EventBusError, ValueError):
    """A message received from a queue is not a CloudEvent this library can decode."""


class ForwarderError(EventBusError):
    """A forwarder could not deliver events.

    Forwarders raise it (``from`` the SDK's exception) so that SDK errors never
    reach the application; ``transient=True`` asks for a retry with backoff.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class MissingExtraError(ForwarderError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, extra: str, package: str) -> None:
        super().__init__(
            f"{package} is not installed: pip install 'fastapi-eventbus[{extra}]'",
            transient=False,
        )
        self.extra = extra


class SourceError(EventBusError):
    """A worker's source (an SQS queue, a Pub/Sub subscription) failed to receive or settle.

    Sources raise it (``from`` the SDK's exception). ``transient=True`` means a
    retry may help (throttling, a 5xx, an unreachable broker): the worker logs
    it and tries again with backoff. Otherwise (a missing queue, a denied
    permission) the worker stops.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
