"""`lambda_sqs_handler`: an AWS Lambda handler running the app's handlers on SQS batches.

Each record goes the way a worker's message goes (`Processor`, from
`fastapi_eventbus.worker`): decoded, the ``on_undecodable`` and ``on_unhandled``
policies, the bus's handlers, and then "ack" or "nack", which here only mark the
record as handled or failed. The failed ones are returned as ``batchItemFailures``:
the event source mapping deletes the others and leaves these in the queue.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
from collections.abc import Collection, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any, Protocol

from fastapi_eventbus import wire
from fastapi_eventbus._brokers import aws
from fastapi_eventbus._bus import EventBus
from fastapi_eventbus._deadline import CANCEL_GRACE, cancel_the_rest
from fastapi_eventbus._events import Event
from fastapi_eventbus._settings import check_seconds
from fastapi_eventbus.exceptions import BusNotInstalledError, ConfigurationError
from fastapi_eventbus.worker._delivery import (
    HeldMessage,
    OnUndecodable,
    OnUnhandled,
    Processor,
    WorkerStats,
    check_policies,
)
from fastapi_eventbus.worker._source import ReceivedMessage, Source

logger = logging.getLogger("fastapi_eventbus.serverless")

_MAX_MESSAGE_BYTES = 1_048_576
"""The default ``max_message_bytes``: SQS's largest message (1 MiB)."""


class SQSBatchHandler(Protocol):
    """What `lambda_sqs_handler` returns: a plain function, with a `close` beside it."""

    def __call__(self, event: Mapping[str, Any], context: Any) -> dict[str, Any]:
        """Handle one SQS batch; ``{"batchItemFailures": [{"itemIdentifier": id}, ...]}``."""

    def close(self) -> None:
        """Exit the app's lifespan and close the event loop (also done at interpreter exit)."""


def lambda_sqs_handler(
    app: Any,
    *,
    on_undecodable: OnUndecodable = "retry",
    on_unhandled: OnUnhandled = "retry",
    max_message_bytes: int = _MAX_MESSAGE_BYTES,
    time_margin: float = 0.5,
    decode: wire.Decoder | None = None,
) -> SQSBatchHandler:
    """An AWS Lambda handler that runs *app*'s handlers on the batches of an SQS queue.

    ```python
    handler = lambda_sqs_handler(app)
    ```

    Set the function's handler to it, with an SQS event source mapping whose
    ``FunctionResponseTypes`` includes ``ReportBatchItemFailures``: the handler
    returns ``{"batchItemFailures": [{"itemIdentifier": messageId}, ...]}``,
    the records to leave in the queue (they come again, and reach the queue's
    dead-letter queue after its ``maxReceiveCount``); the others are deleted.

    The first invocation enters the app's lifespan, once per execution
    environment (cold start), on an event loop kept for the next invocations;
    the lifespan's state reaches the handlers' ``request.state`` as in the
    worker. It is exited at interpreter exit (or by `SQSBatchHandler.close`).

    Each record is decoded as `fastapi_eventbus.wire.decode_message` decodes a
    Lambda SQS record (a CloudEvent, or an SNS or EventBridge envelope of an
    event; trace context from its message attributes) and handed to
    `EventBus.handle`, the records of a standard queue concurrently. A record
    fails when a handler fails, when it is not an event (``on_undecodable``), or
    when no handler matches it (``on_unhandled``): the same policies, with the
    same log lines, as `fastapi_eventbus.worker.Worker`; each failed record is
    logged at ERROR with its message id (and its event's, once decoded). The
    handlers have the invocation's remaining time
    (``context.get_remaining_time_in_millis()``) less *time_margin* seconds:
    records still running then are cancelled and reported as failures. From a
    FIFO queue (its ARN ends in ``.fifo``), records are handled one after the
    other, and the first failure stops the batch: it and every later record
    are reported, as AWS requires to keep the order.

    Args:
        app: A FastAPI app with an installed bus (``bus.install(app)``).
        on_undecodable: ``"retry"`` (report the record as failed, so that it
            reaches the dead-letter queue) or ``"delete"`` (log it at ERROR and
            let it be deleted).
        on_unhandled: ``"retry"`` or ``"delete"``, for an event no handler matches.
        max_message_bytes: The largest record decoded (body plus attributes); a
            larger one is handled like one that is not an event.
        time_margin: Seconds of the invocation kept for reporting, after the
            handlers' time.
        decode: A decode hook (`fastapi_eventbus.wire.Decoder`) for other formats,
            asked first: it gets each record in ``ReceiveMessage``'s shape (``Body``,
            ``MessageAttributes``, ``MessageId``), as `fastapi_eventbus.worker.SQSSource`'s
            hook does, so that one hook serves both.

    Raises:
        ConfigurationError: *app* has no installed bus, or an argument is invalid.
    """
    try:
        bus = EventBus.of(app)
    except BusNotInstalledError:
        bus = None
    if bus is None or not hasattr(getattr(app, "router", None), "lifespan_context"):
        raise ConfigurationError(
            f"lambda_sqs_handler needs a FastAPI app with a bus installed (bus.install(app)); "
            f"got {app!r}"
        )
    check_policies(on_undecodable, on_unhandled, max_message_bytes)
    check_seconds("time_margin", time_margin, below=900)  # Lambda's longest time limit
    invoker = _Invoker(app, bus, on_undecodable, on_unhandled, max_message_bytes, time_margin)
    invoker.decode = wire.check_decoder(decode)

    def handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
        return invoker.invoke(event, context)

    handler.close = invoker.close  # type: ignore[attr-defined]
    atexit.register(invoker.close)
    return handler  # type: ignore[return-value]  # a function with close(): SQSBatchHandler


class _Invoker:
    """The long-lived part of a handler: the app, its event loop and its entered lifespan."""

    def __init__(
        self,
        app: Any,
        bus: EventBus,
        on_undecodable: OnUndecodable,
        on_unhandled: OnUnhandled,
        max_message_bytes: int,
        time_margin: float,
    ) -> None:
        self.app = app
        self.bus = bus
        self.on_undecodable: OnUndecodable = on_undecodable
        self.on_unhandled: OnUnhandled = on_unhandled
        self.max_message_bytes = max_message_bytes
        self.time_margin = float(time_margin)
        self.decode: wire.Decoder | None = None
        self._runner: asyncio.Runner | None = None
        self._stack: AsyncExitStack | None = None

    def invoke(self, event: Mapping[str, Any], context: Any) -> dict[str, Any]:
        """Handle one invocation's batch, entering the lifespan first if not yet entered."""
        records = event.get("Records") if isinstance(event, Mapping) else None
        if not isinstance(records, Sequence):
            raise ConfigurationError(
                f"not an SQS event (no Records): is the function's trigger an SQS queue? {event!r}"
            )
        if self._runner is None:
            self._runner = asyncio.Runner()
        failed = self._runner.run(self._invoke(records, context))
        return {"batchItemFailures": [{"itemIdentifier": message_id} for message_id in failed]}

    async def _invoke(self, records: Sequence[Mapping[str, Any]], context: Any) -> list[str]:
        if self._stack is None:
            stack = AsyncExitStack()
            # The installed lifespan gives its state to handler calls (EventBus.install).
            await stack.enter_async_context(self.app.router.lifespan_context(self.app))
            self._stack = stack
        # Read after a cold start's lifespan: it took part of the invocation's time.
        budget = context.get_remaining_time_in_millis() / 1000 - self.time_margin
        if budget <= 0:  # none of them can run: say why, beside each record's line
            logger.error(
                "the invocation has %gs left, no more than time_margin=%gs: its %d record(s) "
                "are not started; lower time_margin, or raise the function's timeout",
                budget + self.time_margin,
                self.time_margin,
                len(records),
            )
        return await _Batch(self, records).run(budget)

    def close(self) -> None:
        """Exit the lifespan (once entered) and close the event loop; idempotent.

        Tasks still running then (a record cut off at its invocation's time limit is left
        running) are cancelled; the loop is closed without those that ignore it, instead of
        waiting for them forever (what `asyncio.Runner.close` does)."""
        runner, stack = self._runner, self._stack
        self._runner = self._stack = None
        if runner is None:
            return
        stubborn: set[asyncio.Task[Any]] = set()
        try:
            if stack is not None:
                runner.run(stack.aclose())
            stubborn = runner.run(cancel_the_rest())
        finally:
            if not stubborn:
                runner.close()
            else:
                logger.error(
                    "closing: %d task(s) still ran %gs after being cancelled (a handler that "
                    "ignores cancellation); the event loop is closed without them",
                    len(stubborn),
                    CANCEL_GRACE,
                )
                runner.get_loop().close()


class _RecordSource(Source):
    """One batch as a `Source`: ``ack`` and ``nack`` only note each record's outcome."""

    messaging_system = "aws_sqs"

    def __init__(self, name: str, decode: wire.Decoder | None) -> None:
        self.name = name
        self.decoder = decode
        self.outcomes: dict[int, bool] = {}
        """Each settled record's outcome (handled or not), by identity: one batch can hold a
        message twice (SQS delivers at least once), and one copy's success must not hide the
        other's failure. A record still running when time runs out has none."""

    def decode(self, message: ReceivedMessage) -> Event:
        """The record's event: the hook's, given the record in ReceiveMessage's shape,
        else `fastapi_eventbus.wire.decode_message`'s."""
        record = message.body
        if self.decoder is not None and isinstance(record, Mapping):
            event = wire.decode_with(self.decoder, aws.from_lambda_record(record))
            if event is not None:
                return event
        return wire.decode_message(record)

    async def receive(self, max_messages: int) -> Sequence[ReceivedMessage]:
        return []  # the records come with the invocation

    async def ack(self, message: ReceivedMessage) -> None:
        self.outcomes[id(message)] = True

    async def nack(self, message: ReceivedMessage, delay: float | None = None) -> None:
        self.outcomes[id(message)] = False


class _Batch:
    """One invocation's records: a `Processor` owner (bus, source, stats, policies)."""

    def __init__(self, invoker: _Invoker, records: Sequence[Mapping[str, Any]]) -> None:
        arn = next(
            (
                str(r["eventSourceARN"])
                for r in records
                if isinstance(r, Mapping) and r.get("eventSourceARN")
            ),
            "",
        )
        self.bus = invoker.bus
        self.on_undecodable: OnUndecodable = invoker.on_undecodable
        self.on_unhandled: OnUnhandled = invoker.on_unhandled
        self.max_message_bytes = invoker.max_message_bytes
        self.stats = WorkerStats()
        self._source = _RecordSource(arn.rpartition(":")[2] or "SQS", invoker.decode)
        self.source: Source = self._source
        self.fifo = arn.endswith(".fifo")
        self.held = [HeldMessage(_received(record)) for record in records]
        self.stats.received = len(self.held)
        self._processor = Processor(self, _no_watch)

    async def run(self, budget: float) -> list[str]:
        """Handle the records within *budget* seconds; the message ids of those that failed."""
        if budget <= 0:  # none could finish: none is started (a sync one would run on)
            for held in self.held:
                held.abandoned = True
            return self._failures()
        if self.fifo:
            tasks = {asyncio.create_task(self._in_order()): "the FIFO batch"}
        else:
            tasks = {asyncio.create_task(self._processor.process(h)): str(h) for h in self.held}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(budget, 0))
            await self._cancel(pending)
        for task, what in tasks.items():  # a bug: the record is reported failed, as it did not
            if task.done() and not task.cancelled() and (error := task.exception()) is not None:
                logger.error("processing %s failed unexpectedly", what, exc_info=error)
        return self._failures()

    async def _in_order(self) -> None:
        for held in self.held:
            await self._processor.process(held)
            if not self._source.outcomes.get(id(held.message)):
                return

    async def _cancel(self, tasks: Collection[asyncio.Task[None]]) -> None:
        """Out of time: what still runs is cancelled, given a moment to unwind, and left."""
        if not tasks:
            return
        for held in self.held:
            if id(held.message) not in self._source.outcomes:
                held.abandoned = True  # a late success settles nothing any more
        for task in tasks:
            task.cancel("cancelled at the invocation's time limit")
        await asyncio.wait(tasks, timeout=0.1)

    def _failures(self) -> list[str]:
        """The failed records' ids (FIFO: the first failed one and all after it), logged."""
        failed: list[str] = []
        for held in self.held:
            message_id = held.message.message_id
            if self._source.outcomes.get(id(held.message)) and not (failed and self.fifo):
                continue
            failed.append(message_id)
            if held.abandoned:
                why = "not finished when the invocation's time ran out"
            elif self.fifo and len(failed) > 1:
                why = "not handled: an earlier record of the FIFO batch failed"
            else:
                why = "failed"
            if not message_id:  # Lambda takes an empty itemIdentifier as the whole batch's failure
                why += " (it has no messageId: Lambda retries the whole batch)"
            logger.error(
                "record %s from %s %s; reported in batchItemFailures", held, self.source.name, why
            )
        return list(dict.fromkeys(failed))  # a message there twice is reported once


def _no_watch(held: HeldMessage, hold: float | None) -> None:
    """The invocation's deadline bounds every record: no watch of its own."""


def _received(record: Mapping[str, Any]) -> ReceivedMessage:
    """A Lambda SQS record as a received message; its body is the record, as it came."""
    if not isinstance(record, Mapping):
        record = {"body": record}
    attributes = record.get("attributes")
    count = attributes.get("ApproximateReceiveCount") if isinstance(attributes, Mapping) else None
    message_id = record.get("messageId")
    return ReceivedMessage(
        body=record,
        message_id="" if message_id is None else str(message_id),  # null: none, not "None"
        receipt=str(record.get("receiptHandle", "")),
        receive_count=int(count) if isinstance(count, str) and _digits(count) else None,
    )


def _digits(text: str) -> bool:
    """Whether *text* is what ``int`` reads as a count: ASCII digits (``"²"`` is a digit)."""
    return text.isascii() and text.isdigit()
