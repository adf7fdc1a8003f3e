"""SQS forwarding speed, against moto's SQS server on 127.0.0.1, in one process and one run.

Run ``python -m benchmarks.bench_sqs`` (about half a minute) or add ``--quick``.

1. **Throughput**: events per second that reach the queue. Every variant drives
   the same requests in-process (10 events each) and differs only
   in how the events leave: `SQSForwarder` (``SendMessageBatch`` on the bus's
   flush), or a background task sending one ``SendMessage`` per event with the
   forwarder's own aiobotocore client, one call at a time or 10 at a time; a
   reference row sends one ``SendMessageBatch`` by hand. Variants run
   round-robin; the table gives the best and the median round, and every piece
   of 10 events is checked to be in the queue.
2. **Response latency** of an endpoint emitting one forwarded event, with no
   forwarder, with the broker up, and with the broker down (a port nothing
   listens on, with a short retry policy so that the run ends). Requests are
   driven in-process (``await app(scope, receive, send)``); a request's latency
   ends when its last response body message is sent. "One at a time" lets each
   request's flush finish (off the clock) before the next request; "back to back"
   starts the next request at once, so flushes (and retries) run during it, as in
   a busy server. Every event is then accounted for: in the queue, or passed to
   the dead-letter callback.

``--check`` exits 1 if batching is under 5x one ``SendMessage`` per event, or if
the broker being down makes the median response (one at a time) more than 1.5x
slower than with the broker up.

moto runs in this process (a thread), and stores each message with about 0.35 ms
of Python work, against about 2.5 ms for a whole ``SendMessage`` call: that caps
what batching can gain here at about 5x (the by-hand row shows the ceiling).
Against SQS, where a call is a network round trip and storing a message costs
the client nothing, the gain should approach 10 messages per call (not measured here).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import random
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI
from starlette.types import Message

from benchmarks.bench_core import BASE_SCOPE, REQUEST_MESSAGE
from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.forwarders import DeadLetter, Retry
from fastapi_eventbus.forwarders.sqs import SQSForwarder
from fastapi_eventbus.wire import sqs_body

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import SendMessageBatchRequestEntryTypeDef

KEY_ID = SECRET = "bench"  # moto accepts any credentials
REGION = "us-east-1"
CONCURRENCY = 10
"""Calls in flight at once for the concurrent ``SendMessage`` baseline (= the forwarder's)."""

Bus = Annotated[EventBus, Depends(get_bus)]


def payload(n: int) -> dict[str, Any]:
    """The payload of event *n*: a small order, about 250 bytes as a CloudEvent."""
    return {"order_id": n, "item": "book", "customer": "ada", "total": "12.50"}


# -- the broker -------------------------------------------------------------------


def start_moto() -> tuple[ThreadedMotoServer, str]:
    """moto's server on a free port of 127.0.0.1, and its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # The benchmark empties its queues between pieces; moto allows that once a minute unless:
    os.environ["MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR"] = "false"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def dead_endpoint() -> str:
    """An endpoint URL on a port of 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def forwarder(queue_url: str, endpoint: str, **options: Any) -> SQSForwarder:
    return SQSForwarder(
        queue_url,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        **options,
    )


async def create_queue(client: SQSClient, name: str) -> str:
    return (await client.create_queue(QueueName=name))["QueueUrl"]


async def queue_length(client: SQSClient, queue_url: str) -> int:
    response = await client.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"]
    )
    return int(response["Attributes"]["ApproximateNumberOfMessages"])


# -- driving the app in-process -----------------------------------------------------


async def request(app: FastAPI) -> tuple[float, asyncio.Task[None]]:
    """One POST to *app*: seconds until its response was complete, and the still-running call."""
    done = asyncio.get_running_loop().create_future()

    async def receive() -> Message:
        return REQUEST_MESSAGE

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise AssertionError(f"status {message['status']}")
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set_result(time.perf_counter())

    started = time.perf_counter()
    task = asyncio.create_task(app(dict(BASE_SCOPE), receive, send))
    finished = await done
    return finished - started, task


def emitting_app(events_per_request: int) -> tuple[FastAPI, EventBus]:
    """An app whose one endpoint emits *events_per_request* ``order.placed`` events."""
    app = FastAPI()
    bus = EventBus()
    bus.install(app)
    counter = iter(range(10**9))

    @app.post("/")
    async def endpoint(bus: Bus) -> dict[str, bool]:
        for _ in range(events_per_request):
            bus.emit("order.placed", payload(next(counter)))
        return {"ok": True}

    return app, bus


# -- 1. throughput ---------------------------------------------------------------------

PIECE = 10
"""Events per timed piece. The queue is checked and purged between pieces, off the clock:
moto recounts the whole queue for every message it stores (about 9 µs per queued message
per new message), which real SQS does not do; in a long queue that cost drowns what the
client does, so the queues are kept short."""


@dataclass
class Variant:
    label: str
    send_piece: Callable[[], Awaitable[None]]
    """Sends `PIECE` events and returns once they are all in the queue."""
    queue_url: str
    times: list[float] = field(default_factory=list)

    def rates(self, events: int) -> tuple[float, float]:
        """Best and median events per second."""
        rates = [events / seconds for seconds in self.times]
        return max(rates), statistics.median(rates)


async def timed_round(variant: Variant, client: SQSClient, events: int) -> float:
    """Seconds *variant* takes to send *events* events, in pieces, each one checked."""
    total = 0.0
    for _ in range(events // PIECE):
        started = time.perf_counter()
        await variant.send_piece()
        total += time.perf_counter() - started
        if (got := await queue_length(client, variant.queue_url)) != PIECE:
            raise AssertionError(f"{variant.label}: {got} messages in the queue, not {PIECE}")
        await client.purge_queue(QueueUrl=variant.queue_url)
    return total


def sending_app(events_per_request: int, send: Callable[[list[str]], Awaitable[None]]) -> FastAPI:
    """The baseline: an endpoint that sends its events itself, in a background task."""
    app = FastAPI()
    counter = iter(range(10**9))

    async def send_events(numbers: list[int]) -> None:
        await send([sqs_body(Event(name="order.placed", payload=payload(n))) for n in numbers])

    @app.post("/")
    async def endpoint(background_tasks: BackgroundTasks) -> dict[str, bool]:
        background_tasks.add_task(send_events, [next(counter) for _ in range(events_per_request)])
        return {"ok": True}

    return app


async def throughput(endpoint: str, client: SQSClient, events: int, rounds: int) -> list[Variant]:
    """Requests of 10 events, forwarded by the bus or sent by a background task."""
    queues = [await create_queue(client, f"bench-{n}") for n in range(4)]
    forwarded, bus = emitting_app(PIECE)
    sqs_forwarder = forwarder(queues[0], endpoint)
    bus.forward("order.*", sqs_forwarder)
    await sqs_forwarder.ensure_started()
    sqs = sqs_forwarder.client  # the baselines use the forwarder's own client

    async def one_by_one(bodies: list[str]) -> None:
        for body in bodies:
            await sqs.send_message(QueueUrl=queues[1], MessageBody=body)

    async def concurrently(bodies: list[str]) -> None:
        slots = asyncio.Semaphore(CONCURRENCY)

        async def one(body: str) -> None:
            async with slots:
                await sqs.send_message(QueueUrl=queues[2], MessageBody=body)

        await asyncio.gather(*(one(body) for body in bodies))

    async def by_hand(bodies: list[str]) -> None:
        entries: list[SendMessageBatchRequestEntryTypeDef] = [
            {"Id": str(n), "MessageBody": body} for n, body in enumerate(bodies)
        ]
        await sqs.send_message_batch(QueueUrl=queues[3], Entries=entries)

    def one_request(app: FastAPI) -> Callable[[], Awaitable[None]]:
        async def piece() -> None:
            _, task = await request(app)
            await task  # the call ends when its events have been sent

        return piece

    variants = [
        Variant("SQSForwarder (SendMessageBatch)", one_request(forwarded), queues[0]),
        Variant(
            "SendMessage per event, 1 call at a time",
            one_request(sending_app(PIECE, one_by_one)),
            queues[1],
        ),
        Variant(
            f"SendMessage per event, {CONCURRENCY} calls at a time",
            one_request(sending_app(PIECE, concurrently)),
            queues[2],
        ),
        Variant(
            "reference: one SendMessageBatch by hand",
            one_request(sending_app(PIECE, by_hand)),
            queues[3],
        ),
    ]
    try:
        for variant in variants:  # warm-up: connections, caches
            await timed_round(variant, client, PIECE * 5)
        for round_ in range(rounds):
            for variant in variants[round_ % 4 :] + variants[: round_ % 4]:
                variant.times.append(await timed_round(variant, client, events))
    finally:
        await bus.close()
    return variants


# -- 2. response latency -----------------------------------------------------------------


@dataclass
class LatencyRow:
    label: str
    app: FastAPI
    bus: EventBus
    latencies: list[float] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def percentiles(self) -> tuple[float, float]:
        """p50 and p99, in milliseconds."""
        cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return cuts[49] * 1000, cuts[98] * 1000


async def latency(
    endpoint: str, client: SQSClient, requests: int, *, overlap: bool
) -> list[LatencyRow]:
    """Time *requests* requests per row; with *overlap*, flushes run during later requests."""
    queue_url = await create_queue(client, f"bench-latency-{overlap}")
    letters: list[DeadLetter] = []
    short = Retry(attempts=3, initial_delay=0.005, max_delay=0.01, total_timeout=1)
    rows = []
    for label, target in (("no forwarder", None), ("broker up", endpoint), ("broker down", "")):
        app, bus = emitting_app(1)
        if target is not None:
            url = target or dead_endpoint()
            bus.forward(
                "order.*", forwarder(queue_url, url, retry=short, dead_letter=letters.append)
            )
        rows.append(LatencyRow(label, app, bus))
    warmup = 20
    gc.collect()
    gc.disable()  # a collection would land on whichever row happens to be timed
    try:
        order = random.Random(3)  # interleaved, in a shuffled order: no row always follows another
        for n in range(warmup + requests):
            for row in order.sample(rows, len(rows)):
                seconds, task = await request(row.app)
                row.tasks.append(task)
                if not overlap:
                    await task  # off the clock: the response was complete already
                if n >= warmup:
                    row.latencies.append(seconds)
    finally:
        gc.enable()
    for row in rows:
        await asyncio.gather(*row.tasks)
        await row.bus.close()
    total = warmup + requests
    if (delivered := await queue_length(client, queue_url)) != total:
        raise AssertionError(f"broker up: {delivered} of {total} events in the queue")
    if (dead := sum(len(letter.events) for letter in letters)) != total:
        raise AssertionError(f"broker down: {dead} of {total} events dead-lettered")
    return rows


# -- report ---------------------------------------------------------------------------------


def report_throughput(variants: list[Variant], events: int, rounds: int) -> float:
    print(
        f"\nSQS throughput into moto, requests of {PIECE} events, {events} events per round, "
        f"{rounds} rounds (events/s)"
    )
    width = max(len(v.label) for v in variants)
    print(f"  {'':{width}}  {'best':>9}  {'median':>9}")
    for variant in variants:
        best, median = variant.rates(events)
        print(f"  {variant.label:{width}}  {best:9,.0f}  {median:9,.0f}")
    forwarder, sequential, concurrent, by_hand = (v.rates(events)[1] for v in variants)
    print(
        f"  SQSForwarder vs SendMessage per event, 1 call at a time:  {forwarder / sequential:.1f}x"
    )
    print(
        f"  SQSForwarder vs SendMessage per event, {CONCURRENCY} calls at a time: "
        f"{forwarder / concurrent:.1f}x"
    )
    print(f"  SQSForwarder vs SendMessageBatch by hand: {forwarder / by_hand:.2f}x")
    print("  target: >= 5x")
    return min(forwarder / sequential, forwarder / concurrent)


def report_latency(alone: list[LatencyRow], overlapped: list[LatencyRow], requests: int) -> float:
    print(f"\nResponse latency, endpoint emitting 1 forwarded event, {requests} requests (ms)")
    print(f"  {'':14}  {'one at a time':>16}  {'back to back':>16}")
    print(f"  {'':14}  {'p50':>7}  {'p99':>7}  {'p50':>7}  {'p99':>7}")
    for one, two in zip(alone, overlapped, strict=True):
        cells = [*one.percentiles(), *two.percentiles()]
        print(f"  {one.label:14}  " + "  ".join(f"{cell:7.3f}" for cell in cells))
    ratios = []
    for rows in (alone, overlapped):
        (up50, up99), (down50, down99) = rows[1].percentiles(), rows[2].percentiles()
        ratios.append((down50 / up50, down99 / up99))
    print(
        f"  broker down vs up, one at a time: p50 {ratios[0][0]:.2f}x, p99 {ratios[0][1]:.2f}x; "
        f"back to back: p50 {ratios[1][0]:.2f}x, p99 {ratios[1][1]:.2f}x"
    )
    print("  target: the response does not wait for the broker (one at a time, p50 <= 1.5x)")
    return ratios[0][0]


async def amain(args: argparse.Namespace) -> int:
    from aiobotocore.session import AioSession

    server, endpoint = start_moto()
    try:
        async with AioSession().create_client(
            "sqs",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
        ) as client:
            variants = await throughput(endpoint, client, args.events, args.rounds)
            alone = await latency(endpoint, client, args.requests, overlap=False)
            overlapped = await latency(endpoint, client, args.requests, overlap=True)
    finally:
        server.stop()
    print(f"Python {sys.version.split()[0]}, moto's ThreadedMotoServer in this process")
    ratio = report_throughput(variants, args.events, args.rounds)
    slowdown = report_latency(alone, overlapped, args.requests)
    if args.check and (ratio < 5 or slowdown > 1.5):
        print("\nFAILED: a target was missed")
        return 1
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer events, rounds and requests")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    args.events, args.rounds, args.requests = (300, 2, 100) if args.quick else (1000, 3, 200)
    return args


def main(argv: list[str] | None = None) -> int:
    # The broker-down row logs an ERROR per dead-lettered event: counted, not printed.
    logging.getLogger("fastapi_eventbus").setLevel(logging.CRITICAL)
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
