"""A real SQS for the tests: moto's server on 127.0.0.1, spoken to with aiobotocore over HTTP.

`running_moto` starts ``moto.server.ThreadedMotoServer`` on a free port (or
calls `missing_peer` if it cannot); `Moto` creates queues and reads them back.
Moto keeps its queues in process-wide state, so a second server started in
the same process (`start_moto`) serves the same queues: the restart tests use
that to stop and start "the broker" without touching the shared one.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi_eventbus.forwarders.sqs import SQSForwarder
from fastapi_eventbus.wire import decode_message
from tests.conftest import missing_peer

if TYPE_CHECKING:
    from aiobotocore.session import ClientCreatorContext
    from moto.server import ThreadedMotoServer
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import MessageTypeDef

    from fastapi_eventbus.worker import SQSSource

REGION = "us-east-1"
KEY_ID = SECRET = "testing"
"""Moto accepts any credentials; these keep botocore from looking for real ones."""


def start_moto(port: int = 0) -> ThreadedMotoServer:
    """Start moto's server on 127.0.0.1:*port* (0: any free port)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def stop_moto(server: ThreadedMotoServer) -> None:
    """Stop *server* and release its port, so that connecting to it is refused.

    ``ThreadedMotoServer.stop`` stops accepting but leaves the listening socket
    open (connections would hang, not fail): close it too.
    """
    server.stop()
    if server._server is not None:
        server._server.server_close()


@dataclass
class Moto:
    """A running moto server and helpers to create and read its queues."""

    server: ThreadedMotoServer

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self.server.get_host_and_port()[1]

    @property
    def endpoint(self) -> str:
        """The ``endpoint_url`` for clients."""
        return f"http://127.0.0.1:{self.port}"

    def forwarder(self, queue_url: str, **options: Any) -> SQSForwarder:
        """An `SQSForwarder` for *queue_url* on this server."""
        return SQSForwarder(
            queue_url,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            **options,
        )

    def source(self, queue_url: str, **options: Any) -> SQSSource:
        """A worker's `SQSSource` for *queue_url* on this server, polling for 1 s at a time."""
        from fastapi_eventbus.worker import SQSSource

        options.setdefault("wait_time_seconds", 1)
        return SQSSource(
            queue_url,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            **options,
        )

    def client(self) -> ClientCreatorContext[SQSClient]:
        """An aiobotocore SQS client for this server, to use with ``async with``."""
        from aiobotocore.session import AioSession

        return AioSession().create_client(
            "sqs",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
        )

    def queue(
        self,
        prefix: str = "events",
        *,
        fifo: bool = False,
        attributes: dict[str, str] | None = None,
    ) -> str:
        """Create a queue with a unique name (and these attributes); return its URL."""
        return asyncio.run(self.create_queue(prefix, fifo=fifo, attributes=attributes))

    async def create_queue(
        self,
        prefix: str = "events",
        *,
        fifo: bool = False,
        attributes: dict[str, str] | None = None,
    ) -> str:
        """Create a queue with a unique name (and these attributes); return its URL."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}" + (".fifo" if fifo else "")
        settings: dict[str, str] = {"FifoQueue": "true"} if fifo else {}
        settings.update(attributes or {})
        async with self.client() as sqs:
            response = await sqs.create_queue(QueueName=name, Attributes=settings)  # type: ignore[arg-type]
        return response["QueueUrl"]

    async def collect_ids(
        self, queue_url: str, done: Callable[[Counter[str]], bool], timeout: float
    ) -> Counter[str]:
        """Receive (and delete) messages until *done* says so, or *timeout*: ids, with counts.

        A last round after that catches late duplicates.
        """
        received: Counter[str] = Counter()
        deadline = time.monotonic() + timeout
        async with self.client() as sqs:
            while not done(received) and time.monotonic() < deadline:
                messages = await _receive(sqs, queue_url)
                received.update(decode_message(message).id for message in messages)
                if not messages:
                    await asyncio.sleep(0.1)
            received.update(decode_message(m).id for m in await _receive(sqs, queue_url))
        return received

    def receive(self, queue_url: str, count: int, timeout: float = 10.0) -> list[MessageTypeDef]:
        """Receive and delete *count* messages, then check that no more are waiting."""
        return asyncio.run(self.receive_async(queue_url, count, timeout))

    async def receive_async(
        self, queue_url: str, count: int, timeout: float = 10.0
    ) -> list[MessageTypeDef]:
        """Receive and delete *count* messages, then check that no more are waiting."""
        messages: list[MessageTypeDef] = []
        deadline = time.monotonic() + timeout
        async with self.client() as sqs:
            while True:
                batch = await _receive(sqs, queue_url)
                messages.extend(batch)
                if len(messages) >= count or time.monotonic() > deadline:
                    break
                if not batch:
                    await asyncio.sleep(0.05)
            extra = await _receive(sqs, queue_url)
        assert len(messages) == count, f"received {len(messages)} of {count} messages"
        assert not extra, f"{len(extra)} unexpected extra message(s)"
        return messages


async def _receive(client: SQSClient, queue_url: str) -> list[MessageTypeDef]:
    response = await client.receive_message(
        QueueUrl=queue_url,
        MaxNumberOfMessages=10,
        MessageAttributeNames=["All"],
        MessageSystemAttributeNames=["All"],
        WaitTimeSeconds=0,
    )
    messages = response.get("Messages", [])
    if messages:
        await client.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": message["ReceiptHandle"]}
                for i, message in enumerate(messages)
            ],
        )
    return messages


@contextmanager
def running_moto() -> Iterator[Moto]:
    """Run moto's server for the duration of the block (skip, or fail in CI, if impossible)."""
    try:
        server = start_moto()
    except Exception as exc:  # moto missing or broken: no peer to test against
        missing_peer(f"cannot start moto's SQS server: {exc!r}")
        raise
    try:
        yield Moto(server)
    finally:
        stop_moto(server)
