"""Exceptions raised by fastapi_eventbus.

Every error the library raises on purpose derives from `EventBusError`, so one
``except EventBusError`` catches them all:

    EventBusError
    ├── ConfigurationError        a handler, pattern, schema or setting is wrong
    │   └── BusNotInstalledError  get_bus used in an app with no bus installed
    ├── InvalidEventError         a bad event name or payload (also a ValueError)
    ├── OutsideRequestError       emit with no request (or handler call) to take the event
    ├── EventChainError           events chained deeper than max_chain_depth
    ├── CapacityError             too many events pending (bounded memory)
    ├── SpoolError                the spool file cannot be read or written
    ├── MessageDecodeError        a received message is not an event (a ValueError)
    ├── ForwarderError            a forwarder failed (transient: a retry may help)
    │   └── MissingExtraError     an optional SDK is not installed (names the extra)
    ├── SourceError               a worker's queue or subscription failed (transient)
    └── HandlerFailuresError      handlers failed inside a `capture` block (tests)

Errors are raised where the mistake was made: at decoration time for handlers, in
the constructor for settings, in the caller of `EventBus.emit` for events. Nothing is
deferred to the background.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BusNotInstalledError",
    "CapacityError",
    "ConfigurationError",
    "EventBusError",
    "EventChainError",
    "ForwarderError",
    "HandlerFailuresError",
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
    """An event name or payload was rejected where `EventBus.emit` or `EventBus.publish` ran.

    Also a `ValueError`.
    """


class OutsideRequestError(EventBusError):
    """`EventBus.emit` has no request (or handler call) to take the event, which would never
    be handled: emitted on the application bus, which has none; or on a request's bus after
    its application shut down (``bus.close()``, the lifespan's exit) or its event loop
    closed; or on a handler call's bus after the handler ran out of time (a sync handler's
    thread runs on).

    In an endpoint, a dependency or a handler, emit on the bus ``Depends(get_bus)`` gives;
    elsewhere, ``await bus.publish(...)``.
    """


class EventChainError(EventBusError):
    """A handler emitted an event deeper in a chain than the bus's ``max_chain_depth`` allows."""


class CapacityError(EventBusError):
    """`EventBus.emit` or `EventBus.publish` refused an event: there are as many as allowed.

    Raised in the caller, with a WARNING log line (at most one a second), instead of
    letting memory grow without bound (``max_batch_events``, ``max_pending_events`` of
    `EventBus`). An endpoint may turn it into a 503.
    """


class SpoolError(EventBusError):
    """The spool file could not be opened, read or written (disk full, locked too long)."""


class MessageDecodeError(EventBusError, ValueError):
    """A message received from a queue is not a CloudEvent this library can decode.

    Also a `ValueError`. Raised by `fastapi_eventbus.wire.decode_message` and
    `fastapi_eventbus.wire.from_cloudevent`.
    """


class ForwarderError(EventBusError):
    """A forwarder could not deliver events.

    Forwarders raise it (``from`` the SDK's exception) so that SDK errors never
    reach the application; ``transient=True`` asks for a retry with backoff.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        """Whether a retry may help (throttling, a 5xx, an unreachable broker)."""


class MissingExtraError(ForwarderError, ImportError):
    """An optional dependency is missing; the message names the extra to install.

    Also an `ImportError`. Never transient.
    """

    def __init__(self, extra: str, package: str) -> None:
        super().__init__(
            f"{package} is not installed: pip install 'fastapi-eventbus-di[{extra}]'",
            transient=False,
        )
        self.extra = extra
        """The extra to install: ``aws``, ``gcp`` or ``otel``."""


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
        """Whether a retry may help: the worker then backs off and receives again."""


class HandlerFailuresError(EventBusError):
    """Handlers failed inside a ``with capture(bus):`` block; raised when the block ends.

    So that a test with a broken handler fails without asserting on it. The
    message lists every failed call; the first failure's exception is the
    ``__cause__``. ``capture(bus, raise_failures=False)`` does not raise it.
    """

    def __init__(self, message: str, failures: Sequence[object]) -> None:
        super().__init__(message)
        self.failures = tuple(failures)
        """The failed handler calls (`fastapi_eventbus.testing.HandledEvent`), in order."""
