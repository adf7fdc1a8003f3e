"""Workers from Python: embedded in your own process, against Pub/Sub, and in a test."""

import asyncio

from examples.worker.app import create_worker_app
from fastapi_eventbus.worker import Backoff, PubSubSource, SQSSource, Worker, WorkerStats


# --8<-- [start:run]
def create_worker(queue_url: str) -> Worker:
    """A worker with every setting spelled out (these are the defaults)."""
    source = SQSSource(
        queue_url,
        wait_time_seconds=20,  # long polling
        max_messages=10,  # per ReceiveMessage call
        visibility_backoff=Backoff(initial=5, maximum=900),  # after failures: 5 s, 10 s, 20 s...
    )
    return Worker(
        create_worker_app(),  # its lifespan runs around the worker
        source,
        concurrency=10,
        shutdown_timeout=30,
        on_undecodable="retry",
        on_unhandled="retry",  # an event no handler matches: back to the queue, then its DLQ
    )


async def main(queue_url: str) -> None:
    worker = create_worker(queue_url)
    await worker.run()  # until `await worker.stop()`, from your own signal handling


# --8<-- [end:run]


# --8<-- [start:pubsub]
def create_pubsub_worker() -> Worker:
    """A worker pulling from a Pub/Sub subscription (credentials: ADC, or service_file=)."""
    source = PubSubSource(
        "projects/my-shop/subscriptions/orders-worker",
        max_messages=10,  # per pull
        ack_deadline=60,  # seconds; extended while handlers run
    )
    return Worker(create_worker_app(), source, concurrency=10)


# --8<-- [end:pubsub]


# --8<-- [start:test]
async def handle_queued(queue_url: str, endpoint_url: str, count: int) -> WorkerStats:
    """In a test: handle *count* queued messages in this process, then stop."""
    source = SQSSource(queue_url, endpoint_url=endpoint_url, wait_time_seconds=1)
    async with Worker(create_worker_app(), source) as worker:
        for _ in range(200):  # up to 10 s
            if worker.stats.handled >= count:
                break
            await asyncio.sleep(0.05)
    return worker.stats


# --8<-- [end:test]
