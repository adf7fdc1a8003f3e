"""`push_router`: Pub/Sub push and CloudEvents over HTTP (Eventarc) requests run the app's handlers.

Each request carries one message, which goes the way a worker's message goes
(`Processor`, from `fastapi_eventbus.worker`): its trace context, its size, its
event (the decode hook first), the ``on_undecodable`` and ``on_unhandled``
policies, the bus's handlers, and then "ack" or "nack", which here only choose
the answer: 204 for an ack, an error status for a nack, so that Pub/Sub (or
Eventarc, which pushes through Pub/Sub) delivers the message again.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import unquote

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from fastapi_eventbus import wire
from fastapi_eventbus._brokers import (
    byte_length,
    gcp,
    media_type,
    parse_json,
    trace_or_nothing,
)
from fastapi_eventbus._bus import EventBus, get_bus
from fastapi_eventbus._events import Event
from fastapi_eventbus._settings import check_seconds
from fastapi_eventbus.exceptions import ConfigurationError, MessageDecodeError
from fastapi_eventbus.worker._delivery import (
    HeldMessage,
    OnUndecodable,
    OnUnhandled,
    Processor,
    WorkerStats,
    check_policies,
)
from fastapi_eventbus.worker._source import ReceivedMessage, Source

logger = logging.getLogger("fastapi_eventbus.serverless")

MESSAGE_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"
"""The CloudEvents type of Eventarc's events for a Pub/Sub topic: a push envelope as data."""
MAX_TIMEOUT = 600.0
"""The longest a request waits for its handlers by default: Pub/Sub's longest ack deadline.
Past the subscription's ack deadline Pub/Sub delivers the message again anyway."""
CANCEL_GRACE = 1.0
"""Seconds handlers cancelled at the time limit have to unwind before the answer goes out."""
_MAX_MESSAGE_BYTES = 10_000_000
"""The default ``max_message_bytes``: Pub/Sub's largest message (10 MB)."""
_ENVELOPE_BYTES = 1_048_576
"""Room in a request's body beside a message's data in base64: the envelope, the attributes.
A body longer than that and ``max_message_bytes`` in base64 is not even read whole."""

Verify = Callable[[Request], Awaitable[None] | None]
"""A request check, async or sync: returns to accept the request, raises `HTTPException`
(401, 403) to refuse it."""


AppBus = Annotated[EventBus, Depends(get_bus)]
"""The bus the routes run handlers with: `get_bus`'s, so the app's overrides apply."""


class UnsupportedMode(MessageDecodeError):
    """A CloudEvents request in a mode or event format not read here (batched mode): 415."""


class TooLarge(MessageDecodeError):
    """A request whose body is too long to hold a message within ``max_message_bytes``: 413."""


def push_router(
    *,
    path: str = "",
    decode: wire.Decoder | None = None,
    verify: Callable[[Request], Awaitable[None] | None] | None = None,
    timeout: float | None = None,
    on_undecodable: OnUndecodable = "retry",
    on_unhandled: OnUnhandled = "retry",
    max_message_bytes: int = _MAX_MESSAGE_BYTES,
) -> APIRouter:
    """A router with the endpoints Pub/Sub push subscriptions and Eventarc triggers call.

    ```python
    app.include_router(push_router(path="/events", verify=GoogleOIDC(audience)))
    ```

    ``POST {path}/pubsub`` takes a push subscription's envelope
    (``{"message": {"data", "attributes", "messageId", ...}, "subscription"}``),
    decoded like `fastapi_eventbus.worker.PubSubSource`'s messages. ``POST
    {path}/cloudevents`` takes a CloudEvent over HTTP, as Eventarc sends it:
    binary mode (``ce-*`` headers, the body is the data) or structured mode
    (``Content-Type: application/cloudevents+json``); an event of type
    ``google.cloud.pubsub.topic.v1.messagePublished`` (a Pub/Sub topic's trigger)
    is unwrapped into the Pub/Sub message it carries. Batched mode is answered 415.

    The answer is 204 once every matching handler succeeded. A handler that
    failed or ran out of time gives 500, and the service delivers the message
    again (Pub/Sub's retry policy; its dead-letter topic after the subscription's
    maximum delivery attempts). A request that is not an event gives 400 (415
    for a mode not read, 413 over *max_message_bytes*) and one whose event no
    handler matches 500, unless their policy is ``"delete"``: then 204. Each is
    logged as the worker logs it.

    The handlers are the bus `get_bus` gives in the app (its
    ``dependency_overrides`` too), called with this request's scope: a handler
    asking for `Request` gets the push request, whose ``state`` holds what the
    lifespan yielded.

    Args:
        path: The prefix of the two routes (``""`` or ``"/..."``, no trailing ``/``).
        decode: A decode hook (`fastapi_eventbus.wire.Decoder`): it gets the Pub/Sub
            message (``{"data": bytes, "attributes": {...}}``, as `PubSubSource`'s
            hook does) for ``/pubsub`` and Eventarc's ``messagePublished`` events,
            and the CloudEvent as a dict (binary mode: the body in ``data_base64``)
            for other CloudEvents; None lets the built-in decoding read it.
        verify: Called with each request before anything is read (an async or a sync
            function); raise `HTTPException` (401 or 403) to refuse it, e.g. `GoogleOIDC`.
        timeout: Seconds a request's handlers may take (from when they start) before
            they are cancelled and the request is answered 500. Default: their time
            limits, plus as much again for the events they emit (as in the worker),
            and at most 600 s. Keep the subscription's ack deadline longer.
        on_undecodable: ``"retry"`` (answer 4xx: the message comes again, and
            reaches the dead-letter topic) or ``"delete"`` (log it, answer 204).
        on_unhandled: ``"retry"`` (answer 500) or ``"delete"`` (log it, answer 204),
            for an event no handler matches.
        max_message_bytes: The largest message decoded (data plus attributes).

    Raises:
        ConfigurationError: An argument is invalid.
    """
    if not isinstance(path, str) or (path and (not path.startswith("/") or path.endswith("/"))):
        raise ConfigurationError(f"path must be '' or start with '/' and not end with it: {path!r}")
    if verify is not None and not callable(verify):
        raise ConfigurationError(f"verify must be a callable (Request) -> None: {verify!r}")
    check_policies(on_undecodable, on_unhandled, max_message_bytes)
    settings = _Settings(
        wire.check_decoder(decode),
        verify,
        check_seconds("timeout", timeout, positive=True, optional=True),
        on_undecodable,
        on_unhandled,
        max_message_bytes,
    )
    return _Endpoints(settings).router(path)


@dataclass(frozen=True, slots=True)
class _Settings:
    decode: wire.Decoder | None
    verify: Verify | None
    timeout: float | None
    on_undecodable: OnUndecodable
    on_unhandled: OnUnhandled
    max_message_bytes: int


class _Endpoints:
    """The two routes' code, and the handler calls left running past their time limit."""

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        self.left_running: set[asyncio.Task[None]] = set()
        self.in_flight: Counter[str] = Counter()
        """Message ids being handled now (a push delivered again meanwhile is a WARNING)."""

    def router(self, path: str) -> APIRouter:
        router = APIRouter()
        options: dict[str, Any] = {"methods": ["POST"], "include_in_schema": False}
        router.add_api_route(f"{path}/pubsub", self.pubsub, **options)
        router.add_api_route(f"{path}/cloudevents", self.cloudevents, **options)
        return router

    async def pubsub(self, request: Request, bus: AppBus) -> Response:
        """A Pub/Sub push request: the envelope of one message."""
        await self._verified(request)
        body = await self._body(request)
        if body is None:
            return await self._run(bus, _too_large(self.settings, "Pub/Sub push", "pubsub"))
        return await self._run(bus, pubsub_message(body))

    async def cloudevents(self, request: Request, bus: AppBus) -> Response:
        """A CloudEvent over HTTP, binary or structured mode."""
        await self._verified(request)
        body = await self._body(request)
        if body is None:
            message_id = request.headers.get("ce-id")  # binary mode: known without the body
            pushed = _too_large(self.settings, CLOUDEVENTS_SENDER, "cloudevent", message_id)
            return await self._run(bus, pushed)
        return await self._run(bus, cloudevent_message(request.headers, body))

    async def _body(self, request: Request) -> bytes | None:
        """The request's body; None, and the rest unread, once it is too long for a message."""
        limit = self.settings.max_message_bytes * 4 // 3 + _ENVELOPE_BYTES
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _verified(self, request: Request) -> None:
        verify = self.settings.verify
        if verify is None:
            return
        try:
            if inspect.isawaitable(outcome := verify(request)):  # async, or a sync function
                await outcome
        except HTTPException as exc:
            logger.warning(
                "push request to %s refused (%d): %s", request.url.path, exc.status_code, exc.detail
            )
            raise

    async def _run(self, bus: EventBus, pushed: Pushed) -> Response:
        message_id = pushed.message.message_id  # "?": none in the request, nothing to tell
        if message_id != "?" and self.in_flight[message_id]:
            logger.warning(
                "message %s from %s came again while it is being handled: its ack deadline "
                "ran out first (Pub/Sub's default is 10 s), and its handlers run twice at "
                "once; give the subscription an ack deadline above the handlers' time limits",
                message_id,
                pushed.name,
            )
        one = _OneMessage(bus, self.settings, pushed)
        self.in_flight[message_id] += 1
        try:
            await one.run()
        finally:
            self.in_flight[message_id] -= 1
            if not self.in_flight[message_id]:
                del self.in_flight[message_id]
        task = one.task
        if task is not None and not task.done():  # cancelled, and still not stopped
            self.left_running.add(task)
            task.add_done_callback(self.left_running.discard)
        return one.answer()


# -- one request's message -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pushed:
    """A request read as one message, before decoding (which the `Processor` asks for)."""

    message: ReceivedMessage
    kind: Literal["pubsub", "cloudevent"]
    """``pubsub``: the body is a Pub/Sub message; ``cloudevent``: a CloudEvent as a dict."""
    name: str
    """Who delivers it, for logs and spans: the subscription's name, or `CLOUDEVENTS_SENDER`."""
    size: int = 0
    """The CloudEvent's bytes (a Pub/Sub message's are counted from it)."""
    refusal: MessageDecodeError | None = None
    """Why the request holds no message to decode, if it does not."""


class _PushSource(Source):
    """One request's message as a `Source`: ``ack`` and ``nack`` only note the outcome."""

    destination_attribute = "messaging.destination.subscription.name"

    def __init__(self, pushed: Pushed, decode: wire.Decoder | None) -> None:
        self.pushed = pushed
        self.name = pushed.name
        self.messaging_system = "gcp_pubsub" if pushed.kind == "pubsub" else "cloudevents"
        self.decoder = decode
        self.acked: bool | None = None
        self.error: Exception | None = None
        """What decoding raised, for the answer's status."""

    async def receive(self, max_messages: int) -> list[ReceivedMessage]:
        return []  # the message comes with the request

    async def ack(self, message: ReceivedMessage) -> None:
        self.acked = True

    async def nack(self, message: ReceivedMessage, delay: float | None = None) -> None:
        self.acked = False

    def decode(self, message: ReceivedMessage) -> Event:
        try:
            if self.pushed.refusal is not None:
                raise self.pushed.refusal
            event = self.hooked(message)
            if event is not None:
                return event
            if self.pushed.kind == "pubsub":
                return gcp.decode(message.body)
            return wire.from_cloudevent(message.body, self.trace_context(message))
        except Exception as exc:
            self.error = exc
            raise

    def message_size(self, message: ReceivedMessage) -> int:
        return gcp.size(message.body) if self.pushed.kind == "pubsub" else self.pushed.size

    def trace_context(self, message: ReceivedMessage) -> dict[str, str]:
        if self.pushed.kind == "pubsub":
            return gcp.trace_context(message.body)
        return trace_or_nothing(wire.cloudevent_trace_context, message.body)


class _OneMessage:
    """One request's message through a `Processor`, bounded in time (the processor's owner)."""

    def __init__(self, bus: EventBus, settings: _Settings, pushed: Pushed) -> None:
        self.bus = bus
        self.settings = settings
        self.on_undecodable: OnUndecodable = settings.on_undecodable
        self.on_unhandled: OnUnhandled = settings.on_unhandled
        self.max_message_bytes = settings.max_message_bytes
        self.stats = WorkerStats(received=1)
        self._source = _PushSource(pushed, settings.decode)
        self.source: Source = self._source
        self.held = HeldMessage(pushed.message)
        self.task: asyncio.Task[None] | None = None
        self.limit: float | None = None
        self._over = asyncio.Event()

    async def run(self) -> None:
        """Process the message; return when it is settled, or cancelled at its time limit."""
        task = self.task = asyncio.create_task(Processor(self, self._watch).process(self.held))
        task.add_done_callback(lambda _: self._over.set())
        try:
            await self._over.wait()
        except asyncio.CancelledError:  # the server stops the request: so do its handlers
            self.held.abandoned = True
            task.cancel("cancelled: the request was stopped")
            raise
        finally:
            if self.held.timer is not None:
                self.held.timer.cancel()
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            logger.error("push message %s failed unexpectedly", self.held, exc_info=error)

    def _watch(self, held: HeldMessage, hold: float | None) -> None:
        """The handlers start: cancel them if they still run after the time limit."""
        timeout = self.settings.timeout
        if timeout is None:
            timeout = MAX_TIMEOUT if hold is None else min(hold, MAX_TIMEOUT)
        self.limit = timeout
        held.timer = asyncio.get_running_loop().call_later(timeout, self._overdue)

    def _overdue(self) -> None:
        task = self.task
        if task is None or task.done():
            return
        self.held.abandoned = True  # a late success settles nothing any more
        self.stats.abandoned += 1
        logger.error(
            "push message %s from %s is still running %gs after its handlers started: "
            "cancelling them and answering 500, so that it is delivered again",
            self.held,
            self.source.name,
            self.limit,
        )
        task.cancel(f"cancelled at the request's time limit ({self.limit:g}s)")
        asyncio.get_running_loop().call_later(CANCEL_GRACE, self._over.set)

    def answer(self) -> Response:
        """The response that acks (204) or nacks (an error status) the message."""
        if self.held.abandoned:
            return _error(500, f"the handlers did not finish within {self.limit:g}s")
        if self._source.acked:
            return Response(status_code=204)
        error = self._source.error
        if self.stats.undecodable:
            if error is None or isinstance(error, TooLarge):
                return _error(413, f"over max_message_bytes={self.max_message_bytes}")
            return _error(415 if isinstance(error, UnsupportedMode) else 400, str(error))
        event = self.held.event
        if self.stats.unhandled and event is not None:
            return _error(500, f"no handler matches the event {event.name!r} (id={event.id})")
        if self.stats.failed and event is not None:
            return _error(500, f"the event {event.name!r} (id={event.id}) failed")
        return _error(500, "the message could not be processed")


def _error(status: int, detail: str) -> Response:
    return JSONResponse({"detail": detail}, status_code=status)


# -- reading a request ------------------------------------------------------------------


def pubsub_message(body: bytes) -> Pushed:
    """A Pub/Sub push request's *body* (the envelope) as one message."""
    try:
        envelope = parse_json(body, "the push request's body")
    except MessageDecodeError as exc:
        return _refused(exc, "Pub/Sub push", "pubsub")
    return _from_envelope(envelope, "the push request's body")


def _from_envelope(envelope: object, what: str) -> Pushed:
    """The message a push envelope holds (``message``, ``subscription``, ``deliveryAttempt``)."""
    if not isinstance(envelope, Mapping) or not isinstance(envelope.get("message"), Mapping):
        refusal = MessageDecodeError(f"{what} is not a Pub/Sub push envelope (no message object)")
        return _refused(refusal, "Pub/Sub push", "pubsub")
    message: Mapping[str, Any] = envelope["message"]
    subscription = envelope.get("subscription")
    name = subscription.rsplit("/", 1)[-1] if isinstance(subscription, str) else "Pub/Sub push"
    attempt = envelope.get("deliveryAttempt")
    message_id = message.get("messageId") or message.get("message_id") or "?"
    data = gcp.rest_data(message.get("data"))  # 0, false, {}: refused by decoding, as 5 is
    received = ReceivedMessage(
        body={"data": data, "attributes": message.get("attributes") or {}},
        message_id=str(message_id),
        receipt="",
        receive_count=attempt if isinstance(attempt, int) and attempt > 0 else None,
    )
    return Pushed(received, "pubsub", name or "Pub/Sub push")


CLOUDEVENTS_SENDER = "Eventarc"
"""Who delivers a CloudEvent that is not a Pub/Sub message, for logs and spans: most often
Eventarc (a ``messagePublished`` event is named by its subscription, as on ``/pubsub``)."""


def cloudevent_message(headers: Mapping[str, str], body: bytes) -> Pushed:
    """A CloudEvents request (binary or structured mode) as one message.

    An Eventarc event of type `MESSAGE_PUBLISHED` is unwrapped into the Pub/Sub
    message its data holds.
    """
    try:
        cloudevent = _cloudevent(headers, body)
    except MessageDecodeError as exc:
        return _refused(exc, CLOUDEVENTS_SENDER, "cloudevent", headers.get("ce-id"))
    if cloudevent.get("type") == MESSAGE_PUBLISHED:
        return _published(cloudevent)
    size = byte_length(body) + sum(  # the data, and the attributes in ce-* headers
        byte_length(key) + byte_length(value)
        for key, value in headers.items()
        if key.startswith("ce-")
    )
    message_id = str(cloudevent.get("id") or "?")
    received = ReceivedMessage(body=cloudevent, message_id=message_id, receipt="")
    return Pushed(received, "cloudevent", CLOUDEVENTS_SENDER, size)


def _cloudevent(headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The request's CloudEvent as a dict in the JSON format; `MessageDecodeError` if none."""
    content_type = headers.get("content-type")
    media = None if content_type is None else media_type(content_type, "Content-Type")
    if media is not None and media.essence.startswith(gcp.CLOUDEVENTS_MEDIA_TYPE):
        if media.essence != gcp.STRUCTURED_JSON:
            raise UnsupportedMode(
                f"unsupported CloudEvents mode or format {content_type!r}: only binary mode "
                f"and structured mode in {gcp.STRUCTURED_JSON} are read"
            )
        cloudevent = media.json_of(body, "the structured CloudEvent")
        if not isinstance(cloudevent, dict):
            raise MessageDecodeError("a structured CloudEvent must be a JSON object")
        return cloudevent
    if "ce-specversion" not in headers:
        raise MessageDecodeError(
            "not a CloudEvent: no ce-specversion header (binary mode), and the Content-Type "
            f"is not {gcp.STRUCTURED_JSON} (structured mode)"
        )
    # Binary mode: every ce-* header is an attribute, its value percent-encoded.
    attributes = {
        key[3:]: unquote(value) for key, value in headers.items() if key.startswith("ce-")
    }
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    if body:
        attributes["data_base64"] = base64.b64encode(body).decode()
    return attributes


def _published(cloudevent: Mapping[str, Any]) -> Pushed:
    """Eventarc's event for a Pub/Sub message: the push envelope in its data."""
    what = f"the data of a {MESSAGE_PUBLISHED} event"
    envelope = cloudevent.get("data")
    if "data" not in cloudevent:  # binary mode (the body), or bytes in structured mode
        try:
            envelope = parse_json(_base64(cloudevent.get("data_base64"), what), what)
        except MessageDecodeError as exc:
            return _refused(exc, CLOUDEVENTS_SENDER, "pubsub", cloudevent.get("id"))
    return _from_envelope(envelope, what)


def _base64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise MessageDecodeError(f"{what} is missing")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise MessageDecodeError(f"{what} is not base64: {exc}") from exc


def _too_large(
    settings: _Settings,
    name: str,
    kind: Literal["pubsub", "cloudevent"],
    message_id: str | None = None,
) -> Pushed:
    limit = settings.max_message_bytes
    refusal = TooLarge(f"the request's body is too long for a message of {limit} bytes")
    return _refused(refusal, name, kind, message_id)


def _refused(
    refusal: MessageDecodeError,
    name: str,
    kind: Literal["pubsub", "cloudevent"],
    message_id: object = None,
) -> Pushed:
    """A request with no message to decode: decoding raises *refusal*."""
    received = ReceivedMessage(body={}, message_id=str(message_id or "?"), receipt="")
    return Pushed(received, kind, name, refusal=refusal)
