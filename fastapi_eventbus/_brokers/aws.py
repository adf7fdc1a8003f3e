"""Private: what the AWS forwarders and `SQSSource` share (aiobotocore).

`SQSForwarder`, `SNSForwarder`, `EventBridgeForwarder` and `SQSSource` share the
``aws`` extra check, the client settings and their client (SQS's, SNS's or
EventBridge's: `ClientSettings.open_client`), the region in a queue URL and the
translation of botocore's errors. Here too is the reading of a received SQS
message: the event in its body (a structured CloudEvent, an SNS notification of
one, or an EventBridge event, whose ``detail`` may be the CloudEvent), its size
as SQS counts it, and the trace context that event has (its message attributes, the
SNS notification's, or the CloudEvent's own members); and a record of the event an
SQS event source mapping gives a Lambda function, turned into that shape
(`from_lambda_record`). aiobotocore and botocore are imported when a client is
created or an error translated, never here.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeGuard, overload
from urllib.parse import urlsplit

from pydantic import ValidationError

from fastapi_eventbus._events import Event, check_name
from fastapi_eventbus.exceptions import (
    ForwarderError,
    InvalidEventError,
    MessageDecodeError,
    MissingExtraError,
    SourceError,
)
from fastapi_eventbus.wire import TRACE_ATTRIBUTES, cloudevent_trace_context, from_cloudevent

from . import byte_length, envelope, is_trace_value, parse_json, parse_time, trace_or_nothing

if TYPE_CHECKING:
    from types_aiobotocore_events import EventBridgeClient
    from types_aiobotocore_sns import SNSClient
    from types_aiobotocore_sqs import SQSClient

Service: TypeAlias = Literal["sqs", "sns", "events"]
"""The botocore service names `ClientSettings.open_client` opens a client of."""

TRANSIENT_CODES = frozenset(
    {
        "BandwidthLimitExceeded",
        "KmsThrottled",
        "LimitExceededException",
        "PriorRequestNotComplete",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestTimeout",
        "RequestTimeoutException",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
    }
)
"""Error codes a retry may fix (botocore's throttling and transient codes, plus SQS's own)."""
MESSAGE_CODES = frozenset(
    {
        "BatchRequestTooLong",
        "InvalidMessageContents",
        "InvalidParameter",
        "InvalidParameterValue",
        "ValidationException",
    }
)
"""Error codes that may be about one message of a batch call (one that fails it whole):
SQS's, SNS's and EventBridge's for a value they refuse."""


def about_a_message(exc: BaseException) -> bool:
    """Whether *exc* (or the botocore error it comes from) may be about one message of a
    batch call: an error code of `MESSAGE_CODES`, or a request botocore refused to send.
    Not a missing queue or topic, nor a denied access: those are every message's."""
    from botocore.exceptions import ClientError, ParamValidationError

    while exc is not None:
        if isinstance(exc, ClientError):
            return exc.response.get("Error", {}).get("Code", "") in MESSAGE_CODES
        if isinstance(exc, ParamValidationError):
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


AWS_HOST = re.compile(
    r"(?:sqs\.(?P<region>[a-z0-9-]+)|(?P<legacy>[a-z0-9-]+)\.queue)\.amazonaws\.com(?:\.cn)?"
)
"""The host of an AWS SQS queue URL, with its region."""


def require_sdk() -> None:
    """Raise `MissingExtraError` if aiobotocore (the ``aws`` extra) is not installed."""
    if importlib.util.find_spec("aiobotocore") is None:
        raise MissingExtraError("aws", "aiobotocore")


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What the forwarder and the source pass to ``create_client``; secrets stay out of repr."""

    region_name: str | None
    endpoint_url: str | None
    aws_access_key_id: str | None = field(repr=False)
    aws_secret_access_key: str | None = field(repr=False)
    aws_session_token: str | None = field(repr=False)

    @overload
    async def open_client(
        self, stack: AsyncExitStack, read_timeout: float, service: Literal["sqs"] = "sqs"
    ) -> SQSClient: ...

    @overload
    async def open_client(
        self, stack: AsyncExitStack, read_timeout: float, service: Literal["sns"]
    ) -> SNSClient: ...

    @overload
    async def open_client(
        self, stack: AsyncExitStack, read_timeout: float, service: Literal["events"]
    ) -> EventBridgeClient: ...

    async def open_client(
        self, stack: AsyncExitStack, read_timeout: float, service: Service = "sqs"
    ) -> SQSClient | SNSClient | EventBridgeClient:
        """Create an aiobotocore client of *service* (default SQS) on *stack* (no network call).

        botocore's own retries are off: the forwarders and the worker retry
        themselves, and botocore's retries would multiply attempts or hide outages.
        """
        from aiobotocore.config import AioConfig
        from aiobotocore.session import AioSession

        config = AioConfig(
            retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=read_timeout
        )
        return await stack.enter_async_context(
            AioSession().create_client(
                service,
                region_name=self.region_name,
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.aws_access_key_id,
                aws_secret_access_key=self.aws_secret_access_key,
                aws_session_token=self.aws_session_token,
                config=config,
            )
        )


def region_of(queue_url: str) -> str | None:
    """The AWS region in an SQS queue URL (``https://sqs.REGION.amazonaws.com/...``), if any."""
    match = AWS_HOST.fullmatch(urlsplit(queue_url).hostname or "")
    if match is None:
        return None
    return match["region"] or match["legacy"]


def endpoint_of(queue_url: str) -> str | None:
    """The endpoint a queue URL names when it is not AWS's public one for its region (moto,
    LocalStack, a VPC endpoint): its scheme and host; None for an AWS queue URL, whose
    endpoint botocore derives from the region."""
    parts = urlsplit(queue_url)
    if not parts.scheme or not parts.netloc or AWS_HOST.fullmatch(parts.hostname or ""):
        return None
    return f"{parts.scheme}://{parts.netloc}"


def describe_error(exc: Exception, service: str = "SQS") -> tuple[str, bool] | None:
    """What an aiobotocore/botocore error means, and whether a retry may help.

    ``None`` if *exc* is not a botocore error. *service* names what could not be
    reached (``"SQS"``, ``"SNS"``, ``"EventBridge"``).
    """
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        NoRegionError,
        SSLError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        transient = code in TRANSIENT_CODES or status == 429 or status >= 500
        return f"{code} (HTTP {status}): {error.get('Message', '')}", transient
    if isinstance(exc, HTTPClientError | ConnectionError) and not isinstance(exc, SSLError):
        return f"cannot reach {service}: {exc}", True
    if isinstance(exc, NoRegionError):
        return "no AWS region: pass region_name=, or set AWS_DEFAULT_REGION", False
    if isinstance(exc, NoCredentialsError):
        return (
            "no AWS credentials found (environment, ~/.aws, container or instance role)",
            False,
        )
    if isinstance(exc, BotoCoreError):
        return str(exc), False
    return None


@contextmanager
def translated(
    context: str, error: type[ForwarderError] | type[SourceError], service: str = "SQS"
) -> Iterator[None]:
    """Raise a botocore error raised in the block as *error* (``"context: what"``).

    The forwarders pass `ForwarderError`, the source `SourceError`; exceptions
    that are not botocore's propagate as they are. *service* is the one spoken to.
    """
    try:
        yield
    except Exception as exc:
        described = describe_error(exc, service)
        if described is None:
            raise
        message, transient = described
        raise error(f"{context}: {message}", transient=transient) from exc


# -- received messages (ReceiveMessage's shape: Body, MessageAttributes) ----------------

LAMBDA_SQS = "aws:sqs"
"""The ``eventSource`` of the records an SQS event source mapping gives a Lambda function."""


def is_lambda_record(message: Mapping[str, Any]) -> bool:
    """Whether *message* is a Lambda SQS record: ``eventSource`` ``"aws:sqs"``, or
    ``messageId`` and a lowercase ``body``."""
    return message.get("eventSource") == LAMBDA_SQS or (
        "messageId" in message and "body" in message
    )


def lambda_event_source(message: Mapping[str, Any]) -> str | None:
    """The AWS service of a Lambda record that is not SQS's (``"aws:sns"``...), else None."""
    source = message.get("eventSource", message.get("EventSource"))
    if isinstance(source, str) and source.startswith("aws:") and source != LAMBDA_SQS:
        return source
    return None


def from_lambda_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A Lambda SQS record in ReceiveMessage's shape, which the readers below take.

    ``body`` becomes ``Body``, ``attributes`` ``Attributes``, and each message
    attribute's ``stringValue``/``binaryValue``/``dataType`` its capitalised
    key; the ids and the receipt handle are kept. Nothing is decoded or checked:
    a malformed record is refused when its body is read.
    """
    attributes = record.get("messageAttributes") or {}
    message: dict[str, Any] = {
        "MessageId": record.get("messageId"),
        "ReceiptHandle": record.get("receiptHandle"),
        "Body": record.get("body"),
        "Attributes": record.get("attributes") or {},
        "MessageAttributes": {
            name: {
                key: value[lower]
                for lower, key in _LAMBDA_ATTRIBUTE_KEYS.items()
                if lower in value and value[lower] is not None
            }
            for name, value in attributes.items()
            if isinstance(value, Mapping)
        }
        if isinstance(attributes, Mapping)
        else {},
    }
    if "md5OfBody" in record:
        message["MD5OfBody"] = record["md5OfBody"]
    return message


_LAMBDA_ATTRIBUTE_KEYS = {
    "dataType": "DataType",
    "stringValue": "StringValue",
    "binaryValue": "BinaryValue",
}


def decode(message: Mapping[str, Any]) -> Event:
    """The event in a received SQS message; `MessageDecodeError` if it holds none.

    The body is a structured CloudEvent, an EventBridge event (a rule's SQS
    target), or an SNS notification (a subscription without raw message
    delivery) whose ``Message`` is one of these two.
    """
    body = parse_json(message.get("Body"), "SQS message body")
    if is_sns_notification(body):
        return _event(_sns_message(body), _sns_trace(body) or _trace(message))
    return _event(body, _trace(message))


def _event(body: Any, trace: dict[str, str]) -> Event:
    if is_eventbridge_event(body):
        return from_eventbridge(body, trace)
    return from_cloudevent(body, trace)


def _event_trace(body: Any, trace: dict[str, str]) -> dict[str, str]:
    """The trace context `_event` gives the event in *body*, *trace* being the attributes':
    an EventBridge ``detail`` CloudEvent's members first; else *trace*, else the members
    of the CloudEvent *body* is."""
    if is_eventbridge_event(body):
        detail = body.get("detail")
        return (cloudevent_trace_context(detail) if is_cloudevent(detail) else {}) or trace
    if trace or not isinstance(body, Mapping):
        return trace
    return cloudevent_trace_context(body)


def is_sns_notification(body: object) -> bool:
    """Whether *body* is an SNS notification (``"Type": "Notification"``, a topic, a message)."""
    return (
        isinstance(body, Mapping)
        and body.get("Type") == "Notification"
        and "TopicArn" in body
        and "Message" in body
    )


def _sns_message(notification: Mapping[str, Any]) -> Any:
    """The message an SNS notification carries, parsed: what the SQS body would be raw."""
    message = notification["Message"]
    if not isinstance(message, str):
        raise MessageDecodeError(
            f"an SNS notification's Message must be a string, got {type(message).__name__}"
        )
    return parse_json(message, "SNS Message")


def _sns_trace(notification: Mapping[str, Any]) -> dict[str, str]:
    """The trace context in an SNS notification's ``{"name": {"Type", "Value"}}`` attributes."""
    attributes = notification.get("MessageAttributes") or {}
    if not isinstance(attributes, Mapping):
        return {}
    return {
        key: value["Value"]
        for key, value in attributes.items()
        if key in TRACE_ATTRIBUTES
        and isinstance(value, Mapping)
        and is_trace_value(key, value.get("Value"))
    }


def is_eventbridge_event(body: object) -> bool:
    """Whether *body* is an EventBridge event (``detail-type`` and ``detail``, no CloudEvent)."""
    return (
        isinstance(body, Mapping)
        and "detail-type" in body
        and "detail" in body
        and "specversion" not in body
    )


def from_eventbridge(body: Mapping[str, Any], trace: dict[str, str]) -> Event:
    """An EventBridge event as an `Event`: ``detail-type`` is its name, ``detail`` its payload.

    Its ``id``, ``time`` and ``source`` are the event's; ``account``, ``region`` and
    ``resources`` are not kept. A ``detail-type`` must be a usable event name
    (`check_name`: spaces inside are fine, ``"Order Placed"``); anything else is
    refused with the reason, as is an event without an ``id``.

    A ``detail`` that is a structured CloudEvent (what `EventBridgeForwarder`
    puts) is that event instead: its id, name, time, source and payload, and the
    trace context of its ``traceparent``/``tracestate`` members (EventBridge
    has no message attributes), else *trace*.
    """
    detail = body.get("detail")
    if is_cloudevent(detail):
        return from_cloudevent(detail, cloudevent_trace_context(detail) or trace)
    try:
        check_name(body["detail-type"])
    except InvalidEventError as exc:
        raise MessageDecodeError(f"EventBridge detail-type is no event name: {exc}") from None
    if not body.get("id"):
        raise MessageDecodeError("EventBridge event without an id")
    what = "EventBridge event"
    fields = envelope(what, body["detail-type"], body["id"], body.get("source") or None)
    fields["payload"] = body["detail"]
    fields["trace_context"] = trace
    if (time := body.get("time")) is not None:
        fields["time"] = parse_time(time, what)
    try:
        return Event.model_validate(fields)
    except ValidationError as exc:
        raise MessageDecodeError(f"invalid EventBridge event: {exc}") from exc


def is_cloudevent(detail: object) -> TypeGuard[Mapping[str, Any]]:
    """Whether an EventBridge ``detail`` is a structured CloudEvent (specversion, id, type)."""
    return isinstance(detail, Mapping) and all(
        key in detail for key in ("specversion", "id", "type")
    )


def trace_context(message: Mapping[str, Any]) -> dict[str, str]:
    """The W3C trace context of an SQS message; ``{}`` if none (never raises).

    What `decode` gives its event: the SNS notification's attributes when the body
    is one that has some, else the SQS message attributes; and the ``traceparent``
    and ``tracestate`` members of the CloudEvent in the body, which are all an
    EventBridge rule's target or a producer writing the CloudEvents tracing
    extension carries. The body is parsed only if it holds the text ``traceparent``.
    """
    return trace_or_nothing(_message_trace, message)


def _message_trace(message: Mapping[str, Any]) -> dict[str, str]:
    body = message.get("Body")
    if not isinstance(body, str) or "traceparent" not in body:  # nothing to read in the body
        return _trace(message)
    parsed = parse_json(body, "SQS message body")
    if not is_sns_notification(parsed):
        return _event_trace(parsed, _trace(message))
    trace = _sns_trace(parsed) or _trace(message)
    try:
        return _event_trace(_sns_message(parsed), trace)
    except MessageDecodeError:  # no event in it: the notification's, for its refusal's span
        return trace


def _trace(message: Mapping[str, Any]) -> dict[str, str]:
    attributes = message.get("MessageAttributes") or {}
    if not isinstance(attributes, Mapping):
        return {}
    return {
        key: value["StringValue"]
        for key, value in attributes.items()
        if key in TRACE_ATTRIBUTES
        and isinstance(value, Mapping)
        and is_trace_value(key, value.get("StringValue"))
    }


def size(message: Mapping[str, Any]) -> int:
    """Bytes SQS counts for a received message: the body, and each attribute's name, type, value."""
    return byte_length(message.get("Body")) + _attributes_size(message.get("MessageAttributes"))


def _attributes_size(attributes: object) -> int:
    if not isinstance(attributes, Mapping):
        return 0
    total = 0
    for name, value in attributes.items():
        total += byte_length(name)
        if isinstance(value, Mapping):
            total += sum(
                byte_length(value.get(key)) for key in ("DataType", "StringValue", "BinaryValue")
            )
    return total
