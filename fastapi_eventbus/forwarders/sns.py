"""Forward events to an AWS SNS topic, in ``PublishBatch`` calls (extra ``aws``).

```python
from fastapi_eventbus.forwarders.sns import SNSForwarder

bus.forward("order.*", SNSForwarder("arn:aws:sns:eu-west-1:123456789012:orders"))
```

Each message is the event as a structured CloudEvent (`fastapi_eventbus.wire.sqs_body`),
the body an SQS queue subscribed with raw message delivery receives; without raw
delivery the queue receives SNS's notification of it, which the worker unwraps.
W3C trace context goes in the ``traceparent``/``tracestate`` message attributes.
aiobotocore is imported when the forwarder starts, never before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, TypeAlias

from fastapi_eventbus._brokers import aws
from fastapi_eventbus._events import Event
from fastapi_eventbus._retry import Retry
from fastapi_eventbus.exceptions import ConfigurationError
from fastapi_eventbus.wire import sqs_body, trace_attributes

from ._aws import AWSForwarder, translated
from ._base import Delivery, OnDeadLetter
from ._batching import (
    Chunk,
    check_group_id,
    chunks,
    failed_entries,
    group_of,
    message_size,
    send_concurrently,
    send_in_order,
)

if TYPE_CHECKING:
    from types_aiobotocore_sns import SNSClient
    from types_aiobotocore_sns.type_defs import (
        MessageAttributeValueTypeDef,
        PublishBatchRequestEntryTypeDef,
    )

__all__ = ["MAX_BATCH_ENTRIES", "MAX_MESSAGE_BYTES", "SNSForwarder"]

MAX_MESSAGE_BYTES = 262_144
"""SNS's limit for one message (body plus attributes) and for one ``PublishBatch`` call."""
MAX_BATCH_ENTRIES = 10
"""SNS's limit on the entries of one ``PublishBatch`` call."""

_Entry: TypeAlias = "PublishBatchRequestEntryTypeDef"


def _attributes(trace: dict[str, str]) -> dict[str, MessageAttributeValueTypeDef]:
    return {name: {"DataType": "String", "StringValue": value} for name, value in trace.items()}


def _topic_parts(topic_arn: object) -> list[str]:
    """The six parts of an SNS topic ARN (``arn:PARTITION:sns:REGION:ACCOUNT:NAME``)."""
    parts = topic_arn.split(":") if isinstance(topic_arn, str) else []
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "sns" or not parts[5]:
        raise ConfigurationError(
            f"topic_arn must be an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME), "
            f"got {topic_arn!r}"
        )
    return parts


class SNSForwarder(AWSForwarder["SNSClient"]):
    """Publishes events to one SNS topic with ``PublishBatch``, through aiobotocore.

    Each `send` splits the batch into calls of at most 10 entries and at most
    ``max(max_message_bytes, 262144)`` bytes; calls to a standard topic run
    concurrently, calls to a FIFO topic one after the other, in order. Entries
    SNS lists as ``Failed`` are retried unless the fault is the sender's; then
    they are dead-lettered. Events whose message would exceed
    *max_message_bytes* are refused at ``emit`` with `InvalidEventError`.

    The message is the event's structured CloudEvent, as `SQSForwarder` sends
    it: a queue subscribed with raw message delivery receives exactly that (and
    the trace context as SQS message attributes); without raw delivery it
    receives SNS's notification JSON around it. The worker reads both.

    One aiobotocore client per forwarder, created by `start` and closed by
    `close` (see `Forwarder` for the lifecycle).

    Args:
        topic_arn: The topic's ARN. An ARN ending in ``.fifo`` is a FIFO topic.
        region_name: The AWS region; default: the one in the ARN.
        endpoint_url: Another endpoint than AWS's (LocalStack, moto, a VPC endpoint).
        aws_access_key_id: Credentials; default: botocore's credential chain
            (environment, ``~/.aws``, instance or task role).
        aws_secret_access_key: See *aws_access_key_id*.
        aws_session_token: See *aws_access_key_id*.
        message_group_id: Gives each event its ``MessageGroupId``; required for
            FIFO topics, where SNS keeps the order of messages of the same group
            (the ``MessageDeduplicationId`` is the event's id). Called at emit
            time too, so that a bad group id fails in the caller.
        max_message_bytes: The largest message accepted (body plus attributes);
            at most SNS's 262,144 bytes.
        retry: The retry policy for transient failures.
        dead_letter: Called with a `DeadLetter` for events that could not be delivered.
        name: A name for logs (default: ``SNSForwarder``).
        verify_on_start: At startup, check the topic with ``GetTopicAttributes``
            and fail the application's startup if the region, the credentials or
            the topic are wrong. Needs the ``sns:GetTopicAttributes`` permission.

    Raises:
        MissingExtraError: aiobotocore (the ``aws`` extra) is not installed.
        ConfigurationError: An argument is invalid, e.g. a FIFO topic without
            *message_group_id*, or only one of the two credentials.
    """

    messaging_system: ClassVar[str] = "aws.sns"
    """The OpenTelemetry ``messaging.system`` of send spans (the conventions' value for SNS)."""
    # The service AWSForwarder opens a client of, and its name in error messages.
    _service = "sns"
    _service_name = "SNS"
    _largest_message = MAX_MESSAGE_BYTES

    def __init__(
        self,
        topic_arn: str,
        *,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        message_group_id: Callable[[Event], str] | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        retry: Retry | None = None,
        dead_letter: OnDeadLetter | None = None,
        name: str | None = None,
        verify_on_start: bool = False,
    ) -> None:
        aws.require_sdk()
        parts = _topic_parts(topic_arn)
        self.topic_arn = topic_arn
        """The topic's ARN."""
        self.fifo = topic_arn.endswith(".fifo")
        """Whether the topic is a FIFO topic (its ARN ends with ``.fifo``)."""
        self.message_group_id = check_group_id(topic_arn, "topic", self.fifo, message_group_id)
        """Gives each event its ``MessageGroupId``, if set."""
        super().__init__(
            region_name=region_name or parts[3] or None,
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
        return f"<SNSForwarder {self.name!r} topic_arn={self.topic_arn!r}>"

    @property
    def destination(self) -> str:
        """The topic's name (the last part of its ARN)."""
        return self.topic_arn.rsplit(":", 1)[-1]

    @property
    def client(self) -> SNSClient:
        """The aiobotocore SNS client, once `start` ran (for hooks and extra calls)."""
        return super().client

    # -- lifecycle ----------------------------------------------------------------

    async def verify(self) -> None:
        """Check the topic with ``GetTopicAttributes`` (with *verify_on_start*).

        Fails if the region or credentials are missing or wrong, or if the topic
        does not exist. Needs the ``sns:GetTopicAttributes`` permission.
        """
        with translated(self, f"{self.name}: GetTopicAttributes on {self.topic_arn}"):
            await self.client.get_topic_attributes(TopicArn=self.topic_arn)

    # -- messages -------------------------------------------------------------------

    def encoded_size(self, event: Event) -> int:
        """Bytes counted for *event*'s message: body plus attribute names, types and values."""
        return message_size(sqs_body(event), trace_attributes(event))

    def check(self, event: Event) -> None:
        """Raise `InvalidEventError` if *event* could never be published to this topic.

        Called at emit time: the message's size and its group id.
        """
        super().check(event)
        if self.message_group_id is not None:
            group_of(self.name, self.message_group_id, event)

    def _entry(self, index: int, event: Event) -> tuple[int, _Entry, Event]:
        body = sqs_body(event)
        trace = trace_attributes(event)
        entry: PublishBatchRequestEntryTypeDef = {"Id": str(index), "Message": body}
        if trace:
            entry["MessageAttributes"] = _attributes(trace)
        if self.message_group_id is not None:
            entry["MessageGroupId"] = group_of(self.name, self.message_group_id, event)
        if self.fifo:
            entry["MessageDeduplicationId"] = event.id
        return message_size(body, trace), entry, event

    # -- sending ----------------------------------------------------------------------

    async def send(self, events: Sequence[Event]) -> Delivery | None:
        """Publish *events* in ``PublishBatch`` calls; report ``Failed`` entries.

        Raises `ForwarderError` when no call went through; when only some did,
        the events of the others are returned for a retry.
        """
        client = self.client
        entries = (self._entry(index, event) for index, event in enumerate(events))
        calls = list(chunks(entries, MAX_BATCH_ENTRIES, MAX_MESSAGE_BYTES))

        async def send_chunk(chunk: Chunk[_Entry]) -> Delivery | None:
            with translated(self):
                response = await client.publish_batch(
                    TopicArn=self.topic_arn, PublishBatchRequestEntries=[e for e, _ in chunk]
                )
            return failed_entries(response, chunk)

        if self.fifo:  # one call after the other, in order
            return await send_in_order(send_chunk, calls)
        return await send_concurrently(send_chunk, calls)
