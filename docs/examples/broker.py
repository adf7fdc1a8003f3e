"""A broker of your own: a directory as a queue, one file per message, in both directions."""

import asyncio
import json
import os
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from uuid import uuid4

from fastapi_eventbus import Event, ForwarderError, MessageDecodeError, SourceError
from fastapi_eventbus.forwarders import Forwarder
from fastapi_eventbus.wire import from_cloudevent, to_cloudevent, trace_attributes
from fastapi_eventbus.worker import ReceivedMessage, Source


# --8<-- [start:forwarder]
def encode(event: Event) -> bytes:
    """One message: the CloudEvent, and its trace context beside it (never inside it)."""
    return json.dumps({"event": to_cloudevent(event), "trace": trace_attributes(event)}).encode()


class DirectoryForwarder(Forwarder):
    """Sends each event as a file into *directory*, where a `DirectorySource` takes it."""

    loop_bound = False  # no client tied to an event loop

    def __init__(self, directory: Path) -> None:
        super().__init__(name=f"dir:{directory.name}")
        self.directory = directory

    def encoded_size(self, event: Event) -> int:  # what max_message_bytes is checked against
        return len(encode(event))

    async def send(self, events: Sequence[Event]) -> None:
        try:
            await asyncio.to_thread(self._write, events)  # never block the event loop
        except FileNotFoundError as exc:  # no such queue: a retry will not help
            raise ForwarderError(f"no queue directory {self.directory}") from exc
        except OSError as exc:  # a full disk, say: a retry may help
            raise ForwarderError(f"writing to {self.directory}: {exc}", transient=True) from exc

    def _write(self, events: Sequence[Event]) -> None:
        for event in events:
            name = f"{time.time_ns()}-{event.id}.json"  # sorted by name: first in, first out
            temporary = self.directory / f".{name}"
            temporary.write_bytes(encode(event))
            temporary.replace(self.directory / name)  # atomic: never read half-written
            # --8<-- [end:forwarder]


# --8<-- [start:source]
class DirectorySource(Source):
    """Takes messages from *directory* by moving each one into ``claimed/`` until settled.

    A claimed file's modification time is when it was claimed (or last extended): a file
    claimed longer than *visibility_timeout* ago, its worker gone, goes back to the queue.
    Each delivery gets its own receipt (the claimed file's name), so that the late worker
    of a message delivered again cannot settle the new delivery.
    """

    messaging_system = "directory"

    def __init__(self, directory: Path, *, visibility_timeout: float = 30.0) -> None:
        self.directory, self.claimed = directory, directory / "claimed"
        self.name = directory.name
        self.visibility_timeout = visibility_timeout
        self.extend_interval = visibility_timeout / 3  # the worker's heartbeat
        self.retry_delay = 5.0  # nack(message) without a delay: back after this long

    async def start(self) -> None:
        if not self.directory.is_dir():  # not transient: the worker stops and says why
            raise SourceError(f"no queue directory {self.directory}")
        self.claimed.mkdir(exist_ok=True)

    async def receive(self, max_messages: int) -> list[ReceivedMessage]:
        deadline = time.monotonic() + 1.0  # a poll ends within a second
        while True:
            try:
                messages = await asyncio.to_thread(self._claim, max_messages)
            except OSError as exc:
                raise SourceError(f"reading {self.directory}: {exc}", transient=True) from exc
            if messages or time.monotonic() > deadline:
                return messages
            await asyncio.sleep(0.05)

    def _claim(self, max_messages: int) -> list[ReceivedMessage]:
        now, messages = time.time(), list[ReceivedMessage]()
        for path in self.claimed.iterdir():  # their worker is gone: deliver them again
            with suppress(FileNotFoundError):  # unless settled meanwhile
                if path.stat().st_mtime < now - self.visibility_timeout:
                    path.replace(self.directory / f"{path.stem}.json")
        for path in sorted(self.directory.glob("*.json")):
            if len(messages) == max_messages:
                break
            receipt = self.claimed / f"{path.stem}.{uuid4().hex}"  # one per delivery
            try:
                if path.stat().st_mtime > now:  # given back with a delay: not yet
                    continue
                os.utime(path)  # its visibility timeout starts now
                path.rename(receipt)  # atomic: of two workers claiming it, one wins
            except FileNotFoundError:  # the other one
                continue
            messages.append(
                ReceivedMessage({"data": receipt.read_bytes()}, path.stem, str(receipt))
            )
        return messages

    async def ack(self, message: ReceivedMessage) -> None:
        await self._settle(message, os.remove)

    async def nack(self, message: ReceivedMessage, delay: float | None = None) -> None:
        def give_back(receipt: str) -> None:
            visible = time.time() + (self.retry_delay if delay is None else delay)
            os.utime(receipt, (visible, visible))  # receive skips it until then
            os.replace(receipt, self.directory / f"{Path(receipt).stem}.json")

        await self._settle(message, give_back)

    async def extend(self, message: ReceivedMessage, seconds: float | None = None) -> None:
        more = self.visibility_timeout if seconds is None else seconds
        claimed = time.time() + more - self.visibility_timeout
        await self._settle(message, lambda receipt: os.utime(receipt, (claimed, claimed)))

    async def _settle(self, message: ReceivedMessage, action: Callable[[str], None]) -> None:
        try:
            await asyncio.to_thread(action, message.receipt)
        except OSError as exc:  # gone: its visibility timeout ended, another worker has it
            raise SourceError(f"message {message.message_id}: {exc}") from exc

    # Reading what was received: this broker's format, not SQS's or Pub/Sub's.
    def message_size(self, message: ReceivedMessage) -> int:
        return len(message.body["data"])

    def trace_context(self, message: ReceivedMessage) -> dict[str, str]:
        try:
            return dict(json.loads(message.body["data"])["trace"])
        except Exception:  # never raises: the message is refused when decoded
            return {}

    def decode(self, message: ReceivedMessage) -> Event:
        try:
            data = json.loads(message.body["data"])
            cloudevent, trace = data["event"], data["trace"]
        except (ValueError, KeyError, TypeError) as exc:
            raise MessageDecodeError(f"not a message of this broker: {exc}") from exc
        return from_cloudevent(cloudevent, trace)
        # --8<-- [end:source]
