"""Forward events to a Google Cloud Pub/Sub topic (extra ``gcp``: gcloud-aio-pubsub).

```python
from fastapi_eventbus.forwarders.pubsub import PubSubForwarder

bus.forward("order.*", PubSubForwarder("projects/my-project/topics/orders"))
```

Events are published in CloudEvents *binary* mode (`fastapi_eventbus.wire`): the
payload as JSON in ``data``, the context in ``ce-*`` attributes, W3C trace
context in ``traceparent``/``tracestate`` attributes, and again in
``googclient_traceparent``/``googclient_tracestate`` for subscribers using Google's
client libraries (their size counts toward the message's). A flush's events go out in
as few publish requests as the service's per-request limits allow. The SDK is
imported when the forwarder starts, never when this module is imported.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, ClassVar

from fastapi_eventbus._brokers import gcp
from fastapi_eventbus._events import Event
from fastapi_eventbus._retry import Retry
from fastapi_eventbus._settings import check_int
from fastapi_eventbus.exceptions import (
    ConfigurationError,
    ForwarderError,
    InvalidEventError,
)
from fastapi_eventbus.forwarders._base import Delivery, Forwarder, OnDeadLetter
from fastapi_eventbus.wire import pubsub_attributes, pubsub_data, pubsub_data_size

if TYPE_CHECKING:
    import aiohttp
    from gcloud.aio.pubsub import PublisherClient, PubsubMessage

__all__ = [
    "DEFAULT_API_ROOT",
    "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTE_KEY_BYTES",
    "MAX_ATTRIBUTE_VALUE_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_ORDERING_KEY_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_MESSAGES",
    "OrderingKey",
    "PubSubForwarder",
]

DEFAULT_API_ROOT = gcp.DEFAULT_API_ROOT
"""The Pub/Sub REST endpoint used when neither ``api_root`` nor an emulator is given."""
MAX_MESSAGE_BYTES = 10_000_000
"""Pub/Sub's limit on one message (data plus attributes)."""
MAX_REQUEST_MESSAGES = 1_000
"""Pub/Sub's limit on messages in one publish request."""
MAX_REQUEST_BYTES = 10_000_000
"""Pub/Sub's limit on one publish request, counted here as its JSON body (data in base64)."""
MAX_ORDERING_KEY_BYTES = 1_024
"""Pub/Sub's limit on an ordering key."""
MAX_ATTRIBUTE_VALUE_BYTES = 1_024
"""Pub/Sub's limit on one attribute value (a ``ce-*`` attribute, ``traceparent``...)."""
MAX_ATTRIBUTE_KEY_BYTES = 256
"""Pub/Sub's limit on one attribute name (``ce-`` and an extension attribute's name)."""
MAX_ATTRIBUTES = 100
"""Pub/Sub's limit on the attributes of one message: the event's context, its trace
context and its extension attributes (`fastapi_eventbus.Event.extensions`) together."""

_TOPIC = re.compile(r"projects/[^/\s]+/topics/[A-Za-z][A-Za-z0-9_.~+%-]{2,254}")
_REQUEST_OVERHEAD = len('{"messages": []}')
_VERIFY_HINTS = {
    404: "the topic does not exist (check the project and topic id)",
    403: "the credentials may not read the topic (pubsub.topics.get is needed to verify it)",
    401: "the credentials were refused",
}
"""What an HTTP status of `PubSubForwarder.verify` most likely means."""

OrderingKey = Callable[[Event], str]
"""What ``ordering_key`` is: a function giving an event its ordering key (``""``: none)."""


class PubSubForwarder(Forwarder):
    """Publish events to one Pub/Sub topic, batched within the service's limits.

    Each flush's matching events are published in order, in requests of at
    most 1,000 messages and 10 MB. With *ordering_key*, batches are published
    one at a time, in the order their flushes reached the forwarder, so that
    the messages of a key reach Pub/Sub in emission order. Connection errors,
    timeouts, HTTP 429 and 5xx are retried with backoff; other HTTP errors (a
    missing topic, a denied permission) dead-letter the events at once.

    Args:
        topic: The full topic path, ``"projects/PROJECT/topics/TOPIC"``.
        api_root: The REST endpoint, e.g. a regional one
            (``"https://europe-west1-pubsub.googleapis.com/v1"``). An ``http://``
            root is treated as an emulator: no credentials are sent over it.
        emulator_host: ``"host:port"`` of a Pub/Sub emulator. Defaults to the
            ``PUBSUB_EMULATOR_HOST`` environment variable; with an emulator no
            Google credentials are looked up or sent.
        service_file: A service-account (or other credentials) JSON file; by
            default Application Default Credentials are used.
        session: An `aiohttp.ClientSession` to use instead of the forwarder's
            own. It is not closed by the forwarder, and must belong to the event
            loop the forwarder sends on.
        ordering_key: Returns the ordering key for an event (``""`` for none).
            Called at emit time too, so its errors reach the caller of ``emit``.
        timeout: Seconds allowed for one publish request.
        max_message_bytes: Reject, at emit time, events whose message is larger.
        retry: The retry policy for transient failures.
        dead_letter: Called with a `DeadLetter` for events that could not be delivered.
        name: A name for logs (default: the class name).
        verify_on_start: At startup, get the topic (see `verify`) and fail the
            application's startup if the credentials or the topic are wrong.
            Recommended in production; needs ``pubsub.topics.get``.

    Raises:
        MissingExtraError: gcloud-aio-pubsub (the ``gcp`` extra) is not installed.
        ConfigurationError: An argument is invalid, e.g. a topic that is not a full
            path, or both *api_root* and *emulator_host*.
    """

    messaging_system: ClassVar[str] = "gcp_pubsub"
    """The OpenTelemetry ``messaging.system`` of send spans."""

    def __init__(
        self,
        topic: str,
        *,
        api_root: str | None = None,
        emulator_host: str | None = None,
        service_file: str | None = None,
        session: aiohttp.ClientSession | None = None,
        ordering_key: OrderingKey | None = None,
        timeout: float = 10.0,
        max_message_bytes: int | None = MAX_MESSAGE_BYTES,
        retry: Retry | None = None,
        dead_letter: OnDeadLetter | None = None,
        name: str | None = None,
        verify_on_start: bool = False,
    ) -> None:
        super().__init__(
            retry=retry,
            dead_letter=dead_letter,
            max_message_bytes=max_message_bytes,
            name=name,
            verify_on_start=verify_on_start,
        )
        gcp.require_sdk()  # first, like the other SDK classes: a missing extra is the real problem
        if max_message_bytes is not None:  # None: no check at emit (Pub/Sub's own at send)
            check_int("max_message_bytes", max_message_bytes, 1, maximum=MAX_MESSAGE_BYTES)
        if not isinstance(topic, str) or not _TOPIC.fullmatch(topic):
            raise ConfigurationError(
                f"topic must be a full topic path 'projects/PROJECT/topics/TOPIC', got {topic!r}"
            )
        if ordering_key is not None and not callable(ordering_key):
            raise ConfigurationError(f"ordering_key must be callable, got {ordering_key!r}")
        if not timeout > 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.topic = topic
        """The full topic path."""
        self.api_root, self.emulated = gcp.endpoint(api_root, emulator_host)
        self.ordering_key = ordering_key
        """Returns the ordering key for an event, if set."""
        self.timeout = timeout
        """Seconds allowed for one publish request."""
        self._service_file = service_file
        self._given_session = session
        self._session: aiohttp.ClientSession | None = None
        self._client: PublisherClient | None = None
        self._in_order: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} topic={self.topic!r}>"

    @property
    def destination(self) -> str:
        """The topic's id (the last part of its path)."""
        return self.topic.rsplit("/", 1)[-1]

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP session and the publisher client (imports gcloud-aio-pubsub)."""
        import aiohttp
        from gcloud.aio.pubsub import PublisherClient

        given = self._given_session
        session = aiohttp.ClientSession() if given is None else given
        try:
            client = PublisherClient(
                **gcp.client_options(session, self.api_root, self.emulated, self._service_file)
            )
        except Exception as exc:  # unreadable or invalid credentials file
            if given is None:
                await session.close()
            raise ForwarderError(
                f"{self.name}: could not create the Pub/Sub client: {gcp.describe(exc)}"
            ) from exc
        self._session = session if given is None else None
        self._client = client
        self._in_order = asyncio.Lock() if self.ordering_key is not None else None

    async def close(self) -> None:
        """Close the publisher client and the session the forwarder opened."""
        client, session = self._client, self._session
        self._client = self._session = self._in_order = None
        if client is not None:
            await client.close()  # closes only what the client itself opened
        if session is not None:
            await session.close()

    def abandon(self) -> None:
        """Forget the session and client of another event loop (they cannot be closed here)."""
        self._client = self._session = self._in_order = None

    async def verify(self) -> None:
        """Get the topic (with *verify_on_start*): it must exist and be readable.

        Fails if the credentials cannot be loaded or are refused, or if the
        topic does not exist. Needs the ``pubsub.topics.get`` permission
        (``roles/pubsub.viewer`` on the topic), besides ``roles/pubsub.publisher``.
        """
        client = self._current_client()
        try:
            with _translated(f"get topic {self.topic}"):
                headers = await gcp.auth_headers(client, self.emulated)
                url = f"{self.api_root}/{self.topic}"
                response = await client.session.get(url, headers=headers, timeout=self.timeout)
                response.release()
        except ForwarderError as exc:
            hint = _VERIFY_HINTS.get(getattr(exc.__cause__, "status", 0))
            if hint is None:
                raise
            raise ForwarderError(f"{exc}: {hint}", transient=exc.transient) from exc.__cause__

    # -- sending --------------------------------------------------------------------

    async def send(self, events: Sequence[Event]) -> Delivery | None:
        """Publish *events* in order, in as few requests as the service's limits allow.

        Raises `ForwarderError` if the first request fails; if a later one fails,
        returns a `Delivery` naming the events not yet published: to retry, or rejected
        when Pub/Sub refused them for good and not for one message's value.
        """
        client = self._current_client()
        if self._in_order is None:
            return await self._send(client, events)
        async with self._in_order:  # one batch at a time, in the order the flushes came
            return await self._send(client, events)

    async def _send(self, client: PublisherClient, events: Sequence[Event]) -> Delivery | None:
        requests = list(self._requests(events))  # everything encoded before anything is sent
        published = 0
        for messages in requests:
            try:
                await self._publish(client, messages)
            except ForwarderError as exc:
                if published == 0:
                    raise
                rest = events[published:]
                # A value refused (a 400) is one message's: sent again, the failing request
                # comes first, and `Forwarder.deliver` splits it down to that message.
                if exc.transient or self.may_be_one_message(exc):
                    return Delivery(retry=rest, reason=str(exc))
                return Delivery(rejected=rest, reason=str(exc))
            published += len(messages)
        return None

    def encoded_size(self, event: Event) -> int:
        """Bytes of the Pub/Sub message for *event*: data, attribute keys and values, key."""
        size = pubsub_data_size(event)
        size += sum(len(k.encode()) + len(v.encode()) for k, v in pubsub_attributes(event).items())
        return size + len(self._ordering_key(event).encode())

    def check(self, event: Event) -> None:
        """Raise `InvalidEventError` if Pub/Sub would refuse *event* (called at emit time)."""
        super().check(event)
        attributes = pubsub_attributes(event)
        if len(attributes) > MAX_ATTRIBUTES:
            raise InvalidEventError(
                f"event {event.name!r} would be a message with {len(attributes)} attributes, "
                f"over Pub/Sub's limit of {MAX_ATTRIBUTES}: it has too many extensions"
            )
        for key, value in attributes.items():
            if len(key) > MAX_ATTRIBUTE_KEY_BYTES:  # names are ASCII
                raise InvalidEventError(
                    f"event {event.name!r}: attribute name {key[:40]!r}... is over Pub/Sub's "
                    f"{MAX_ATTRIBUTE_KEY_BYTES}-byte limit for attribute names"
                )
            if len(value.encode()) > MAX_ATTRIBUTE_VALUE_BYTES:
                raise InvalidEventError(
                    f"event {event.name!r}: attribute {key!r} is over Pub/Sub's "
                    f"{MAX_ATTRIBUTE_VALUE_BYTES}-byte limit for attribute values"
                )
        if len(self._ordering_key(event).encode()) > MAX_ORDERING_KEY_BYTES:
            raise InvalidEventError(
                f"event {event.name!r}: ordering key is over Pub/Sub's "
                f"{MAX_ORDERING_KEY_BYTES}-byte limit"
            )

    def _ordering_key(self, event: Event) -> str:
        if self.ordering_key is None:
            return ""
        key = self.ordering_key(event)
        if not isinstance(key, str):
            raise InvalidEventError(
                f"event {event.name!r}: ordering_key returned {type(key).__name__}, not str"
            )
        return key

    def _current_client(self) -> PublisherClient:
        if self._client is None:
            raise ForwarderError(f"{self.name} is not started")
        return self._client

    def _message(self, event: Event) -> PubsubMessage:
        from gcloud.aio.pubsub import PubsubMessage

        attributes = pubsub_attributes(event)
        return PubsubMessage(pubsub_data(event), self._ordering_key(event), **attributes)

    def _requests(self, events: Sequence[Event]) -> Iterator[list[PubsubMessage]]:
        """Split *events* into publish requests within the count and byte limits, in order."""
        messages: list[PubsubMessage] = []
        size = _REQUEST_OVERHEAD
        for event in events:
            message = self._message(event)
            message_size = len(json.dumps(message.to_repr())) + 2  # ", " between messages
            full = len(messages) >= MAX_REQUEST_MESSAGES or size + message_size > MAX_REQUEST_BYTES
            if messages and full:
                yield messages
                messages, size = [], _REQUEST_OVERHEAD
            messages.append(message)
            size += message_size
        if messages:
            yield messages

    def may_be_one_message(self, exc: BaseException) -> bool:
        """Only a 400 (``INVALID_ARGUMENT``: a value Pub/Sub refuses): a missing topic or a
        denied access is every message's."""
        cause = exc.__cause__
        return getattr(cause, "status", None) == 400  # aiohttp's ClientResponseError

    async def _publish(self, client: PublisherClient, messages: list[PubsubMessage]) -> None:
        """One publish request; SDK and HTTP errors become `ForwarderError`."""
        with _translated(f"publish to {self.topic}"):
            # AioSession.post takes float seconds; PublisherClient.publish annotates int.
            response = await client.publish(self.topic, messages, timeout=self.timeout)  # type: ignore[arg-type]
        ids = response.get("messageIds")
        if not isinstance(ids, list) or len(ids) != len(messages):
            raise ForwarderError(
                f"publish to {self.topic}: {len(messages)} message(s) sent, response lists "
                f"{len(ids) if isinstance(ids, list) else 'no'} message id(s)",
                transient=True,
            )


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """Raise the `ForwarderError` for an SDK or HTTP error raised in the block."""
    import aiohttp

    try:
        yield
    except aiohttp.ClientResponseError as exc:
        transient = exc.status < 400 or exc.status >= 500 or exc.status in gcp.RETRYABLE_STATUS
        raise ForwarderError(
            f"{action} failed: HTTP {exc.status} {gcp.clip(exc.message)}", transient=transient
        ) from exc
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        raise ForwarderError(f"{action} failed: {gcp.describe(exc)}", transient=True) from exc
    except Exception as exc:  # e.g. fetching an access token failed
        raise ForwarderError(f"{action} failed: {gcp.describe(exc)}") from exc
