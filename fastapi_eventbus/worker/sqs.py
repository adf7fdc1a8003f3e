"""Receive forwarded events from an AWS SQS queue (extra ``aws``: aiobotocore).

```python
from fastapi_eventbus.worker import SQSSource, Worker

worker = Worker(app, SQSSource("https://sqs.eu-west-1.amazonaws.com/123456789012/orders"))
```

Long polling (``WaitTimeSeconds``), up to 10 messages per ``ReceiveMessage``;
a message is deleted (``DeleteMessageBatch``) only once its handlers all
succeeded; otherwise its visibility timeout is set by `Backoff` on its
``ApproximateReceiveCount``, so that the queue's redrive policy moves a message
that keeps failing to its dead-letter queue. With ``visibility_timeout``, messages
are received with that visibility timeout, and the worker extends it
(``ChangeMessageVisibility``) every half of it while their handlers run.
aiobotocore is imported when the source starts, never before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from contextlib import AbstractContextManager, AsyncExitStack
from typing import TYPE_CHECKING

from fastapi_eventbus._brokers import aws
from fastapi_eventbus._events import Event, shown
from fastapi_eventbus._settings import check_int
from fastapi_eventbus.exceptions import ConfigurationError, SourceError

from ._source import (
    Backoff,
    Coalescer,
    ReceivedMessage,
    Source,
    backoff_of,
    content_name,
    malformed,
    refuse_malformed,
)

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import (
        DeleteMessageBatchRequestEntryTypeDef,
        ReceiveMessageRequestTypeDef,
    )

    from fastapi_eventbus.wire import Decoder

__all__ = ["MAX_WAIT_TIME_SECONDS", "SQSSource"]

MAX_WAIT_TIME_SECONDS = 20
"""SQS's limit on ``WaitTimeSeconds`` (long polling)."""
_MAX_MESSAGES = 10
_MAX_VISIBILITY = 43_200

logger = logging.getLogger("fastapi_eventbus.worker")


class SQSSource(Source):
    """Receives the events an `SQSForwarder` sent, from one SQS queue, through aiobotocore.

    Args:
        queue_url: The queue's URL.
        region_name: The AWS region; default: the one in an AWS queue URL, else
            botocore's configuration (``AWS_DEFAULT_REGION``, ``~/.aws/config``).
        endpoint_url: Another endpoint than AWS's (LocalStack, moto, a VPC endpoint);
            default: the queue URL's host, when it is not AWS's public one.
        aws_access_key_id: Credentials; default: botocore's credential chain.
        aws_secret_access_key: See *aws_access_key_id*.
        aws_session_token: See *aws_access_key_id*.
        wait_time_seconds: Long polling: how long one ``ReceiveMessage`` waits for
            messages (0 to 20).
        max_messages: The most messages one ``ReceiveMessage`` returns (1 to 10).
        visibility_backoff: The visibility timeout given to a message whose
            handlers failed, by its receive count: 5 s, 10 s, 20 s... up to 15
            minutes by default. The queue's redrive policy decides when it
            goes to the dead-letter queue.
        visibility_timeout: Seconds (1 to 43200) a received message stays
            invisible to other consumers; the worker extends it to that again
            every half of it while the message's handlers run (a heartbeat), so
            a slow handler does not get its message delivered twice. Default:
            the queue's ``VisibilityTimeout``, and no heartbeat.
        name: A name for logs (default: the queue's name).
        decode: A decode hook (`fastapi_eventbus.wire.Decoder`) for messages in
            another format: it gets the message as `decode_message` takes it and
            returns its `Event`, or None to let the built-in decoding read it.

    Raises:
        MissingExtraError: aiobotocore (the ``aws`` extra) is not installed.
        ConfigurationError: An argument is out of range or only one of the two
            credentials is given.
    """

    messaging_system = "aws_sqs"
    """The OpenTelemetry ``messaging.system`` of the worker's spans."""
    receive_outlives_cancel = True
    """SQS holds a ``ReceiveMessage`` until its ``WaitTimeSeconds`` end, the client gone or
    not, and hides what it hands it: `stop` lets the poll under way return (at most
    ``wait_time_seconds``), and gives back at once what it brought."""

    def __init__(
        self,
        queue_url: str,
        *,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        wait_time_seconds: int = MAX_WAIT_TIME_SECONDS,
        max_messages: int = _MAX_MESSAGES,
        visibility_backoff: Backoff | None = None,
        visibility_timeout: int | None = None,
        name: str | None = None,
        decode: Decoder | None = None,
    ) -> None:
        aws.require_sdk()
        if not isinstance(queue_url, str) or not queue_url.startswith(("https://", "http://")):
            raise ConfigurationError(f"queue_url must be an http(s) URL, got {queue_url!r}")
        check_int("wait_time_seconds", wait_time_seconds, 0, maximum=MAX_WAIT_TIME_SECONDS)
        check_int("max_messages", max_messages, 1, maximum=_MAX_MESSAGES)
        if visibility_timeout is not None:
            check_int("visibility_timeout", visibility_timeout, 1, maximum=_MAX_VISIBILITY)
        if (aws_access_key_id is None) != (aws_secret_access_key is None):
            raise ConfigurationError(
                "pass both aws_access_key_id and aws_secret_access_key, or neither"
            )
        self.decoder = decode
        self.queue_url = queue_url
        """The queue's URL."""
        self.ordered = queue_url.rstrip("/").endswith(".fifo")  # a standard one keeps no order
        """Whether it is a FIFO queue, whose groups are each handled in order."""
        self.wait_time_seconds = wait_time_seconds
        """How long one ``ReceiveMessage`` waits for messages."""
        self.max_messages = max_messages
        """The most messages one ``ReceiveMessage`` returns."""
        self.visibility_backoff = backoff_of("visibility_backoff", visibility_backoff, Backoff())
        """The visibility timeout of a message whose handlers failed, by its receive count."""
        self.visibility_timeout = visibility_timeout
        """Seconds a received message stays invisible (None: the queue's setting)."""
        self.extend_interval = None if visibility_timeout is None else visibility_timeout / 2
        """Half of ``visibility_timeout``: how often the worker extends it (None: never)."""
        self.name = name or queue_url.rstrip("/").rsplit("/", 1)[-1]
        """A name for logs: the queue's name unless given."""
        self._settings = aws.ClientSettings(
            region_name or aws.region_of(queue_url),
            endpoint_url or aws.endpoint_of(queue_url),
            aws_access_key_id,
            aws_secret_access_key,
            aws_session_token,
        )
        self._client: SQSClient | None = None
        self._stack: AsyncExitStack | None = None
        self._deletes = Coalescer(self._delete_batch, _MAX_MESSAGES)

    def __repr__(self) -> str:
        return f"<SQSSource {self.name!r} queue_url={self.queue_url!r}>"

    @property
    def client(self) -> SQSClient:
        """The aiobotocore SQS client, once `start` ran."""
        if self._client is None:
            raise SourceError(f"SQS source {self.name} has not started")
        return self._client

    async def start(self) -> None:
        """Create the aiobotocore client (imports aiobotocore; no network call)."""
        stack = AsyncExitStack()
        try:
            # Long polls wait up to wait_time_seconds: give the read that much and more.
            self._client = await self._settings.open_client(
                stack, read_timeout=self.wait_time_seconds + 10
            )
        except Exception:
            await stack.aclose()
            with self._translated("create the SQS client"):
                raise
        self._stack = stack

    async def close(self) -> None:
        """Wait for deletions under way, then close the client."""
        await self._deletes.wait()
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def receive(self, max_messages: int) -> list[ReceivedMessage]:
        """One ``ReceiveMessage`` call, long polling for up to ``wait_time_seconds``."""
        request: ReceiveMessageRequestTypeDef = {
            "QueueUrl": self.queue_url,
            "MaxNumberOfMessages": max(1, min(max_messages, self.max_messages)),
            "WaitTimeSeconds": self.wait_time_seconds,
            "MessageAttributeNames": ["All"],  # trace context travels there
            "AttributeNames": ["All"],  # ApproximateReceiveCount, on every botocore version
        }
        if self.visibility_timeout is not None:
            request["VisibilityTimeout"] = self.visibility_timeout
        with self._translated("receive"):
            response = await self.client.receive_message(**request)
        messages = response.get("Messages", [])
        return [m for message in messages if (m := self._read(message)) is not None]

    def _read(self, message: object) -> ReceivedMessage | None:
        """One message of a ``ReceiveMessage`` answer; one that is malformed fails alone,
        never the receive (whose other messages would stay invisible, none of them named).

        It is then a message the worker cannot decode: its ``on_undecodable`` applies.
        Without its ``ReceiptHandle`` it can be neither deleted nor given back: an ERROR
        names it, and it comes again at its visibility timeout."""
        try:
            return _received(message, self.ordered is True)
        except TypeError as exc:
            why = str(exc)
        fields = message if isinstance(message, Mapping) else {}
        message_id, receipt = fields.get("MessageId"), fields.get("ReceiptHandle")
        if not isinstance(receipt, str) or not receipt:
            logger.error(
                "SQS source %s: a ReceiveMessage answer held a message with no ReceiptHandle "
                "(MessageId=%s): it can be neither deleted nor given back, and comes again at "
                "its visibility timeout",
                self.name,
                shown(message_id) if isinstance(message_id, str) else message_id,
            )
            return None
        if not isinstance(message_id, str) or not message_id:  # named after what stays
            kept = {k: v for k, v in fields.items() if k not in ("ReceiptHandle", "Attributes")}
            message_id = content_name(kept or message, "MessageId")  # from one delivery on
        why = f"a malformed message of a ReceiveMessage answer: {why}"
        attributes = fields.get("Attributes")
        group = attributes.get("MessageGroupId") if isinstance(attributes, Mapping) else None
        group = group if self.ordered is True and isinstance(group, str) else None  # its place
        return malformed({"Body": ""}, why, message_id, receipt, _receive_count(attributes), group)

    async def ack(self, message: ReceivedMessage) -> None:
        """Delete *message* (in a ``DeleteMessageBatch`` with others acknowledged meanwhile)."""
        await self._deletes.submit(message)

    async def nack(self, message: ReceivedMessage, delay: float | None = None) -> None:
        """Make *message* visible again after *delay* seconds (default: `visibility_backoff`)."""
        if delay is None:
            delay = self.visibility_backoff.delay(message.receive_count or 1)
        await self._change_visibility(message, delay, "change")

    async def extend(self, message: ReceivedMessage, seconds: float | None = None) -> None:
        """Keep *message* invisible for *seconds* more (default: ``visibility_timeout``)."""
        if seconds is None:
            if self.visibility_timeout is None:
                raise ConfigurationError(
                    f"SQS source {self.name}: no visibility_timeout to extend to"
                )
            seconds = self.visibility_timeout
        await self._change_visibility(message, seconds, "extend")

    async def _change_visibility(self, message: ReceivedMessage, seconds: float, what: str) -> None:
        with self._translated(f"{what} the visibility of message {message.message_id}"):
            await self.client.change_message_visibility(
                QueueUrl=self.queue_url,
                ReceiptHandle=message.receipt,
                VisibilityTimeout=max(0, min(_MAX_VISIBILITY, math.ceil(seconds))),
            )

    async def _delete_batch(self, messages: list[ReceivedMessage]) -> list[str | None]:
        entries: list[DeleteMessageBatchRequestEntryTypeDef] = [
            {"Id": str(i), "ReceiptHandle": m.receipt} for i, m in enumerate(messages)
        ]
        with self._translated("delete messages"):
            response = await self.client.delete_message_batch(
                QueueUrl=self.queue_url, Entries=entries
            )
        failed = {
            failure["Id"]: f"{failure['Code']}: {failure.get('Message', '')}"
            for failure in response.get("Failed", [])
        }
        return [failed.get(str(i)) for i in range(len(messages))]

    def _translated(self, action: str) -> AbstractContextManager[None]:
        """Raise botocore's errors in the block as `SourceError`; others as they are."""
        return aws.translated(f"SQS source {self.name}: cannot {action}", SourceError)

    # -- reading a received message (ReceiveMessage's shape) --------------------------

    def decode(self, message: ReceivedMessage) -> Event:
        """The event in *message*, with its trace context: the `decoder`'s, else its body's.

        The body is a structured CloudEvent, an EventBridge event, or an SNS
        notification of either (raw message delivery off).
        """
        refuse_malformed(message)
        event = self.hooked(message)
        return aws.decode(message.body) if event is None else event

    def message_size(self, message: ReceivedMessage) -> int:
        """Bytes SQS counts for *message*: the body, and each attribute's name, type and value."""
        return aws.size(message.body)

    def trace_context(self, message: ReceivedMessage) -> dict[str, str]:
        """The W3C trace context in *message*'s ``traceparent``/``tracestate`` attributes.

        In an SNS notification, its own message attributes' (when it has some); without
        any, the ``traceparent``/``tracestate`` members of the CloudEvent in the body
        (an EventBridge rule's target, whose ``detail`` is one), as `decode` reads them.
        """
        return aws.trace_context(message.body)


def _received(message: object, fifo: bool) -> ReceivedMessage:
    """A ``ReceiveMessage`` answer's message; TypeError (why) if it cannot be read. From a
    *fifo* queue, its ``MessageGroupId`` orders it in the worker: one that is not a string
    would put it in no group, or another one, and break its group's order."""
    if not isinstance(message, Mapping):
        raise TypeError(f"it is a {type(message).__name__}, not an object")
    attributes = message.get("Attributes", {})
    if not isinstance(attributes, Mapping):
        raise TypeError(f"its Attributes are a {type(attributes).__name__}, not an object")
    group = attributes.get("MessageGroupId") if fifo else None
    if group is not None and not isinstance(group, str):
        raise TypeError(f"its MessageGroupId is a {type(group).__name__}, not a string")
    return ReceivedMessage(
        body=message,
        message_id=_text(message, "MessageId"),
        receipt=_text(message, "ReceiptHandle"),
        receive_count=_receive_count(attributes),
        order_key=group,  # its group's order
    )


def _text(message: Mapping[str, object], field: str) -> str:
    """*message*'s *field*, a string that is not empty; else TypeError (why)."""
    value = message.get(field)
    if isinstance(value, str) and value:
        return value
    what = "missing" if value is None else "empty" if value == "" else f"a {type(value).__name__}"
    raise TypeError(f"its {field} is {what}")


def _receive_count(attributes: object) -> int | None:
    """The ``ApproximateReceiveCount`` in *attributes*; None if there is none, or it is not a
    number (a faulty SQS-compatible server): unknown, rather than a message that fails."""
    if not isinstance(attributes, Mapping):
        return None
    count = str(attributes.get("ApproximateReceiveCount", ""))
    return int(count) if count.isascii() and count.isdigit() else None
