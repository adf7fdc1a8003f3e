"""Forward events to an Amazon EventBridge event bus, in ``PutEvents`` calls (extra ``aws``).

```python
from fastapi_eventbus.forwarders.eventbridge import EventBridgeForwarder

bus.forward("order.*", EventBridgeForwarder("shop", source="com.example.shop"))
```

Each entry's ``Detail`` is the event as a structured CloudEvent (`fastapi_eventbus.wire.sqs_body`)
plus its W3C trace context as ``traceparent``/``tracestate`` members, since EventBridge
has no message attributes: rules match on ``detail.data.<field>``, and the event's id,
time, source and trace survive to the worker. aiobotocore is imported when the
forwarder starts, never before.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, TypeAlias

from fastapi_eventbus._brokers import aws
from fastapi_eventbus._events import Event
from fastapi_eventbus._retry import Retry
from fastapi_eventbus.exceptions import ConfigurationError, InvalidEventError
from fastapi_eventbus.wire import DEFAULT_SOURCE, sqs_body, trace_attributes, utf8_size

from ._aws import AWSForwarder, translated
from ._base import Delivery, OnDeadLetter
from ._batching import Chunk, Failure, chunks, delivery_of, send_concurrently

if TYPE_CHECKING:
    from types_aiobotocore_events import EventBridgeClient
    from types_aiobotocore_events.type_defs import (
        PutEventsRequestEntryTypeDef,
        PutEventsResponseTypeDef,
    )

__all__ = [  # noqa: RUF022 - plain sorted(), as tests/test_exports.py checks
    "EventBridgeForwarder",
    "MAX_BATCH_ENTRIES",
    "MAX_CALL_BYTES",
    "MAX_ENTRY_BYTES",
    "SENDER_FAULT_CODES",
    "entry_detail",
    "entry_size",
]

MAX_BATCH_ENTRIES = 10
"""EventBridge's limit on the entries of one ``PutEvents`` call."""
MAX_ENTRY_BYTES = 262_144
"""EventBridge's limit for one entry, measured as AWS's formula does (see `entry_size`)."""
MAX_CALL_BYTES = 262_144
"""EventBridge's limit for the entries of one ``PutEvents`` call, together."""
SENDER_FAULT_CODES = frozenset(
    {
        "AccessDeniedException",
        "InvalidAccountIdException",
        "InvalidArgument",
        "MalformedDetail",
        "NotAuthorizedForDetailTypeException",
        "NotAuthorizedForSourceException",
        "RedactionFailure",
    }
)
"""The ``ErrorCode`` values of failed ``PutEvents`` entries that AWS documents as not
retryable: those entries are dead-lettered at once. Any other code (``ThrottlingException``,
``InternalFailure``, one AWS adds later) is retried per the forwarder's *retry*, then
dead-lettered if it still fails."""

_TIME_BYTES = 14
"""What AWS's entry-size formula counts for an entry's ``Time``."""
_MAX_SOURCE = 256
_MAX_DETAIL_TYPE = 128

_Entry: TypeAlias = "PutEventsRequestEntryTypeDef"


def _region_of(event_bus_name: str) -> str | None:
    """The region of an event bus ARN (``arn:PARTITION:events:REGION:ACCOUNT:event-bus/NAME``);
    None for a bus name. `ConfigurationError` for anything else that starts with ``arn:``."""
    if not event_bus_name.startswith("arn:"):
        return None
    parts = event_bus_name.split(":")
    if len(parts) != 6 or parts[2] != "events" or not parts[5].startswith("event-bus/"):
        raise ConfigurationError(
            "event_bus_name must be a bus name or an event bus ARN "
            f"(arn:aws:events:REGION:ACCOUNT:event-bus/NAME), got {event_bus_name!r}"
        )
    return parts[3] or None


def entry_detail(event: Event) -> str:
    """An entry's ``Detail``: the structured CloudEvent, with the trace context as members.

    The CloudEvents distributed-tracing extension's ``traceparent`` and
    ``tracestate``, since EventBridge events carry no attributes beside their detail.
    """
    body = sqs_body(event)
    trace = trace_attributes(event)
    if not trace:
        return body
    members = json.dumps(trace, separators=(",", ":"), ensure_ascii=False)
    return f"{members[:-1]},{body[1:]}"


def entry_size(source: str, detail_type: str, detail: str) -> int:
    """Bytes of an entry as AWS counts them against ``PutEvents``' limits.

    14 for ``Time``, and the UTF-8 bytes of ``Source``, ``DetailType`` and
    ``Detail`` (no ``Resources`` are sent). See AWS's "Calculating Amazon
    EventBridge PutEvents event entry size".
    """
    return _TIME_BYTES + utf8_size(source) + utf8_size(detail_type) + utf8_size(detail)


def _check_source(source: object, what: str) -> str:
    if not isinstance(source, str) or not 1 <= len(source) <= _MAX_SOURCE:
        raise InvalidEventError(f"{what} must be a str of 1 to {_MAX_SOURCE} characters")
    if source.startswith("aws."):
        raise InvalidEventError(f"{what} {source!r} starts with 'aws.', reserved for AWS")
    return source


def _check_detail_type(detail_type: object, what: str) -> str:
    if not isinstance(detail_type, str) or not 1 <= len(detail_type) <= _MAX_DETAIL_TYPE:
        raise InvalidEventError(f"{what} must be a str of 1 to {_MAX_DETAIL_TYPE} characters")
    return detail_type


def _failed_entries(response: PutEventsResponseTypeDef, chunk: Chunk[_Entry]) -> Delivery | None:
    """The `Delivery` for a ``PutEvents`` call: its ``Entries`` answer the request's in order."""
    answers = response.get("Entries", [])
    successful = (str(n) for n, answer in enumerate(answers) if answer.get("EventId"))
    failed = (
        Failure(str(n), code, answer.get("ErrorMessage", ""), code in SENDER_FAULT_CODES)
        for n, answer in enumerate(answers)
        if not answer.get("EventId") and (code := answer.get("ErrorCode", "no ErrorCode"))
    )
    events = {str(n): event for n, (_, event) in enumerate(chunk)}
    return delivery_of(events, successful, failed)


class EventBridgeForwarder(AWSForwarder["EventBridgeClient"]):
    """Puts events on one EventBridge event bus with ``PutEvents``, through aiobotocore.

    Each `send` splits the batch into calls of at most 10 entries and 262,144
    bytes (AWS's entry-size formula), run concurrently. Failed entries
    (``FailedEntryCount``, an ``ErrorCode`` per entry) are dead-lettered when
    their code is in `SENDER_FAULT_CODES` and retried otherwise. An event
    whose entry would exceed *max_message_bytes*, or whose ``Source`` or
    ``DetailType`` EventBridge would refuse, is refused at ``emit`` with
    `InvalidEventError`.

    An entry's ``Source`` is *source*, else the event's own (its bus's
    ``source``, else `fastapi_eventbus.wire.DEFAULT_SOURCE`); its
    ``DetailType`` is *detail_type*, else the event's name; its ``Time`` the
    event's; its ``Detail`` the structured CloudEvent (see `entry_detail`), so rules
    match the payload as ``detail.data.<field>``, and a worker reading a rule's
    SQS target gets the event back with its own id.

    Args:
        event_bus_name: The bus's name or ARN (default: the account's ``default`` bus).
        source: Every entry's ``Source`` (e.g. ``"com.example.shop"``); must not
            start with ``aws.``. Default: each event's own source.
        detail_type: Every entry's ``DetailType``; default: each event's name.
        region_name: The AWS region; default: the one in an ARN, else botocore's
            configuration (``AWS_DEFAULT_REGION``, ``~/.aws/config``).
        endpoint_url: Another endpoint than AWS's (LocalStack, moto, a VPC endpoint).
        aws_access_key_id: Credentials; default: botocore's credential chain.
        aws_secret_access_key: See *aws_access_key_id*.
        aws_session_token: See *aws_access_key_id*.
        max_message_bytes: The largest entry accepted (AWS's formula); at most
            EventBridge's 262,144 bytes.
        retry: The retry policy for transient failures.
        dead_letter: Called with a `DeadLetter` for events that could not be delivered.
        name: A name for logs (default: ``EventBridgeForwarder``).
        verify_on_start: At startup, check the bus with ``DescribeEventBus`` and
            fail the application's startup if the region, the credentials or
            the bus are wrong. Needs the ``events:DescribeEventBus`` permission.

    Raises:
        MissingExtraError: aiobotocore (the ``aws`` extra) is not installed.
        ConfigurationError: An argument is invalid, e.g. a *source* starting with
            ``aws.``, or only one of the two credentials.
    """

    messaging_system: ClassVar[str] = "aws.eventbridge"
    """The OpenTelemetry ``messaging.system`` of send spans (the conventions name none for
    EventBridge; this follows their ``aws.sns`` form)."""
    # The service AWSForwarder opens a client of, and its name in error messages.
    _service = "events"
    _service_name = "EventBridge"
    _largest_message = MAX_ENTRY_BYTES

    def __init__(
        self,
        event_bus_name: str = "default",
        *,
        source: str | None = None,
        detail_type: str | None = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        max_message_bytes: int = MAX_ENTRY_BYTES,
        retry: Retry | None = None,
        dead_letter: OnDeadLetter | None = None,
        name: str | None = None,
        verify_on_start: bool = False,
    ) -> None:
        aws.require_sdk()
        if not isinstance(event_bus_name, str) or not event_bus_name:
            raise ConfigurationError(
                f"event_bus_name must be a bus name or ARN, got {event_bus_name!r}"
            )
        try:
            if source is not None:
                _check_source(source, "source")
            if detail_type is not None:
                _check_detail_type(detail_type, "detail_type")
        except InvalidEventError as exc:
            raise ConfigurationError(str(exc)) from None
        self.event_bus_name = event_bus_name
        """The bus's name or ARN."""
        self.source = source
        """Every entry's ``Source``, if set (else each event's source)."""
        self.detail_type = detail_type
        """Every entry's ``DetailType``, if set (else each event's name)."""
        super().__init__(
            region_name=region_name or _region_of(event_bus_name),
            endpoint_url=endpoint_url,
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            aws_session_token=aws_session_token,
            max_message_bytes=max_message_bytes,
            retry=retry,
            dead_letter=dead_letter,
            name=name,
            verify_on_start=verify_on_start,
        )

    def __repr__(self) -> str:
        return f"<EventBridgeForwarder {self.name!r} event_bus_name={self.event_bus_name!r}>"

    @property
    def destination(self) -> str:
        """The bus's name (the last part of an ARN)."""
        return self.event_bus_name.rsplit("/", 1)[-1]

    @property
    def client(self) -> EventBridgeClient:
        """The aiobotocore EventBridge client, once `start` ran (for hooks and extra calls)."""
        return super().client

    # -- lifecycle ----------------------------------------------------------------

    async def verify(self) -> None:
        """Check the bus with ``DescribeEventBus`` (with *verify_on_start*).

        Fails if the region or credentials are missing or wrong, or if the bus
        does not exist. Needs the ``events:DescribeEventBus`` permission.
        """
        with translated(self, f"{self.name}: DescribeEventBus on {self.event_bus_name}"):
            await self.client.describe_event_bus(Name=self.event_bus_name)

    # -- entries --------------------------------------------------------------------

    def _source_of(self, event: Event) -> str:
        return self.source or _check_source(event.source or DEFAULT_SOURCE, "the event's source")

    def _detail_type_of(self, event: Event) -> str:
        return self.detail_type or _check_detail_type(event.name, "the event's name")

    def encoded_size(self, event: Event) -> int:
        """Bytes of *event*'s entry by AWS's formula (see `entry_size`)."""
        return entry_size(self._source_of(event), self._detail_type_of(event), entry_detail(event))

    def check(self, event: Event) -> None:
        """Raise `InvalidEventError` if *event* could never be put on this bus.

        Called at emit time: the entry's size, its ``Source`` (none starting
        with ``aws.``) and its ``DetailType`` (1 to 128 characters).
        """
        try:
            self._source_of(event)
            self._detail_type_of(event)
        except InvalidEventError as exc:
            raise InvalidEventError(
                f"event {event.name!r} for forwarder {self.name}: {exc}"
            ) from None
        super().check(event)

    def _entry(self, event: Event) -> tuple[int, _Entry, Event]:
        source, detail_type, text = (
            self._source_of(event),
            self._detail_type_of(event),
            entry_detail(event),
        )
        entry: PutEventsRequestEntryTypeDef = {
            "EventBusName": self.event_bus_name,
            "Source": source,
            "DetailType": detail_type,
            "Detail": text,
            "Time": event.time,
        }
        return entry_size(source, detail_type, text), entry, event

    # -- sending ----------------------------------------------------------------------

    async def send(self, events: Sequence[Event]) -> Delivery | None:
        """Put *events* in ``PutEvents`` calls; report failed entries.

        Raises `ForwarderError` when no call went through; when only some did,
        the events of the others are returned for a retry.
        """
        client = self.client
        calls = list(chunks(map(self._entry, events), MAX_BATCH_ENTRIES, MAX_CALL_BYTES))

        async def send_chunk(chunk: Chunk[_Entry]) -> Delivery | None:
            with translated(self):
                response = await client.put_events(Entries=[entry for entry, _ in chunk])
            return _failed_entries(response, chunk)

        return await send_concurrently(send_chunk, calls)
