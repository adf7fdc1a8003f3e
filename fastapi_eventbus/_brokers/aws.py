"""Private: what `SQSForwarder` and `SQSSource` share (AWS SQS through aiobotocore).

The ``aws`` extra check, the client settings and their client, the region in a
queue URL, the translation of botocore's errors, and the reading of a received
SQS message: the event in its body (a structured CloudEvent), its size as SQS
counts it, and the trace context in its message attributes. aiobotocore and
botocore are imported when a client is created or an error translated, never here.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi_eventbus._events import Event
from fastapi_eventbus.exceptions import ForwarderError, MissingExtraError, SourceError
from fastapi_eventbus.wire import TRACE_ATTRIBUTES, from_cloudevent

from . import byte_length, is_trace_value, parse_json, trace_or_nothing

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

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

    async def open_client(self, stack: AsyncExitStack, read_timeout: float) -> SQSClient:
        """Create an aiobotocore SQS client on *stack* (no network call).

        botocore's own retries are off: the forwarder and the worker retry
        themselves, and botocore's retries would multiply attempts or hide outages.
        """
        from aiobotocore.config import AioConfig
        from aiobotocore.session import AioSession

        config = AioConfig(
            retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=read_timeout
        )
        return await stack.enter_async_context(
            AioSession().create_client(
                "sqs",
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


def describe_error(exc: Exception) -> tuple[str, bool] | None:
    """What an aiobotocore/botocore error means, and whether a retry may help.

    ``None`` if *exc* is not a botocore error.
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
        return f"cannot reach SQS: {exc}", True
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
def translated(context: str, error: type[ForwarderError] | type[SourceError]) -> Iterator[None]:
    """Raise a botocore error raised in the block as *error* (``"context: what"``).

    The forwarder passes `ForwarderError`, the source `SourceError`; exceptions
    that are not botocore's propagate as they are.
    """
    try:
        yield
    except Exception as exc:
        described = describe_error(exc)
        if described is None:
            raise
        message, transient = described
        raise error(f"{context}: {message}", transient=transient) from exc


# -- received messages (ReceiveMessage's shape: Body, MessageAttributes) ----------------


def decode(message: Mapping[str, Any]) -> Event:
    """The event in a received SQS message; `MessageDecodeError` if it holds none."""
    body = parse_json(message.get("Body"), "SQS message body")
    return from_cloudevent(body, _trace(message))


def trace_context(message: Mapping[str, Any]) -> dict[str, str]:
    """The W3C trace context in an SQS message's attributes; ``{}`` if none (never raises)."""
    return trace_or_nothing(_trace, message)


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
