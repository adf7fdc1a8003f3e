"""Worker throughput: messages per second consumed from moto's SQS through one handler.

Run ``python -m benchmarks.bench_worker`` (about 20 s) or add ``--quick``.

For each round, the queue is pre-filled (off the clock) with forwarded
``order.placed`` events, then a `Worker` drains it: the clock runs from the
worker's start until every message has been handled and deleted (the queue is
then checked to be empty). The handler does nothing but take one ``Depends``.
Variants, run round-robin:

- the worker at concurrency 1 and 10, on SQS;
- a reference that receives 10 messages at a time and deletes them with
  ``DeleteMessageBatch`` by hand, with no decoding and no handler: what moto
  itself allows;
- the worker at concurrency 1 and 10 on an in-memory source (pre-encoded SQS
  messages, no broker): the worker's own cost per message.

moto runs in its own process (``python -m moto.server``), so that the broker
does not share the worker's interpreter. moto's ``ReceiveMessage`` walks the
whole queue (about 0.4 ms per message in it), so the SQS rounds are small and
their rate is moto's; against SQS itself a receive is a network round trip
whose cost does not grow with the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus._events import make_event
from fastapi_eventbus.testing import MemorySource
from fastapi_eventbus.wire import sqs_body
from fastapi_eventbus.worker import Source, SQSSource, Worker

if TYPE_CHECKING:
    from aiobotocore.session import ClientCreatorContext
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.literals import QueueAttributeFilterType
    from types_aiobotocore_sqs.type_defs import (
        DeleteMessageBatchRequestEntryTypeDef,
        SendMessageBatchRequestEntryTypeDef,
    )

REGION = "us-east-1"
KEY = "bench"  # moto accepts any credentials


# -- the broker -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """Start moto's server in another process; wait until it answers; its endpoint."""
    port = free_port()
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


def client(endpoint: str) -> ClientCreatorContext[SQSClient]:
    from aiobotocore.session import AioSession

    return AioSession().create_client(
        "sqs",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=KEY,
        aws_secret_access_key=KEY,
    )


async def fill(sqs: SQSClient, queue_url: str, count: int) -> None:
    """Put *count* forwarded ``order.placed`` events in the queue."""
    for start in range(0, count, 10):
        entries: list[SendMessageBatchRequestEntryTypeDef] = [
            {"Id": str(n), "MessageBody": sqs_body(make_event("order.placed", {"n": n}, None))}
            for n in range(start, min(start + 10, count))
        ]
        await sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)


async def left_in(sqs: SQSClient, queue_url: str) -> int:
    names: list[QueueAttributeFilterType] = [
        "ApproximateNumberOfMessages",
        "ApproximateNumberOfMessagesNotVisible",
    ]
    response = await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)
    return sum(int(value) for value in response["Attributes"].values())


# -- what is timed --------------------------------------------------------------------


async def settings() -> dict[str, str]:
    """The handler's one dependency."""
    return {"currency": "EUR"}


def make_bus(handled: list[int]) -> EventBus:
    bus = EventBus()

    @bus.on("order.*")
    async def noop(event: Event, config: Annotated[dict[str, str], Depends(settings)]) -> None:
        handled[0] += 1

    return bus


def sqs_source(endpoint: str, queue_url: str) -> SQSSource:
    return SQSSource(
        queue_url,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=KEY,
        aws_secret_access_key=KEY,
        wait_time_seconds=1,
    )


async def drain(source: Source, count: int, concurrency: int) -> None:
    """Run a worker on *source* until it has handled *count* messages."""
    handled = [0]
    async with Worker(make_bus(handled), source, concurrency=concurrency) as worker:
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


async def sqs_round(endpoint: str, count: int, concurrency: int | None) -> float:
    """Seconds to drain *count* pre-filled messages (*concurrency* None: by hand)."""
    async with client(endpoint) as sqs:
        queue_url = (await sqs.create_queue(QueueName=f"bench-{uuid.uuid4().hex[:8]}"))["QueueUrl"]
        await fill(sqs, queue_url, count)
        start = time.perf_counter()
        if concurrency is None:
            await by_hand(sqs, queue_url, count)
        else:
            await drain(sqs_source(endpoint, queue_url), count, concurrency)
        elapsed = time.perf_counter() - start
        if (left := await left_in(sqs, queue_url)) != 0:
            raise RuntimeError(f"{left} message(s) left in the queue")
        await sqs.delete_queue(QueueUrl=queue_url)
    return elapsed


async def memory_round(count: int, concurrency: int) -> float:
    """Seconds to drain *count* events put in a `MemorySource`: the worker's own cost."""
    events = (make_event("order.placed", {"n": n}, None) for n in range(count))
    source = MemorySource(*events)
    start = time.perf_counter()
    await drain(source, count, concurrency)
    elapsed = time.perf_counter() - start
    if len(source.acked) != count or source.nacked:
        raise RuntimeError(
            f"acknowledged {len(source.acked)} of {count}, gave back {source.nacked}"
        )
    return elapsed


Timed = Callable[[str, int], Awaitable[float]]
"""Seconds one round takes, given moto's endpoint and the number of messages."""


@dataclass(frozen=True)
class Variant:
    name: str
    messages: int
    timed: Timed


def on_sqs(concurrency: int | None) -> Timed:
    return lambda endpoint, count: sqs_round(endpoint, count, concurrency)


def in_memory(concurrency: int) -> Timed:
    return lambda endpoint, count: memory_round(count, concurrency)


def variants(quick: bool) -> list[Variant]:
    sqs, memory = (100, 2_000) if quick else (200, 5_000)
    return [
        Variant("SQS (moto): worker, concurrency 1", sqs, on_sqs(1)),
        Variant("SQS (moto): worker, concurrency 10", sqs, on_sqs(10)),
        Variant("SQS (moto): by hand, receive + delete 10, no handler", sqs, on_sqs(None)),
        Variant("in-memory source: worker, concurrency 1", memory, in_memory(1)),
        Variant("in-memory source: worker, concurrency 10", memory, in_memory(10)),
    ]


async def run(endpoint: str, rounds: int, chosen: list[Variant]) -> dict[str, list[float]]:
    """Messages per second of every variant, round-robin, rotating the order each round."""
    results: dict[str, list[float]] = {variant.name: [] for variant in chosen}
    for number in range(rounds):
        shift = number % len(chosen)
        for variant in chosen[shift:] + chosen[:shift]:
            elapsed = await variant.timed(endpoint, variant.messages)
            results[variant.name].append(variant.messages / elapsed)
    return results


def report(results: dict[str, list[float]], chosen: list[Variant], rounds: int) -> None:
    print(f"\nWorker throughput: a no-op handler with one Depends; {rounds} rounds; msg/s")
    print(f"\n{'variant':<58}{'messages':>9}{'best':>10}{'median':>10}")
    print("-" * 87)
    for variant in chosen:
        rates = results[variant.name]
        line = f"{variant.name:<58}{variant.messages:>9,}"
        print(f"{line}{max(rates):>10,.0f}{statistics.median(rates):>10,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer, smaller rounds")
    parser.add_argument(
        "--check", action="store_true", help="accepted for `python -m benchmarks`: no targets here"
    )
    args = parser.parse_args()
    rounds = 2 if args.quick else 3
    chosen = variants(args.quick)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    process, endpoint = start_moto()
    try:
        results = asyncio.run(run(endpoint, rounds, chosen))
    finally:
        process.terminate()
        process.wait()
    report(results, chosen, rounds)


if __name__ == "__main__":
    main()
