"""What a `Worker` receives from: the `Source` base class, received messages, backoff."""

from __future__ import annotations

import asyncio
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from fastapi_eventbus import wire
from fastapi_eventbus._events import Event, shown
from fastapi_eventbus._retry import exponential, jittered
from fastapi_eventbus.exceptions import ConfigurationError, MessageDecodeError, SourceError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One message a `Source` received, not yet acknowledged."""

    body: Mapping[str, Any]
    """The message as received, for its source's `Source.decode` (the built-in sources:
    as `fastapi_eventbus.wire.decode_message` takes it)."""
    message_id: str
    """The broker's id of the message (not the event id), for logs: what it holds that is
    not printable (a newline...) is escaped, so that it cannot forge log lines."""
    receipt: str
    """What acknowledges it: the SQS receipt handle, the Pub/Sub ack id."""
    receive_count: int | None = None
    """How many times the broker has delivered it, this time included, if it says."""
    order_key: str | None = None
    """Messages with the same key are handled one after the other, in the order received
    (an SQS FIFO queue's ``MessageGroupId``, a Pub/Sub message's ``orderingKey``); one not
    handled holds back the later ones."""

    def __post_init__(self) -> None:
        if not self.message_id.isprintable():  # rare: escaped once, for every log line
            object.__setattr__(self, "message_id", shown(self.message_id))


MALFORMED = "fastapi_eventbus.malformed"
"""The body key of a message its source could not read (`malformed`): why."""


def malformed(
    body: Mapping[str, Any],
    why: str,
    message_id: str,
    receipt: str,
    receive_count: int | None,
    order_key: str | None = None,
) -> ReceivedMessage:
    """A message of a broker's answer that its source could not read (a faulty server, a
    middlebox): it fails alone, never the receive, as a message the worker cannot decode
    (its ``on_undecodable``). *body* is an empty one of the source's shape; the source's
    `Source.decode` raises `MessageDecodeError` with *why* (`refuse_malformed`). With its
    *order_key* still readable, it keeps its place in its group."""
    body = {**body, MALFORMED: why}
    return ReceivedMessage(body, message_id, receipt, receive_count, order_key)


def refuse_malformed(message: ReceivedMessage) -> None:
    """Raise `MessageDecodeError` if *message* is one its source could not read (`malformed`)."""
    if (why := message.body.get(MALFORMED)) is not None:
        raise MessageDecodeError(why)


def content_name(content: object, id_field: str) -> str:
    """A name for a malformed message without its *id_field*, after its content, which stays
    from one delivery to the next (its receipt does not)."""
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=repr).encode())
    return f"with no {id_field}, content {digest.hexdigest()[:16]}"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff: the n-th wait is ``min(maximum, initial * multiplier**(n-1))``.

    The worker uses it between failed receive calls (with jitter);
    `SQSSource` uses it for the visibility timeout of a message whose handlers
    failed, keyed by the message's receive count.
    """

    initial: float = 5.0
    """The first wait, in seconds."""
    maximum: float = 900.0
    """The longest wait, in seconds."""
    multiplier: float = 2.0
    """What each wait is multiplied by to give the next one (at least 1)."""

    def __post_init__(self) -> None:
        if not (self.initial >= 0 and self.maximum >= 0 and self.multiplier >= 1):  # NaN too
            raise ConfigurationError(
                f"Backoff needs initial and maximum >= 0 and multiplier >= 1, got {self!r}"
            )
        if self.initial > self.maximum:  # every wait would be the maximum, without a word
            raise ConfigurationError(
                f"Backoff.initial ({self.initial:g}s) is over its maximum ({self.maximum:g}s)"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number *attempt* (1-based)."""
        return exponential(attempt, self.initial, self.maximum, self.multiplier)

    def jittered(self, attempt: int) -> float:
        """`delay`, jittered to between half and all of it."""
        return jittered(self.delay(attempt))


def backoff_of(name: str, value: object, default: Backoff) -> Backoff:
    """*value*, a source's `Backoff` argument (None: *default*); else `ConfigurationError`
    (a number, or the class itself, would fail only at the first nack)."""
    if value is None:
        return default
    if not isinstance(value, Backoff):
        raise ConfigurationError(f"{name} must be a Backoff instance, or None, got {value!r}")
    return value


class Source(ABC):
    """Where a `Worker` receives forwarded events from; subclass it for another broker.

    A source is an async context manager: `start` opens its client, `close`
    settles what is pending and closes it. The worker calls `receive` for at
    most `max_messages` messages at a time, then `ack` for each message whose
    handlers all succeeded and `nack` for the others. While a message's handlers
    run, it calls `extend` every `extend_interval` seconds (if not None), so that
    the broker does not deliver the message again meanwhile. Raise `SourceError`
    (``transient=True`` when a retry may help) for the SDK's errors.

    A source also reads what it received, since it knows the format: for each
    message the worker asks `trace_context` (for the span, before anything else),
    then `message_size` (a message over the worker's ``max_message_bytes`` is not
    decoded), then `decode` for the event. The defaults read the SQS and Pub/Sub
    shapes `fastapi_eventbus.wire.decode_message` takes; override them for
    another format, or set `decoder` (the built-in sources' ``decode=`` argument).
    An exception from `message_size` or `decode` makes that one message
    undecodable (the worker's ``on_undecodable``), nothing more.
    """

    name: str = "source"
    """A name for logs, and the destination in traces."""
    messaging_system: str = "fastapi_eventbus"
    """The OpenTelemetry ``messaging.system`` of the worker's spans (``aws_sqs``...)."""
    destination_attribute: str = "messaging.destination.name"
    """The span attribute holding `name`: the queue's, or a subscription's
    (``messaging.destination.subscription.name``)."""
    max_messages: int = 10
    """The most messages one `receive` call returns."""
    extend_interval: float | None = None
    """Seconds between `extend` calls while a message's handlers run (None: no calls)."""
    ordered: bool | None = False
    """Whether its messages carry an `ReceivedMessage.order_key`, each key's handled in order
    (an SQS FIFO queue; None: not known yet, set by a `receive`). Without a heartbeat, the worker
    then warns (at start, or after the receive that set it) that a message waiting for its turn
    keeps only the visibility it was received with."""
    receive_outlives_cancel: bool = False
    """Whether a cancelled `receive` call may still take messages on the broker (a long
    poll the server holds on after the client went: SQS). The worker's `stop` then lets
    the call under way return, within its ``shutdown_timeout``, and gives back at once
    what it brought, rather than leave that invisible until its visibility timeout."""
    _decoder: wire.Decoder | None = None

    @property
    def decoder(self) -> wire.Decoder | None:
        """A decode hook (`fastapi_eventbus.wire.Decoder`), asked first by `decode`.

        It gets ``message.body`` and returns the `Event` it carries, or None to let
        the source's own decoding read it. Setting anything else than a callable
        or None raises `ConfigurationError`.
        """
        return self._decoder

    @decoder.setter
    def decoder(self, decode: wire.Decoder | None) -> None:
        self._decoder = wire.check_decoder(decode)

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open clients; called once before the first `receive`."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Finish pending acknowledgements and close clients."""

    @abstractmethod
    async def receive(self, max_messages: int) -> Sequence[ReceivedMessage]:
        """Wait for up to *max_messages* messages; an empty result is fine (a poll ended)."""

    @abstractmethod
    async def ack(self, message: ReceivedMessage) -> None:
        """Remove *message* from the queue: its handlers succeeded."""

    @abstractmethod
    async def nack(self, message: ReceivedMessage, delay: float | None = None) -> None:
        """Give *message* back for redelivery, after *delay* seconds (None: the source's policy)."""

    async def extend(  # noqa: B027 - optional hook
        self, message: ReceivedMessage, seconds: float | None = None
    ) -> None:
        """Keep *message* from redelivery for *seconds* more (None: the source's setting).

        The worker calls it every `extend_interval` seconds while the message's
        handlers run. The default does nothing.
        """

    def decode(self, message: ReceivedMessage) -> Event:
        """The event *message* carries, with its trace context; `MessageDecodeError` if none.

        The default is `fastapi_eventbus.wire.decode_message` on ``message.body``,
        with the `decoder`.
        """
        return wire.decode_message(message.body, decode=self.decoder)

    def hooked(self, message: ReceivedMessage) -> Event | None:
        """The event the `decoder` makes of *message*; None without one, or if it gives none.

        For a subclass's `decode`: ask this first, then read the message itself.
        """
        return wire.decode_with(self.decoder, message.body)

    def message_size(self, message: ReceivedMessage) -> int:
        """The bytes of *message* as its broker counts them (body plus attributes), undecoded.

        The default is `fastapi_eventbus.wire.message_size` on ``message.body``.
        """
        return wire.message_size(message.body)

    def trace_context(self, message: ReceivedMessage) -> dict[str, str]:
        """The W3C trace context (``traceparent``/``tracestate``) *message* carries; never raises.

        Read before *message* is decoded, to parent the worker's span; ``{}`` if
        there is none. The default is `fastapi_eventbus.wire.message_trace_context`
        on ``message.body``.
        """
        return wire.message_trace_context(message.body)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


Settle = Callable[[list[T]], Awaitable[Sequence[str | None]]]
"""A batch call: one error text (or None for success) per item, in order."""


class Coalescer(Generic[T]):
    """Turns single calls made in the same event-loop iteration into batch calls.

    ``await coalescer.submit(item)`` returns once the batch call holding *item*
    has succeeded for it, and raises `SourceError` if it failed for it.
    """

    def __init__(self, call: Settle[T], size: int) -> None:
        self._call = call
        self._size = size
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> None:
        """Add *item* to the next batch call and wait for its outcome."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self._size:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        await future

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending:
            chunk, self._pending = self._pending[: self._size], self._pending[self._size :]
            task = asyncio.get_running_loop().create_task(self._run(chunk))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, chunk: list[tuple[T, asyncio.Future[None]]]) -> None:
        try:
            errors = await self._call([item for item, _ in chunk])
        except Exception as exc:
            for _, future in chunk:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), error in zip(chunk, errors, strict=True):
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(SourceError(error))

    async def wait(self) -> None:
        """Wait for the batch calls under way (before closing the client they use)."""
        self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
