"""Helpers of the worker tests: worker processes run through the CLI, queues, polling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from tests._support import ROOT
from tests.forwarders._moto import KEY_ID, REGION, SECRET, Moto

if TYPE_CHECKING:
    from types_aiobotocore_sqs.literals import QueueAttributeNameType
    from types_aiobotocore_sqs.type_defs import MessageTypeDef

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": KEY_ID,
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_DEFAULT_REGION": REGION,
}
"""Moto accepts any credentials; these keep botocore from looking for real ones."""

T = TypeVar("T")


def wait_for(probe: Callable[[], T], timeout: float = 15.0, what: str = "condition") -> T:
    """Call *probe* until it returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@dataclass
class WorkerProcess:
    """``python -m fastapi_eventbus worker ...`` running in another process."""

    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        """What the process has logged so far."""
        return self.log.read_text(errors="replace")

    def wait_started(self, timeout: float = 30.0) -> None:
        """Wait for the worker's 'worker started' log line."""

        def started() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the worker exited early:\n{self.output()}")
            return "worker started" in self.output()

        wait_for(started, timeout, "the worker to start")

    def terminate(self, timeout: float = 30.0) -> int:
        """Send SIGTERM and wait for the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


@contextmanager
def worker_process(
    target: str, *options: str, log: Path, env: Mapping[str, str] | None = None
) -> Iterator[WorkerProcess]:
    """Run the CLI's worker for *target* (an app factory) until the block ends."""
    command = [sys.executable, "-m", "fastapi_eventbus", "worker", target, "--factory", *options]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **AWS_ENV, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    worker = WorkerProcess(process, log)
    try:
        worker.wait_started()
        yield worker
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def sqs_options(moto: Moto, queue_url: str) -> list[str]:
    """The CLI options for *queue_url* on moto, with short polls and immediate retries."""
    return [
        "--sqs",
        queue_url,
        "--endpoint-url",
        moto.endpoint,
        "--region",
        REGION,
        "--wait-time",
        "1",
        "--retry-delay",
        "0",
    ]


async def create_queue(
    moto: Moto, name: str, attributes: Mapping[QueueAttributeNameType, str] | None = None
) -> str:
    """Create queue *name* (a unique suffix is added) with *attributes*; return its URL."""
    async with moto.client() as sqs:
        response = await sqs.create_queue(
            QueueName=f"{name}-{uuid.uuid4().hex[:8]}", Attributes=attributes or {}
        )
    return response["QueueUrl"]


async def queue_with_dlq(moto: Moto, name: str, max_receive_count: int) -> tuple[str, str]:
    """A queue whose redrive policy moves messages to a new dead-letter queue; both URLs."""
    dlq_url = await create_queue(moto, f"{name}-dlq")
    async with moto.client() as sqs:
        attributes = await sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])
    policy = {
        "deadLetterTargetArn": attributes["Attributes"]["QueueArn"],
        "maxReceiveCount": str(max_receive_count),
    }
    queue_url = await create_queue(
        moto, name, {"VisibilityTimeout": "30", "RedrivePolicy": json.dumps(policy)}
    )
    return queue_url, dlq_url


async def send_raw(moto: Moto, queue_url: str, body: str) -> str:
    """Send a message that no forwarder wrote; return its message id."""
    async with moto.client() as sqs:
        response = await sqs.send_message(QueueUrl=queue_url, MessageBody=body)
    return response["MessageId"]


async def peek(moto: Moto, queue_url: str, wait: int = 0) -> list[MessageTypeDef]:
    """Receive what is visible (without deleting it; it stays invisible for 30 s)."""
    async with moto.client() as sqs:
        response = await sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=wait,
            MessageAttributeNames=["All"],
            VisibilityTimeout=30,
        )
    return response.get("Messages", [])


async def counts(moto: Moto, queue_url: str) -> tuple[int, int]:
    """(visible, in flight) messages of the queue."""
    async with moto.client() as sqs:
        response = await sqs.get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
    attributes = response["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]),
        int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    )
