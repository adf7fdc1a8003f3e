"""Private: what the forwarders of AWS's batch calls share (SQS, SNS, EventBridge).

``SendMessageBatch``, ``PublishBatch`` and ``PutEvents`` each take up to 10
entries and a bounded number of bytes, and each answers with the entries that
failed. Here: splitting a send into such calls (`chunks`), running them in order
(FIFO) or concurrently, and turning each call's failed entries into a `Delivery`,
merged into one for the send; and the ``MessageGroupId`` of SQS and SNS FIFO
(`group_of`). The entry's type is the service's; what a call does is the
forwarder's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from fastapi_eventbus._events import Event
from fastapi_eventbus.exceptions import ConfigurationError, ForwarderError, InvalidEventError
from fastapi_eventbus.wire import utf8_size

from ._base import Delivery

E = TypeVar("E")
"""The type of one entry of a batch call (the service's request entry)."""

Chunk: TypeAlias = list[tuple[E, Event]]
"""The entries of one batch call, each with its event."""

CONCURRENT_CALLS = 10
"""Batch calls in flight at once for one send, when the order does not matter."""

GROUP_ID = re.compile(r"[!-~]{1,128}")
"""A ``MessageGroupId`` SQS and SNS take: 1 to 128 characters, each a letter or digit
(a-z, A-Z, 0-9) or ASCII punctuation, which is printable ASCII but the space."""


@dataclass(frozen=True, slots=True)
class Failure:
    """One entry a batch call failed, as the service said."""

    entry_id: str
    """The entry's ``Id`` in the call (for ``PutEvents``, its position)."""
    code: str
    """The service's error code."""
    message: str
    """The service's error message ("" if none)."""
    sender_fault: bool
    """Whether the entry itself is at fault: no retry can deliver it."""


def chunks(
    items: Iterable[tuple[int, E, Event]], max_entries: int, max_bytes: int
) -> Iterator[Chunk[E]]:
    """Split sized entries into calls of at most *max_entries* entries and *max_bytes* bytes.

    An entry larger than *max_bytes* gets a call of its own: the service refuses
    it, and says so in its answer, which dead-letters it.
    """
    chunk: Chunk[E] = []
    total = 0
    for size, entry, event in items:
        if chunk and (len(chunk) == max_entries or total + size > max_bytes):
            yield chunk
            chunk, total = [], 0
        chunk.append((entry, event))
        total += size
    if chunk:
        yield chunk


def delivery_of(
    events: dict[str, Event], successful: Iterable[str], failed: Iterable[Failure]
) -> Delivery | None:
    """The `Delivery` of one call: its events by entry id, the ids it accepted, its failures.

    Failed entries are rejected (dead-lettered) when the sender is at fault and
    retried otherwise; an entry the answer does not mention is retried too.
    """
    done = set(successful)
    retry: list[Event] = []
    rejected: list[Event] = []
    reasons: list[str] = []
    for failure in failed:
        event = events.get(failure.entry_id)
        if event is None or failure.entry_id in done:
            continue
        done.add(failure.entry_id)
        (rejected if failure.sender_fault else retry).append(event)
        reasons.append(f"{event.id}: {failure.code} {failure.message}".rstrip())
    missing = [event for entry_id, event in events.items() if entry_id not in done]
    if missing:
        retry.extend(missing)
        reasons.append(f"{len(missing)} entries missing from the response")
    if not retry and not rejected:
        return None
    return Delivery(retry=retry, rejected=rejected, reason="; ".join(reasons))


def failed_entries(response: Mapping[str, Any], chunk: Chunk[Any]) -> Delivery | None:
    """The `Delivery` of a ``SendMessageBatch`` or ``PublishBatch`` answer, which list their
    ``Successful`` and ``Failed`` entries alike (``Id``, ``Code``, ``Message``, ``SenderFault``)."""
    return delivery_of(
        {entry["Id"]: event for entry, event in chunk},
        (success["Id"] for success in response.get("Successful", [])),
        (
            Failure(f["Id"], f["Code"], f.get("Message", ""), f["SenderFault"])
            for f in response.get("Failed", [])
        ),
    )


def message_size(body: str, attributes: Mapping[str, str]) -> int:
    """Bytes SQS and SNS count for a message with String *attributes*: the body, and
    each attribute's name, data type (``String``) and value."""
    size = utf8_size(body)
    for name, value in attributes.items():
        size += utf8_size(name) + len("String") + utf8_size(value)
    return size


SendChunk: TypeAlias = Callable[[Chunk[E]], Awaitable[Delivery | None]]
"""A forwarder's batch call for one chunk: its `Delivery`, or `ForwarderError` if it failed."""


async def send_in_order(send: SendChunk[E], calls: list[Chunk[E]]) -> Delivery | None:
    """One call after the other (FIFO); once a call fails, hold back the later ones.

    The held-back events are retried with the failed ones, so that they do not
    overtake them in their message groups. Raises if the first call fails whole.
    """
    results: list[Delivery | None] = []
    for number, chunk in enumerate(calls):
        try:
            result = await send(chunk)
        except ForwarderError as exc:
            if number == 0:
                raise
            result = Delivery(retry=[event for _, event in chunk], reason=str(exc))
        results.append(result)
        if result is not None and result.retry:
            held = [event for later in calls[number + 1 :] for _, event in later]
            if held:
                results.append(Delivery(retry=held, reason="held back to keep FIFO order"))
            break
    return merge(results)


async def send_concurrently(send: SendChunk[E], calls: list[Chunk[E]]) -> Delivery | None:
    """Up to `CONCURRENT_CALLS` calls at once; raise only if every call failed."""
    slots = asyncio.Semaphore(CONCURRENT_CALLS)

    async def one(chunk: Chunk[E]) -> Delivery | ForwarderError | None:
        async with slots:
            try:
                return await send(chunk)
            except ForwarderError as exc:
                return exc

    results = await asyncio.gather(*(one(chunk) for chunk in calls))
    errors = [result for result in results if isinstance(result, ForwarderError)]
    if errors and len(errors) == len(results):
        raise errors[0]
    return merge(
        [
            Delivery(retry=[event for _, event in chunk], reason=str(result))
            if isinstance(result, ForwarderError)
            else result
            for result, chunk in zip(results, calls, strict=True)
        ]
    )


def merge(results: Sequence[Delivery | None]) -> Delivery | None:
    """One `Delivery` for the results of several batch calls."""
    failed = [result for result in results if result is not None]
    if not failed:
        return None
    return Delivery(
        retry=[event for result in failed for event in result.retry],
        rejected=[event for result in failed for event in result.rejected],
        reason="; ".join(result.reason for result in failed if result.reason),
    )


def check_group_id(
    destination: str, kind: str, fifo: bool, message_group_id: object
) -> Callable[[Event], str] | None:
    """*message_group_id* (``None`` or a callable), required for a FIFO *kind* (``queue``,
    ``topic``); else `ConfigurationError`, naming *destination*."""
    if message_group_id is not None and not callable(message_group_id):
        raise ConfigurationError(f"message_group_id must be callable, got {message_group_id!r}")
    if fifo and message_group_id is None:
        raise ConfigurationError(
            f"{destination} is a FIFO {kind}: pass message_group_id=, a function giving "
            "each event its group (e.g. lambda event: event.payload['customer_id'])"
        )
    return message_group_id


def group_of(forwarder: str, message_group_id: Callable[[Event], str], event: Event) -> str:
    """The ``MessageGroupId`` *message_group_id* gives *event*; `InvalidEventError` if none.

    Called at emit time too (the forwarder's ``check``), so that a bad group id
    fails in the caller: a str of 1 to 128 letters, digits and ASCII punctuation
    (`GROUP_ID`), as SQS and SNS take; they refuse a space, or an accented letter.
    """
    try:
        group = message_group_id(event)
    except Exception as exc:
        raise InvalidEventError(
            f"message_group_id of forwarder {forwarder} failed for event {event.name!r}: {exc!r}"
        ) from exc
    if not isinstance(group, str) or GROUP_ID.fullmatch(group) is None:
        raise InvalidEventError(
            f"message_group_id of forwarder {forwarder} must return a str of 1 to 128 "
            f"characters, each a letter or digit (a-z, A-Z, 0-9) or ASCII punctuation (as "
            f"SQS and SNS take), got {group!r} for event {event.name!r}: map other values "
            "to such a string (a slug, or a hash such as hashlib.sha256(...).hexdigest())"
        )
    return group
