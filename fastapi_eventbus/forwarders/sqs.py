"""Forward events to an AWS SQS queue, in ``SendMessageBatch`` calls (extra ``aws``).

```python
from fastapi_eventbus.forwarders.sqs import SQSForwarder

bus.forward("order.*", SQSForwarder("https://sqs.eu-west-1.amazonaws.com/123456789012/orders"))
```

Each message body is the event as a structured CloudEvent (`fastapi_eventbus.wire.sqs_body`);
W3C trace context goes in the ``traceparent``/``tracestate`` message attributes.
aiobotocore is imported when the forwarder starts, never before.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, TypeAlias

from fastapi_eventbus._brokers import aws
from fastapi_eventbus._events import Event
from fastapi_eventbus._retry import Retry
from fastapi_eventbus.exceptions import (
    ConfigurationError,
    ForwarderError,
    InvalidEventError,
)
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
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import (
        MessageAttributeValueTypeDef,
        SendMessageBatchRequestEntryTypeDef,
    )

__all__ = ["MAX_BATCH_ENTRIES", "MAX_MESSAGE_BYTES", "SQSForwarder"]

MAX_MESSAGE_BYTES = 262_144
"""SQS's classic limit for one message (body plus attributes) and for one batch call."""
MAX_BATCH_ENTRIES = 10
"""SQS's limit on the entries of one ``SendMessageBatch`` call."""
_NOT_IN_SQS = re.compile("[\ud800-\udfff\ufffe\uffff]")
"""Characters SQS refuses in a message that JSON encoding leaves as they are."""

_Entry: TypeAlias = "SendMessageBatchRequestEntryTypeDef"


def _attributes(trace: dict[str, str]) -> dict[str, MessageAttributeValueTypeDef]:
    return {name: {"DataType": "String", "StringValue": value} for name, value in trace.items()}


class SQSForwarder(AWSForwarder["SQSClient"]):
    """Sends events to one SQS queue with ``SendMessageBatch``, through aiobotocore.

    Each `send` splits the batch into calls of at most 10 entries and at most
    ``max(max_message_bytes, 262144)`` bytes; calls to a standard queue run
    concurrently, calls to a FIFO queue one after the other, in order. Entries
    SQS lists as ``Failed`` are retried unless the fault is the sender's; then
    they are dead-lettered. Events whose message would exceed
    *max_message_bytes* are refused at ``emit`` with `InvalidEventError`.

    One aiobotocore client per forwarder, created by `start` (at application
    startup, or else before the first send) and closed by `close` when the
    application shuts down. Used on another event loop, the forwarder abandons
    its client and creates a new one there (see `Forwarder`).

    Args:
        queue_url: The queue's URL. A URL ending in ``.fifo`` is a FIFO queue.
        region_name: The AWS region; default: the one in an AWS queue URL, else
            botocore's configuration (``AWS_DEFAULT_REGION``, ``~/.aws/config``).
        endpoint_url: Another endpoint than AWS's (LocalStack, moto, a VPC endpoint);
            default: the queue URL's host, when it is not AWS's public one.
        aws_access_key_id: Credentials; default: botocore's credential chain
            (environment, ``~/.aws``, instance or task role).
        aws_secret_access_key: See *aws_access_key_id*.
        aws_session_token: See *aws_access_key_id*.
        message_group_id: Gives each event its ``MessageGroupId``; required for
            FIFO queues, where SQS keeps the order of messages of the same group.
            Called at emit time too, so that a bad group id fails in the caller.
        max_message_bytes: The largest message accepted (body plus attributes).
            The default is SQS's classic limit; raise it up to 1,048,576 for queues
            whose ``MaximumMessageSize`` allows it.
        retry: The retry policy for transient failures.
        dead_letter: Called with a `DeadLetter` for events that could not be delivered.
        name: A name for logs (default: ``SQSForwarder``).
        verify_on_start: At startup, check the queue with ``GetQueueAttributes``
            (see `verify`) and fail the application's startup if the region,
            the credentials or the queue are wrong. Recommended in production;
            needs the ``sqs:GetQueueAttributes`` permission.

    Raises:
        MissingExtraError: aiobotocore (the ``aws`` extra) is not installed.
        ConfigurationError: An argument is invalid, e.g. a FIFO queue without
            *message_group_id*, or only one of the two credentials.
    """

    messaging_system: ClassVar[str] = "aws_sqs"
    """The OpenTelemetry ``messaging.system`` of send spans."""
    # The service AWSForwarder opens a client of, and its name in error messages.
    _service = "sqs"
    _service_name = "SQS"
    _largest_message = 1_048_576  # SQS's limit, for a queue whose MaximumMessageSize allows it

    def __init__(
        self,
        queue_url: str,
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
        if not isinstance(queue_url, str) or not queue_url.startswith(("https://", "http://")):
            raise ConfigurationError(f"queue_url must be an http(s) URL, got {queue_url!r}")
        self.queue_url = queue_url
        """The queue's URL."""
        self.fifo = queue_url.endswith(".fifo")
        """Whether the queue is a FIFO queue (its URL ends with ``.fifo``)."""
        self.message_group_id = check_group_id(queue_url, "queue", self.fifo, message_group_id)
        """Gives each event its ``MessageGroupId``, if set."""
        super().__init__(
            region_name=region_name or aws.region_of(queue_url),
            endpoint_url=endpoint_url or aws.endpoint_of(queue_url),
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            aws_session_token=aws_session_token,
            max_message_bytes=max_message_bytes,
            retry=retry,
            dead_letter=dead_letter,
            name=name,
            verify_on_start=verify_on_start,
        )
        self._batch_bytes = max(max_message_bytes, MAX_MESSAGE_BYTES)

    def __repr__(self) -> str:
        return f"<SQSForwarder {self.name!r} queue_url={self.queue_url!r}>"

    @property
    def destination(self) -> str:
        """The queue's name (the last part of its URL)."""
        return self.queue_url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def client(self) -> SQSClient:
        """The aiobotocore SQS client, once `start` ran (for hooks and extra calls)."""
        return super().client

    # -- lifecycle ----------------------------------------------------------------

    async def verify(self) -> None:
        """Check the queue with ``GetQueueAttributes`` (with *verify_on_start*).

        Fails if the region or credentials are missing or wrong, if the queue
        does not exist, or if the queue's ``MaximumMessageSize`` is below
        *max_message_bytes* (SQS would refuse events that passed the emit-time
        check). Needs the ``sqs:GetQueueAttributes`` permission on the queue.
        """
        with translated(self, f"{self.name}: GetQueueAttributes on {self.queue_url}"):
            response = await self.client.get_queue_attributes(
                QueueUrl=self.queue_url, AttributeNames=["MaximumMessageSize"]
            )
        size = response.get("Attributes", {}).get("MaximumMessageSize")
        limit = self.max_message_bytes
        if size is not None and limit is not None and int(size) < limit:
            raise ForwarderError(
                f"{self.name}: {self.queue_url} takes messages of up to {size} bytes (its "
                f"MaximumMessageSize), less than max_message_bytes={limit}: pass "
                f"max_message_bytes={size}, or raise the queue's MaximumMessageSize"
            )

    # -- messages -------------------------------------------------------------------

    def encoded_size(self, event: Event) -> int:
        """Bytes SQS counts for *event*'s message: body plus attribute names, types and values."""
        return message_size(sqs_body(event), trace_attributes(event))

    def check(self, event: Event) -> None:
        """Raise `InvalidEventError` if *event* could never be sent to this queue.

        Called at emit time: the message's size, its characters and its group id.
        """
        body = sqs_body(event)
        if not body.isascii() and (bad := _NOT_IN_SQS.search(body)):  # isascii: O(1)
            raise InvalidEventError(
                f"event {event.name!r} contains {bad.group()!r}, a character SQS refuses"
            )
        limit = self.max_message_bytes
        if limit is not None and (size := message_size(body, trace_attributes(event))) > limit:
            raise InvalidEventError(  # the base class's message, without encoding twice
                f"event {event.name!r} would be a {size}-byte message, over the {limit}-byte "
                f"limit of forwarder {self.name}; send a reference to the data instead"
            )
        if self.message_group_id is not None:
            self._group_of(event)

    def _group_of(self, event: Event) -> str:
        assert self.message_group_id is not None
        return group_of(self.name, self.message_group_id, event)

    def _entry(self, index: int, event: Event) -> tuple[int, _Entry, Event]:
        body = sqs_body(event)
        trace = trace_attributes(event)
        entry: SendMessageBatchRequestEntryTypeDef = {"Id": str(index), "MessageBody": body}
        if trace:
            entry["MessageAttributes"] = _attributes(trace)
        if self.message_group_id is not None:
            entry["MessageGroupId"] = self._group_of(event)
        if self.fifo:
            entry["MessageDeduplicationId"] = event.id
        return message_size(body, trace), entry, event

    # -- sending ----------------------------------------------------------------------

    async def send(self, events: Sequence[Event]) -> Delivery | None:
        """Send *events* in ``SendMessageBatch`` calls; report ``Failed`` entries.

        Raises `ForwarderError` when no call went through; when only some did,
        the events of the others are returned for a retry.
        """
        client = self.client
        entries = (self._entry(index, event) for index, event in enumerate(events))
        calls = list(chunks(entries, MAX_BATCH_ENTRIES, self._batch_bytes))

        async def send_chunk(chunk: Chunk[_Entry]) -> Delivery | None:
            with translated(self):
                response = await client.send_message_batch(
                    QueueUrl=self.queue_url, Entries=[entry for entry, _ in chunk]
                )
            return failed_entries(response, chunk)

        if self.fifo:  # one call after the other, in order
            return await send_in_order(send_chunk, calls)
        return await send_concurrently(send_chunk, calls)
