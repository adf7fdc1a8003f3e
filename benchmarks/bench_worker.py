"""Worker throughput: messages per second consumed through a handler with one ``Depends``.

Run ``python -m benchmarks.bench_worker`` (about 30 s) or add ``--quick``.

Each round pre-fills a queue (off the clock) with forwarded ``order.placed`` events;
a `Worker` then drains it, timed (`benchmarks._harness`) on the wall clock, as the broker
is another process (the in-memory rows: CPU time), until every message is handled and
deleted; the queue is then checked to be empty. Rows: the worker at concurrency 1 and
10 on SQS (moto's server, in its own process); a reference receiving 10 messages and
deleting them with ``DeleteMessageBatch`` by hand (no decoding, no handler: what moto
allows); the worker at concurrency 1 and 10 on an in-memory source (no broker: the
worker's own cost). moto's ``ReceiveMessage`` walks the whole queue (about 0.4 ms per
message in it), so the SQS rounds are small and their rate is moto's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends

from benchmarks import _harness as h
from benchmarks._harness import Variant
from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.testing import MemorySource
from fastapi_eventbus.wire import sqs_body
from fastapi_eventbus.worker import Source, SQSSource, Worker

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.literals import QueueAttributeFilterType
    from types_aiobotocore_sqs.type_defs import (
        DeleteMessageBatchRequestEntryTypeDef,
        SendMessageBatchRequestEntryTypeDef,
    )

KEYS = h.MOTO_KEYS


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """moto's server in another process, once it answers; its endpoint."""
    port = h.free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto's server did not start")


def event(n: int) -> Event:
    return Event(name="order.placed", payload={"n": n})


async def settings() -> dict[str, str]:
    """The handler's one dependency."""
    return {"currency": "EUR"}


async def drain(source: Source, count: int, concurrency: int) -> None:
    """Run a worker on *source* until it has handled *count* messages."""
    handled = [0]
    bus = EventBus()

    @bus.on("order.*")
    async def noop(event: Event, config: Annotated[dict[str, str], Depends(settings)]) -> None:
        handled[0] += 1

    async with Worker(bus, source, concurrency=concurrency) as worker:
        while worker.stats.handled < count:  # noqa: ASYNC110 - polling is the measurement
            await asyncio.sleep(0.001)
    if handled[0] != count or worker.stats.failed:
        raise RuntimeError(f"handled {handled[0]} of {count}: {worker.stats}")


async def by_hand(sqs: SQSClient, queue_url: str, count: int) -> None:
    """The reference: receive 10, delete 10, no decoding, no handler."""
    done = 0
    while done < count:
        response = await sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        messages = response.get("Messages", [])
        if messages:
            entries: list[DeleteMessageBatchRequestEntryTypeDef] = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
            ]
            await sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
        done += len(messages)


def on_sqs(endpoint: str, concurrency: int | None) -> h.Batch:
    """Drain *count* pre-filled messages by a worker (*concurrency* None: by hand)."""
    from aiobotocore.session import AioSession

    async def batch(count: int) -> tuple[int, float]:
        async with AioSession().create_client("sqs", endpoint_url=endpoint, **KEYS) as sqs:
            name = f"bench-{uuid.uuid4().hex[:8]}"
            queue_url = (await sqs.create_queue(QueueName=name))["QueueUrl"]
            for first in range(0, count, 10):
                entries: list[SendMessageBatchRequestEntryTypeDef] = [
                    {"Id": str(n), "MessageBody": sqs_body(event(n))}
                    for n in range(first, min(first + 10, count))
                ]
                await sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
            start = time.perf_counter()
            if concurrency is None:
                await by_hand(sqs, queue_url, count)
            else:
                source = SQSSource(queue_url, endpoint_url=endpoint, wait_time_seconds=1, **KEYS)
                await drain(source, count, concurrency)
            elapsed = time.perf_counter() - start
            names: list[QueueAttributeFilterType] = [
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
            ]
            left = await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)
            if any(int(value) for value in left["Attributes"].values()):
                raise RuntimeError(f"messages left in the queue: {left['Attributes']}")
            await sqs.delete_queue(QueueUrl=queue_url)
        return count, elapsed

    return batch


def in_memory(concurrency: int) -> h.Batch:
    """Drain *count* events put in a `MemorySource`: the worker's own cost."""

    async def batch(count: int) -> tuple[int, float]:
        source = MemorySource(*(event(n) for n in range(count)))
        start = time.process_time()  # no broker: CPU time
        await drain(source, count, concurrency)
        elapsed = time.process_time() - start
        if len(source.acked) != count or source.nacked:
            raise RuntimeError(f"acknowledged {len(source.acked)} of {count}, {source.nacked}")
        return count, elapsed

    return batch


async def amain(args: argparse.Namespace) -> bool:
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    on_broker, in_process = (100, 2_000) if args.quick else (200, 5_000)
    process, endpoint = start_moto()

    def row(key: str, label: str, batch: h.Batch, size: int, base: str = "") -> Variant:
        section = (
            "Worker, in-memory source (no broker)" if key[0] == "m" else "Worker on SQS (moto)"
        )
        return Variant(key, label, None, "msg", 1, {}, base or (), section, batch, size)

    variants = [
        row("sqs_1", "worker, concurrency 1", on_sqs(endpoint, 1), on_broker, "by_hand"),
        row("sqs_10", "worker, concurrency 10", on_sqs(endpoint, 10), on_broker, "by_hand"),
        row(
            "by_hand", "by hand: receive + delete 10, no handler", on_sqs(endpoint, None), on_broker
        ),
        row("memory_1", "worker, concurrency 1", in_memory(1), in_process),
        row("memory_10", "worker, concurrency 10", in_memory(10), in_process, "memory_1"),
    ]
    try:
        if await h.run_variants(args, variants, rounds=(2, 3), clock=time.perf_counter) is None:
            return True
    finally:
        process.terminate()
        process.wait()
    h.header("bench_worker", args.rounds, wall=True, extra=f"; {on_broker} / {in_process} msgs")
    h.tables(variants[:3], wall=True)
    h.tables(variants[3:])
    return True


def main(argv: list[str] | None = None) -> int:
    return h.main(amain, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
