"""SQS forwarding against moto's SQS server on 127.0.0.1 (in this process, a thread).

Run ``python -m benchmarks.bench_sqs`` (about a minute) or add ``--quick`` (20 s).

1. **Throughput** (`benchmarks._harness`, wall clock: the broker is on the other side):
   requests of 10 events, driven in-process, whose events leave through `SQSForwarder`
   (one ``SendMessageBatch`` on the bus's flush), or through a background task sending
   one ``SendMessage`` per event with the forwarder's own aiobotocore client (one call
   at a time, or 10 at a time), or one ``SendMessageBatch`` by hand (the reference).
   Each piece of 10 events is checked to be in the queue, which is then purged off the
   clock: moto recounts the whole queue for every message it stores, which SQS does not.
2. **Response latency** of an endpoint emitting one forwarded event: no forwarder,
   broker up, broker down (a port nothing listens on, short retries). A request ends
   when its last body message is sent. "One at a time" lets each flush finish (off the
   clock) before the next request; "back to back" does not, so retries run during later
   requests. Every event is accounted for: in the queue, or dead-lettered.

moto spends about 0.35 ms of Python on each stored message against about 2.5 ms per
call, which caps what batching gains here near 5-6x (the by-hand row shows the
ceiling); against SQS the gain should approach the 10 messages per call.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI
from starlette.types import Message

from benchmarks import _harness as h
from benchmarks._harness import Variant
from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.forwarders import DeadLetter, Retry
from fastapi_eventbus.forwarders.sqs import SQSForwarder
from fastapi_eventbus.wire import sqs_body

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import SendMessageBatchRequestEntryTypeDef

KEYS = h.MOTO_KEYS
PIECE = 10
"""Events per request, and per timed piece (the queue is checked and purged between)."""
Bus = Annotated[EventBus, Depends(get_bus)]


def payload(n: int) -> dict[str, Any]:
    """A small order, about 250 bytes as a CloudEvent."""
    return {"order_id": n, "item": "book", "customer": "ada", "total": "12.50"}


async def queue_length(client: SQSClient, queue_url: str) -> int:
    response = await client.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"]
    )
    return int(response["Attributes"]["ApproximateNumberOfMessages"])


async def request(app: FastAPI) -> tuple[float, asyncio.Task[None]]:
    """One POST to *app*: seconds until its response was complete, and the still-running call."""
    done = asyncio.get_running_loop().create_future()

    async def receive() -> Message:
        return h.REQUEST_MESSAGE

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise AssertionError(f"status {message['status']}")
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set_result(time.perf_counter())

    started = time.perf_counter()
    task = asyncio.create_task(app(dict(h.BASE_SCOPE), receive, send))
    return await done - started, task


def emitting_app(events: int) -> tuple[FastAPI, EventBus]:
    """An app whose one endpoint emits *events* ``order.placed`` events."""
    app, bus = FastAPI(), EventBus()
    bus.install(app)
    counter = iter(range(10**9))

    @app.post("/")
    async def endpoint(bus: Bus) -> dict[str, bool]:
        for _ in range(events):
            bus.emit("order.placed", payload(next(counter)))
        return {"ok": True}

    return app, bus


def sending_app(send: Callable[[list[str]], Awaitable[None]]) -> FastAPI:
    """The baselines: an endpoint that sends its `PIECE` events itself, in a background task."""
    app = FastAPI()
    counter = iter(range(10**9))

    async def send_events(numbers: list[int]) -> None:
        await send([sqs_body(Event(name="order.placed", payload=payload(n))) for n in numbers])

    @app.post("/")
    async def endpoint(background_tasks: BackgroundTasks) -> dict[str, bool]:
        background_tasks.add_task(send_events, [next(counter) for _ in range(PIECE)])
        return {"ok": True}

    return app


# -- 1. throughput ---------------------------------------------------------------------------


async def throughput(args: argparse.Namespace, endpoint: str, client: SQSClient) -> list[Variant]:
    keys = ("forwarder", "one_by_one", "concurrent", "by_hand")
    queues = {k: (await client.create_queue(QueueName=f"bench-{k}"))["QueueUrl"] for k in keys}
    forwarded, bus = emitting_app(PIECE)
    sqs_forwarder = SQSForwarder(queues["forwarder"], endpoint_url=endpoint, **KEYS)
    forwarder = bus.forward("order.*", sqs_forwarder)
    await forwarder.ensure_started()
    sqs = forwarder.client  # the baselines use the forwarder's own client

    async def one_by_one(bodies: list[str]) -> None:
        for body in bodies:
            await sqs.send_message(QueueUrl=queues["one_by_one"], MessageBody=body)

    async def concurrently(bodies: list[str]) -> None:
        url = queues["concurrent"]
        await asyncio.gather(*(sqs.send_message(QueueUrl=url, MessageBody=b) for b in bodies))

    async def by_hand(bodies: list[str]) -> None:
        entries: list[SendMessageBatchRequestEntryTypeDef] = [
            {"Id": str(n), "MessageBody": body} for n, body in enumerate(bodies)
        ]
        await sqs.send_message_batch(QueueUrl=queues["by_hand"], Entries=entries)

    def pieces(app: FastAPI, queue_url: str) -> h.Batch:
        async def batch(events: int) -> tuple[int, float]:
            """Send *events* events, a request of `PIECE` at a time, each piece checked."""
            total = 0.0
            for _ in range(events // PIECE):
                started = time.perf_counter()
                await (await request(app))[1]  # the call ends when its events are sent
                total += time.perf_counter() - started
                if (got := await queue_length(client, queue_url)) != PIECE:
                    raise AssertionError(f"{got} messages in the queue, not {PIECE}")
                await client.purge_queue(QueueUrl=queue_url)
            return events, total

        return batch

    def row(key: str, label: str, app: FastAPI, base: str | tuple[str, ...] = ()) -> Variant:
        section = f"SQS throughput into moto, requests of {PIECE} events"
        batch = pieces(app, queues[key])
        return Variant(key, label, None, "event", 1, {}, base, section, batch, args.events)

    variants = [
        row(
            "forwarder", "SQSForwarder (SendMessageBatch)", forwarded, ("one_by_one", "concurrent")
        ),
        row("one_by_one", "SendMessage per event, 1 call at a time", sending_app(one_by_one)),
        row("concurrent", f"SendMessage per event, {PIECE} at a time", sending_app(concurrently)),
        row(
            "by_hand", "reference: one SendMessageBatch by hand", sending_app(by_hand), "forwarder"
        ),
    ]
    try:
        for v in variants:  # warm-up: connections, caches
            assert v.batch is not None
            await v.batch(PIECE * 5)
        await h.run_variants(args, variants, rounds=(2, 3), clock=time.perf_counter)
    finally:
        await bus.close()
    return variants


# -- 2. response latency ----------------------------------------------------------------------


async def latency(
    endpoint: str, client: SQSClient, requests: int, *, overlap: bool
) -> dict[str, list[float]]:
    """Latencies of *requests* requests per row; with *overlap*, flushes run during later ones."""
    queue_url = (await client.create_queue(QueueName=f"bench-latency-{overlap}"))["QueueUrl"]
    letters: list[DeadLetter] = []
    short = Retry(attempts=3, initial_delay=0.005, max_delay=0.01, total_timeout=1)
    dead = f"http://127.0.0.1:{h.free_port()}"  # nothing listens there
    rows: dict[str, tuple[FastAPI, EventBus]] = {}
    for label, url in (("no forwarder", None), ("broker up", endpoint), ("broker down", dead)):
        _, bus = rows[label] = emitting_app(1)
        if url is not None:
            options: dict[str, Any] = {
                "retry": short,
                "dead_letter": letters.append,
                "endpoint_url": url,
            }
            bus.forward("order.*", SQSForwarder(queue_url, **options, **KEYS))
    latencies: dict[str, list[float]] = {label: [] for label in rows}
    tasks: list[asyncio.Task[None]] = []
    warmup, order = 20, random.Random(3)  # interleaved, no row always after another
    gc.collect()
    gc.disable()  # a collection would land on whichever row happens to be timed
    try:
        for n in range(warmup + requests):
            for label in order.sample(list(rows), len(rows)):
                seconds, task = await request(rows[label][0])
                tasks.append(task)
                if not overlap:
                    await task  # off the clock: the response was complete already
                if n >= warmup:
                    latencies[label].append(seconds)
    finally:
        gc.enable()
    await asyncio.gather(*tasks)
    for _, bus in rows.values():
        await bus.close()
    total = warmup + requests
    if (delivered := await queue_length(client, queue_url)) != total:
        raise AssertionError(f"broker up: {delivered} of {total} events in the queue")
    if (dead_lettered := sum(len(letter.events) for letter in letters)) != total:
        raise AssertionError(f"broker down: {dead_lettered} of {total} events dead-lettered")
    return latencies


def p50_p99(latencies: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[98] * 1000


async def amain(args: argparse.Namespace) -> bool:
    from aiobotocore.session import AioSession
    from moto.server import ThreadedMotoServer

    args.events = args.events or (300 if args.quick else 1000)
    # The broker-down row logs an ERROR per dead-lettered event: counted, not printed.
    logging.getLogger("fastapi_eventbus").setLevel(logging.CRITICAL)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # The queues are emptied between pieces; moto allows that once a minute unless:
    os.environ["MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR"] = "false"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    requests = 100 if args.quick else 200
    try:
        async with AioSession().create_client("sqs", endpoint_url=endpoint, **KEYS) as client:
            variants = await throughput(args, endpoint, client)
            if args.profile:
                return True
            alone = await latency(endpoint, client, requests, overlap=False)
            overlapped = await latency(endpoint, client, requests, overlap=True)
    finally:
        server.stop()
    h.header("bench_sqs", args.rounds, wall=True, extra="; moto's ThreadedMotoServer")
    h.tables(variants, wall=True)
    print(f"\nResponse latency, endpoint emitting 1 forwarded event, {requests} requests (ms)")
    print(f"  {'':14}  {'one at a time':>16}  {'back to back':>16}")
    print(f"  {'':14}" + f"  {'p50':>7}  {'p99':>7}" * 2)
    for label in alone:
        cells = [*p50_p99(alone[label]), *p50_p99(overlapped[label])]
        print(f"  {label:14}  " + "  ".join(f"{cell:7.3f}" for cell in cells))
    down = [
        p50_p99(rows["broker down"])[0] / p50_p99(rows["broker up"])[0]
        for rows in (alone, overlapped)
    ]
    print(f"  broker down vs up, p50: one at a time {down[0]:.2f}x, back to back {down[1]:.2f}x")
    by_key = {v.key: v for v in variants}
    batching = [h.ratio(by_key, "forwarder", base) for base in ("one_by_one", "concurrent")]
    return h.verdict({"sqs_batching": min(r or 0 for r in batching), "sqs_down": down[0]})


def main(argv: list[str] | None = None) -> int:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--events", type=int, help="events per round and row")

    return h.main(amain, __doc__, argv, extra)


if __name__ == "__main__":
    raise SystemExit(main())
