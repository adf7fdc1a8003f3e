"""Receive forwarded events from a Google Cloud Pub/Sub subscription (extra ``gcp``).

```python
from fastapi_eventbus.worker import PubSubSource, Worker

worker = Worker(app, PubSubSource("projects/my-project/subscriptions/orders-worker"))
```

Pull requests through gcloud-aio-pubsub's client; a message is acknowledged only once its
handlers all succeeded, and nacked (``modifyAckDeadline`` 0) otherwise, so that
the subscription's retry policy and dead-letter topic decide what happens next.
With ``ack_deadline``, pulled messages get that ack deadline, and the worker
extends it (``modifyAckDeadline``) every half of it while their handlers run.
The SDK is imported when the source starts, never before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from fastapi_eventbus._brokers import gcp
from fastapi_eventbus._events import Event
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
    import aiohttp
    from gcloud.aio.pubsub import SubscriberClient

    from fastapi_eventbus.wire import Decoder

__all__ = ["PubSubSource"]

_SUBSCRIPTION = re.compile(r"projects/[^/\s]+/subscriptions/[A-Za-z][A-Za-z0-9_.~+%-]{2,254}")
_MAX_ACK_IDS = 500
"""Ack ids per ``acknowledge`` request (the request must stay under 512 KB)."""
_MIN_ACK_DEADLINE = 10
_MAX_ACK_DEADLINE = 600
_NACK_BACKOFF = Backoff(initial=1.0, maximum=60.0)
"""Default wait before a failed message comes back: 1 s, 2 s, 4 s... up to a minute."""
_TRACKED_FAILURES = 10_000
"""Message ids whose failed deliveries a source remembers (the oldest are forgotten)."""
_READ_TIMEOUT = 5.0
"""Seconds reading the subscription (whether it orders messages) may take."""
_ACK_RETRY_DELAY = 1.0
"""Seconds before an ``acknowledge`` request that failed transiently is sent again."""

logger = logging.getLogger("fastapi_eventbus.worker")


class PubSubSource(Source):
    """Pulls the events a `PubSubForwarder` published, from one Pub/Sub subscription.

    Args:
        subscription: The full path, ``"projects/PROJECT/subscriptions/SUBSCRIPTION"``.
        api_root: The REST endpoint, e.g. a regional one; an ``http://`` root is
            treated as an emulator (no credentials are sent over it).
        emulator_host: ``"host:port"`` of a Pub/Sub emulator. Defaults to the
            ``PUBSUB_EMULATOR_HOST`` environment variable.
        service_file: A credentials JSON file; by default Application Default
            Credentials are used.
        max_messages: The most messages one pull returns.
        pull_timeout: Seconds one pull may wait for messages before it is
            abandoned and another one starts. Keep it longer than the server holds
            an empty pull open (the emulator: 90 s): the server may still hand
            messages to an abandoned pull, and they then come back only when their
            ack deadline runs out. Stopping the worker does not wait for it.
        ack_deadline: Seconds (10 to 600) a pulled message may stay unacknowledged
            before Pub/Sub delivers it again; pulled messages get it at once, and
            the worker extends it again every half of it while their handlers
            run (a heartbeat). Default: the subscription's ``ackDeadlineSeconds``,
            and no heartbeat.
        nack_backoff: How long a message whose handlers failed stays away, by its
            failed deliveries: 1 s, 2 s, 4 s... up to 60 s by default (Pub/Sub caps
            it at 600 s). A subscription's own retry policy applies on top of it.
        name: A name for logs (default: the subscription's name).
        decode: A decode hook (`fastapi_eventbus.wire.Decoder`) for messages in
            another format: it gets the message as `decode_message` takes it and
            returns its `Event`, or None to let the built-in decoding read it.
        ordered: Whether the subscription delivers messages in order
            (``enableMessageOrdering``): then the messages of one ordering key are
            handled one after the other, and one not handled holds back the later
            ones. Default: read from the subscription at the first message with an
            ordering key (this needs ``pubsub.subscriptions.get``; without it, a
            WARNING, and they are kept in order).

    Raises:
        MissingExtraError: gcloud-aio-pubsub (the ``gcp`` extra) is not installed.
        ConfigurationError: An argument is invalid or out of range.
    """

    messaging_system = "gcp_pubsub"
    """The OpenTelemetry ``messaging.system`` of the worker's spans."""
    destination_attribute = "messaging.destination.subscription.name"
    """The span attribute holding `name`: a subscription's."""

    def __init__(
        self,
        subscription: str,
        *,
        api_root: str | None = None,
        emulator_host: str | None = None,
        service_file: str | None = None,
        max_messages: int = 10,
        pull_timeout: float = 120.0,
        ack_deadline: int | None = None,
        nack_backoff: Backoff | None = None,
        name: str | None = None,
        decode: Decoder | None = None,
        ordered: bool | None = None,
    ) -> None:
        gcp.require_sdk()
        if not isinstance(subscription, str) or not _SUBSCRIPTION.fullmatch(subscription):
            raise ConfigurationError(
                "subscription must be a full path 'projects/PROJECT/subscriptions/NAME', "
                f"got {subscription!r}"
            )
        check_int("max_messages", max_messages, 1)
        if not pull_timeout > 0:
            raise ConfigurationError(f"pull_timeout must be > 0 seconds, got {pull_timeout!r}")
        if ack_deadline is not None:
            check_int("ack_deadline", ack_deadline, _MIN_ACK_DEADLINE, maximum=_MAX_ACK_DEADLINE)
        self.decoder = decode
        self.subscription = subscription
        """The full subscription path."""
        self.ack_deadline = ack_deadline
        """Seconds a pulled message may stay unacknowledged (None: the subscription's)."""
        self.nack_backoff = backoff_of("nack_backoff", nack_backoff, _NACK_BACKOFF)
        """How long a message whose handlers failed stays away, by its failed deliveries."""
        self._failures: dict[str, int] = {}
        """Failed deliveries by message id, for the backoff when Pub/Sub does not count them."""
        self.extend_interval = None if ack_deadline is None else ack_deadline / 2
        """Half of ``ack_deadline``: how often the worker extends it (None: never)."""
        self.api_root, self.emulated = gcp.endpoint(api_root, emulator_host)
        self.max_messages = max_messages
        """The most messages one pull returns."""
        self.pull_timeout = pull_timeout
        """Seconds one pull may wait for messages."""
        self.name = name or subscription.rsplit("/", 1)[-1]
        """A name for logs: the subscription's name unless given."""
        self._service_file = service_file
        self._session: aiohttp.ClientSession | None = None
        self._client: SubscriberClient | None = None
        self._acks = Coalescer(self._acknowledge, _MAX_ACK_IDS)
        self.ordered = ordered
        """Whether a key's messages are handled in their order (None: not read yet)."""

    def __repr__(self) -> str:
        return f"<PubSubSource {self.name!r} subscription={self.subscription!r}>"

    @property
    def client(self) -> SubscriberClient:
        """The gcloud-aio `SubscriberClient`, once `start` ran."""
        if self._client is None:
            raise SourceError(f"Pub/Sub source {self.name} has not started")
        return self._client

    async def start(self) -> None:
        """Open the HTTP session and the subscriber client (imports gcloud-aio-pubsub)."""
        import aiohttp
        from gcloud.aio.pubsub import SubscriberClient

        session = aiohttp.ClientSession()
        try:
            self._client = SubscriberClient(
                **gcp.client_options(session, self.api_root, self.emulated, self._service_file)
            )
        except Exception as exc:  # an unreadable or invalid credentials file
            await session.close()
            raise SourceError(
                f"Pub/Sub source {self.name}: cannot create the client: {gcp.describe(exc)}"
            ) from exc
        self._session = session

    async def close(self) -> None:
        """Wait for acknowledgements under way, then close the client and its session."""
        await self._acks.wait()
        client, session, self._client, self._session = self._client, self._session, None, None
        if client is not None:
            await client.close()
        if session is not None:
            await session.close()

    async def receive(self, max_messages: int) -> list[ReceivedMessage]:
        """One pull; waits up to ``pull_timeout`` seconds for messages."""
        client = self.client
        try:
            with self._translated("pull"):
                pulled = await self._pull(client, max(1, min(max_messages, self.max_messages)))
        except TimeoutError:  # longer than the server holds an empty pull: it is stalled
            logger.warning(
                "Pub/Sub source %s: a pull got no answer within pull_timeout (%gs); pulling "
                "again (what the server hands the abandoned pull comes back at its ack "
                "deadline)",
                self.name,
                self.pull_timeout,
            )
            return []
        ordered = self.ordered
        if ordered is None and any(_ordering_key(item) for item in pulled):
            ordered = await self._subscription_orders(client)
        received = [m for item in pulled if (m := self._read(item, ordered is True)) is not None]
        if received and self.ack_deadline is not None:
            await self._set_deadlines(received, self.ack_deadline)
        return received

    async def _pull(self, client: SubscriberClient, count: int) -> list[Mapping[str, Any]]:
        """One ``pull`` request's received messages. Through the client's session, as its
        ``pull`` does, but read here: ``SubscriberClient.pull`` drops each message's
        ``orderingKey``, which the worker needs to keep a key's messages in order."""
        headers = {
            "Content-Type": "application/json",
            **await gcp.auth_headers(client, self.emulated),
        }
        response = await client.session.post(
            f"{self.api_root}/{self.subscription}:pull",
            data=json.dumps({"maxMessages": count}).encode(),
            headers=headers,
            timeout=self.pull_timeout,
        )
        received: list[Mapping[str, Any]] = (await response.json()).get("receivedMessages", [])
        return received

    async def _subscription_orders(self, client: SubscriberClient) -> bool:
        """Whether the subscription orders messages, kept as `ordered` once known; True (and
        a WARNING) if that cannot be read: a key's messages are then kept in order, as an
        ordered subscription needs. A transient failure is asked again at the next pull."""
        try:
            with self._translated("read whether the subscription orders messages"):
                response = await client.session.get(
                    f"{self.api_root}/{self.subscription}",
                    headers=await gcp.auth_headers(client, self.emulated),
                    timeout=min(self.pull_timeout, _READ_TIMEOUT),  # the pull's messages wait
                )
                subscription = await response.json()
                if not isinstance(subscription, Mapping):  # else the pull's messages are lost
                    raise ValueError(f"its answer is a JSON {type(subscription).__name__}")
        except (SourceError, TimeoutError) as exc:
            transient = not isinstance(exc, SourceError) or exc.transient
            logger.warning(
                "Pub/Sub source %s: %s; the messages of one ordering key are handled one "
                "after the other, as an ordered subscription's (%s)",
                self.name,
                exc or "reading the subscription timed out",
                "asked again at the next pull"
                if transient
                else "PubSubSource(ordered=...) or --ordered/--unordered says which it is",
            )
            if not transient:  # a permission missing: asking again would fail again
                self.ordered = True
            return True
        self.ordered = subscription.get("enableMessageOrdering") is True
        return self.ordered

    def _read(self, item: Any, ordered: bool) -> ReceivedMessage | None:
        """One item of a pull answer; one that is malformed fails alone, never the pull.

        Without its ``messageId`` (or with a ``message`` that is not one), the item is a
        message the worker cannot decode: its ``on_undecodable`` applies. Without its
        ``ackId`` it can be neither acknowledged nor given back: an ERROR names it, and
        Pub/Sub delivers it again at its ack deadline."""
        try:
            return _received(item, ordered)
        except (KeyError, TypeError, AttributeError) as exc:
            why = f"its {exc.args[0]} is missing" if isinstance(exc, KeyError) else repr(exc)
        ack_id = item.get("ackId") if isinstance(item, Mapping) else None
        message = item.get("message") if isinstance(item, Mapping) else None
        message_id = message.get("messageId") if isinstance(message, Mapping) else None
        if not isinstance(ack_id, str) or not ack_id:
            logger.error(
                "Pub/Sub source %s: a pull answer held a message with no ackId (messageId=%s): "
                "it can be neither acknowledged nor given back, and is delivered again at its "
                "ack deadline",
                self.name,
                message_id,
            )
            return None
        if not message_id:  # its give-backs' backoff grows as for any message
            message_id = content_name(message, "messageId")
        attempt = item.get("deliveryAttempt")
        return malformed(
            {"data": b"", "attributes": {}},
            f"a malformed item of a pull answer: {why}",
            str(message_id),
            ack_id,
            attempt if type(attempt) is int else None,
        )

    async def ack(self, message: ReceivedMessage) -> None:
        """Acknowledge *message* (in one request with others acknowledged meanwhile)."""
        self._failures.pop(message.message_id, None)
        await self._acks.submit(message)

    async def nack(self, message: ReceivedMessage, delay: float | None = None) -> None:
        """Give *message* back: its ack deadline becomes *delay* seconds from now.

        The default follows `nack_backoff` by the message's failed deliveries (Pub/Sub's
        ``deliveryAttempt`` when the subscription has a dead-letter policy, else counted
        here): 1 s, 2 s, 4 s... up to a minute, so that a failing message does not come
        back in a tight loop when the subscription has no retry policy of its own.
        """
        if delay is None:
            failures = self._failures
            attempt = message.receive_count or failures.get(message.message_id, 0) + 1
            failures.pop(message.message_id, None)
            failures[message.message_id] = attempt
            if len(failures) > _TRACKED_FAILURES:  # forget the oldest
                del failures[next(iter(failures))]
            delay = self.nack_backoff.delay(attempt)
        seconds = max(0, min(_MAX_ACK_DEADLINE, round(delay)))
        with self._translated(f"nack message {message.message_id}"):
            await self.client.modify_ack_deadline(self.subscription, [message.receipt], seconds)

    async def extend(self, message: ReceivedMessage, seconds: float | None = None) -> None:
        """Set *message*'s ack deadline to *seconds* from now (default: ``ack_deadline``)."""
        if seconds is None:
            if self.ack_deadline is None:
                raise ConfigurationError(
                    f"Pub/Sub source {self.name}: no ack_deadline to extend to"
                )
            seconds = self.ack_deadline
        # Rounded up, as SQS's are: the worker's last extension must not end before its time.
        deadline = max(0, min(_MAX_ACK_DEADLINE, math.ceil(seconds)))
        with self._translated(f"extend the ack deadline of message {message.message_id}"):
            await self.client.modify_ack_deadline(self.subscription, [message.receipt], deadline)

    async def _set_deadlines(self, messages: list[ReceivedMessage], seconds: int) -> None:
        """Give just-pulled *messages* ``ack_deadline`` (the subscription's may be shorter)."""
        try:
            with self._translated("set the ack deadline of pulled messages"):
                receipts = [message.receipt for message in messages]
                await self.client.modify_ack_deadline(self.subscription, receipts, seconds)
        except (SourceError, TimeoutError) as exc:
            logger.warning(
                "%s; they keep the subscription's ack deadline until extended", exc or "timed out"
            )

    async def _acknowledge(self, messages: list[ReceivedMessage]) -> list[str | None]:
        """One ``acknowledge`` request for *messages*; sent once more after a transient
        failure (a 503, a timeout: acknowledging twice is harmless), since a failure brings
        every message it carried back, to be handled again."""
        receipts = [message.receipt for message in messages]
        try:
            with self._translated("acknowledge messages"):
                await self.client.acknowledge(self.subscription, receipts)
        except (SourceError, TimeoutError) as exc:
            if isinstance(exc, SourceError) and not exc.transient:
                raise
            logger.info(
                "Pub/Sub source %s: acknowledging %d message(s) failed (%s); trying again",
                self.name,
                len(messages),
                exc or "timed out",
            )
            await asyncio.sleep(_ACK_RETRY_DELAY)
            with self._translated("acknowledge messages"):
                await self.client.acknowledge(self.subscription, receipts)
        return [None] * len(messages)

    @contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        """Raise aiohttp's errors in the block as `SourceError` (timeouts as they are)."""
        import aiohttp

        context = f"Pub/Sub source {self.name}: cannot {action}"
        try:
            yield
        except aiohttp.ClientResponseError as exc:
            status = exc.status
            transient = status >= 500 or status in gcp.RETRYABLE_STATUS
            message = f"{context}: HTTP {status} {gcp.clip(exc.message)}"
            raise SourceError(message, transient=transient) from exc
        except TimeoutError:
            raise
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise SourceError(f"{context}: {gcp.describe(exc)}", transient=True) from exc
        except Exception as exc:
            if type(exc).__module__.split(".")[0] != "jwt":
                raise
            # The service account's key cannot sign a token: no retry fixes that.
            raise SourceError(f"{context}: invalid credentials ({type(exc).__name__})") from exc

    # -- reading a received message (a pull's data and attributes) --------------------

    def decode(self, message: ReceivedMessage) -> Event:
        """The event in *message*: the `decoder`'s, else Google's CloudEvents binding's."""
        refuse_malformed(message)
        event = self.hooked(message)
        return gcp.decode(message.body) if event is None else event

    def message_size(self, message: ReceivedMessage) -> int:
        """Bytes Pub/Sub counts for *message*: the data, and each attribute's name and value."""
        return gcp.size(message.body)

    def trace_context(self, message: ReceivedMessage) -> dict[str, str]:
        """The W3C trace context in *message*'s ``traceparent``/``tracestate`` attributes.

        Without a ``traceparent``, the ``googclient_traceparent``/``googclient_tracestate``
        that Google's client libraries write are read instead; without either, in
        structured mode, the CloudEvent's ``traceparent``/``tracestate`` members.
        """
        return gcp.trace_context(message.body)


def _ordering_key(item: object) -> bool:
    """Whether a pull answer's *item* holds a message with an ordering key."""
    message = item.get("message") if isinstance(item, Mapping) else None
    return isinstance(message, Mapping) and bool(message.get("orderingKey"))


def _received(item: Mapping[str, Any], ordered: bool) -> ReceivedMessage:
    """A pull's received message: its ordering key (if any, from an *ordered* subscription)
    orders it in the worker."""
    message = item["message"]
    key = message.get("orderingKey")
    if key is not None and not isinstance(key, str):  # else it would reach the worker's
        raise TypeError(f"its orderingKey is a {type(key).__name__}, not a string")  # groups
    data = gcp.rest_data(message.get("data"))
    attempt = item.get("deliveryAttempt")
    return ReceivedMessage(
        body={"data": b"" if data is None else data, "attributes": message.get("attributes") or {}},
        message_id=message["messageId"],
        receipt=item["ackId"],
        receive_count=attempt if type(attempt) is int else None,  # it sets the nack's backoff
        order_key=(key or None) if ordered else None,  # "": none
    )
