"""`lambda_sqs_handler`: batches shaped as an SQS event source mapping gives them to Lambda.

End to end: an app emits through the real `SQSForwarder` to moto's SQS; the messages are
received with aiobotocore and turned into the Lambda event, as the event source mapping
would, then handed to the handler as one batch. The fake context is the Lambda runtime's
interface (``get_remaining_time_in_millis``, ``aws_request_id``, ``function_name``).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from fastapi_eventbus import ConfigurationError, Event, EventBus, get_bus
from fastapi_eventbus.serverless import SQSBatchHandler, lambda_sqs_handler
from tests._support import load_module
from tests.forwarders._moto import REGION, Moto

ROOT = Path(__file__).resolve().parent.parent.parent

ACCOUNT = "123456789012"


@dataclass
class FakeContext:
    """The Lambda runtime's context object: the time left counts down from *seconds*."""

    seconds: float = 30.0
    aws_request_id: str = "c6af9ac6-7b61-11e6-9a41-93e8deadbeef"
    function_name: str = "orders-consumer"
    started: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.seconds - (time.monotonic() - self.started)) * 1000))


def lambda_event(messages: list[Any], queue_url: str) -> dict[str, Any]:
    """ReceiveMessage's messages as the event an SQS event source mapping sends a function
    (https://docs.aws.amazon.com/lambda/latest/dg/with-sqs.html, the example event)."""
    arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{queue_url.rsplit('/', 1)[1]}"
    return {
        "Records": [
            {
                "messageId": message["MessageId"],
                "receiptHandle": message["ReceiptHandle"],
                "body": message["Body"],
                "attributes": dict(message.get("Attributes", {})),
                "messageAttributes": {
                    name: {
                        "stringValue": value.get("StringValue"),
                        "stringListValues": [],
                        "binaryListValues": [],
                        "dataType": value["DataType"],
                    }
                    for name, value in message.get("MessageAttributes", {}).items()
                },
                "md5OfBody": message["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": arn,
                "awsRegion": REGION,
            }
            for message in messages
        ]
    }


def emit_through_sqs(
    moto: Moto, queue_url: str, *payloads: dict[str, Any], **options: Any
) -> list[str]:
    """An app's endpoint emits one event per payload, forwarded to *queue_url*; their ids."""
    bus = EventBus()
    bus.forward("order.*", moto.forwarder(queue_url, **options))
    app = FastAPI()
    bus.install(app)
    ids: list[str] = []

    @app.post("/orders")
    async def order(payload: dict[str, Any], events: Annotated[EventBus, Depends(get_bus)]) -> None:
        ids.append(events.emit(payload.pop("name", "order.placed"), payload).id)

    with TestClient(app) as client:
        for payload in payloads:
            assert client.post("/orders", json=payload).status_code == 200
    return ids


def received_batch(moto: Moto, queue_url: str, count: int) -> dict[str, Any]:
    """*count* messages received from *queue_url*, as one Lambda event."""
    messages = moto.receive(queue_url, count)
    return lambda_event(messages, queue_url)


@dataclass
class Consumer:
    """The consuming app: its handler calls, and how often its lifespan was entered."""

    app: FastAPI
    handled: Counter[str] = field(default_factory=Counter)
    seen: list[tuple[str, str]] = field(default_factory=list)
    lifespans: int = 0


@pytest.fixture
def consumer() -> Consumer:
    bus = EventBus()
    entered: list[int] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        entered.append(1)
        made.lifespans = len(entered)
        yield {"tag": f"lifespan-{len(entered)}"}

    app = FastAPI(lifespan=lifespan)
    made = Consumer(app)

    @bus.on("order.*")
    async def handle(event: Event, request: Request) -> None:
        made.handled[event.id] += 1
        made.seen.append((event.id, request.state.tag))
        if event.payload.get("fail"):
            raise RuntimeError("this order fails")
        if event.payload.get("slow"):
            await asyncio.sleep(30)

    bus.install(app)
    return made


@pytest.fixture
def handler(consumer: Consumer) -> Iterator[SQSBatchHandler]:
    handler = lambda_sqs_handler(consumer.app)
    yield handler
    handler.close()


def failures(result: dict[str, Any]) -> list[str]:
    return [item["itemIdentifier"] for item in result["batchItemFailures"]]


def test_a_batch_end_to_end_reports_exactly_the_failed_records(
    moto: Moto, consumer: Consumer, handler: SQSBatchHandler, caplog: pytest.LogCaptureFixture
) -> None:
    queue_url = moto.queue()
    ids = emit_through_sqs(moto, queue_url, {"n": 1}, {"n": 2, "fail": True}, {"n": 3})
    event = received_batch(moto, queue_url, 3)
    by_event = {record["messageId"]: record for record in event["Records"]}  # messageId -> record
    failing = [
        message_id for message_id, record in by_event.items() if '"fail":true' in record["body"]
    ]
    with caplog.at_level(logging.ERROR, "fastapi_eventbus.serverless"):
        result = handler(event, FakeContext())
    assert failures(result) == failing
    assert consumer.handled == Counter(ids)  # once per event id
    assert [line for line in caplog.messages if failing[0] in line and ids[1] in line]


def test_a_failed_record_is_reported_when_its_message_id_comes_twice(moto: Moto) -> None:
    """SQS delivers at least once: one batch can hold a message twice (one ``messageId``,
    two receipt handles). A success of one copy must not hide the other's failure."""
    queue_url = moto.queue()
    emit_through_sqs(moto, queue_url, {"n": 1, "fail": True}, {"n": 2})
    event = received_batch(moto, queue_url, 2)
    records = sorted(event["Records"], key=lambda record: '"fail":true' not in record["body"])
    records[1]["messageId"] = records[0]["messageId"]  # the failing one's, delivered twice
    event["Records"] = records
    bus, app = EventBus(), FastAPI()
    bus.install(app)

    @bus.on("order.*")
    async def handle(event: Event) -> None:
        if event.payload.get("fail"):
            raise RuntimeError("this order fails")
        await asyncio.sleep(0.05)  # succeeds after the other copy failed

    handler = lambda_sqs_handler(app)
    try:
        result = handler(event, FakeContext())
    finally:
        handler.close()
    assert failures(result) == [records[0]["messageId"]]


def test_the_lifespan_is_entered_once_across_invocations(
    moto: Moto, consumer: Consumer, handler: SQSBatchHandler
) -> None:
    queue_url = moto.queue()
    first = emit_through_sqs(moto, queue_url, {"n": 1})
    assert handler(received_batch(moto, queue_url, 1), FakeContext()) == {"batchItemFailures": []}
    second = emit_through_sqs(moto, queue_url, {"n": 2})
    assert failures(handler(received_batch(moto, queue_url, 1), FakeContext())) == []
    assert consumer.lifespans == 1
    assert consumer.seen == [(first[0], "lifespan-1"), (second[0], "lifespan-1")]


def test_a_fifo_batch_stops_at_the_first_failure(
    moto: Moto, consumer: Consumer, handler: SQSBatchHandler
) -> None:
    queue_url = moto.queue(fifo=True)
    ids = emit_through_sqs(
        moto,
        queue_url,
        {"n": 1},
        {"n": 2, "fail": True},
        {"n": 3},
        {"n": 4},
        message_group_id=lambda event: "orders",
    )
    event = received_batch(moto, queue_url, 4)
    order = [record["messageId"] for record in event["Records"]]
    bodies = [record["body"] for record in event["Records"]]
    assert all(f'"n":{n}' in body for n, body in enumerate(bodies, 1))  # the order kept
    result = handler(event, FakeContext())
    assert failures(result) == order[1:]  # the failed record, and every one after it
    assert consumer.handled == Counter(ids[:2])  # the later ones were not handled


def test_records_unfinished_when_time_runs_out_are_failures(
    moto: Moto, consumer: Consumer, handler: SQSBatchHandler, caplog: pytest.LogCaptureFixture
) -> None:
    queue_url = moto.queue()
    emit_through_sqs(moto, queue_url, {"n": 1, "slow": True}, {"n": 2})
    event = received_batch(moto, queue_url, 2)
    slow = [r["messageId"] for r in event["Records"] if '"slow":true' in r["body"]]
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, "fastapi_eventbus.serverless"):
        result = handler(event, FakeContext(seconds=1.0))
    assert time.monotonic() - started < 1.0
    assert failures(result) == slow
    assert any("time ran out" in line and slow[0] in line for line in caplog.messages)


def test_a_record_that_failed_before_time_ran_out_is_reported_as_failed(
    moto: Moto, consumer: Consumer, handler: SQSBatchHandler, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: once time ran out, every record not handled was logged as "not finished when
    the invocation's time ran out", the one whose handler had failed long before too."""
    queue_url = moto.queue()
    emit_through_sqs(moto, queue_url, {"n": 1, "slow": True}, {"n": 2, "fail": True})
    event = received_batch(moto, queue_url, 2)
    [failing] = [r["messageId"] for r in event["Records"] if '"fail":true' in r["body"]]
    with caplog.at_level(logging.ERROR, "fastapi_eventbus.serverless"):
        result = handler(event, FakeContext(seconds=1.0))
    assert failing in failures(result)
    [line] = [line for line in caplog.messages if failing in line and "batchItemFailures" in line]
    assert "time ran out" not in line
    assert " failed;" in line


def test_an_invocation_with_no_time_left_starts_no_record(
    moto: Moto, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: the ERROR said the records "are not handled", but they were started all the
    same: one ran and was acknowledged; a sync one ran on in its thread while reported in
    batchItemFailures, so it would run again."""
    queue_url = moto.queue()
    emit_through_sqs(moto, queue_url, {"n": 1}, {"n": 2})
    event = received_batch(moto, queue_url, 2)
    ran: list[str] = []
    bus, app = EventBus(), FastAPI()
    bus.install(app)

    @bus.on("order.*")
    async def handle(event: Event) -> None:
        ran.append(event.id)

    bus.on("order.*")(lambda event: ran.append(event.id))  # and a sync one, in a thread
    handler = lambda_sqs_handler(app, time_margin=1)
    try:
        with caplog.at_level(logging.ERROR, "fastapi_eventbus.serverless"):
            result = handler(event, FakeContext(seconds=0.3))
    finally:
        handler.close()
    assert sorted(failures(result)) == sorted(r["messageId"] for r in event["Records"])
    assert ran == []
    for record in event["Records"]:
        assert any(record["messageId"] in line for line in caplog.messages)


def test_a_cold_start_s_lifespan_counts_against_the_invocation_s_time(moto: Moto) -> None:
    """The time left was read before the first invocation entered the app's lifespan: a
    lifespan of 0.6 s and a slow record ran past Lambda's limit (the runtime would have
    killed the whole batch, unreported); the slow record is a failure in time."""
    bus = EventBus()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.sleep(0.6)  # a cold start: pools opened, configuration loaded
        yield

    app = FastAPI(lifespan=lifespan)

    @bus.on("order.*")
    async def handle(event: Event) -> None:
        if event.payload.get("slow"):
            await asyncio.sleep(30)

    bus.install(app)
    queue_url = moto.queue()
    emit_through_sqs(moto, queue_url, {"n": 1, "slow": True})
    event = received_batch(moto, queue_url, 1)
    handler = lambda_sqs_handler(app)
    try:
        started = time.monotonic()
        result = handler(event, FakeContext(seconds=1.2))
        assert time.monotonic() - started < 1.2
    finally:
        handler.close()
    assert failures(result) == [event["Records"][0]["messageId"]]


def test_undecodable_and_unhandled_records_follow_the_policies(
    moto: Moto, consumer: Consumer
) -> None:
    queue_url = moto.queue()
    emit_through_sqs(moto, queue_url, {"n": 1, "name": "order.placed"})
    event = received_batch(moto, queue_url, 1)
    good = event["Records"][0]
    broken = {**good, "messageId": "broken", "body": "not json"}
    unknown = {
        **good,
        "messageId": "unknown",
        "body": good["body"].replace("order.placed", "other.thing"),
    }
    event["Records"] = [good, broken, unknown]
    retrying = lambda_sqs_handler(consumer.app)
    deleting = lambda_sqs_handler(consumer.app, on_undecodable="delete", on_unhandled="delete")
    try:
        assert failures(retrying(event, FakeContext())) == ["broken", "unknown"]
        assert failures(deleting(event, FakeContext())) == []
    finally:
        retrying.close()
        deleting.close()


@pytest.mark.parametrize(
    "break_record",
    [
        pytest.param(lambda good: "not a record", id="not a mapping, first"),
        pytest.param(lambda good: {**good, "attributes": ["x"]}, id="attributes a list"),
        pytest.param(lambda good: {**good, "attributes": "oops"}, id="attributes a string"),
        pytest.param(
            lambda good: {**good, "attributes": {"ApproximateReceiveCount": "\u00b2"}},
            id="a receive count isdigit takes and int does not",
        ),
        pytest.param(
            lambda good: {**good, "messageId": None, "body": "not json"}, id="messageId null"
        ),
    ],
)
def test_a_malformed_record_fails_alone(
    moto: Moto, consumer: Consumer, break_record: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: a record that was not a mapping (first in the batch), an ``attributes`` that
    was not one, or a receive count such as ``"²"`` raised while the invocation read its
    records, before any ran: no record was handled, no id logged, and Lambda retried the
    whole batch. Now the others are handled, and that one is logged and reported. Found
    too: a failed record whose ``messageId`` is null was reported as ``"None"``, an id
    Lambda does not know, without the log saying that Lambda retries the whole batch."""
    queue_url = moto.queue()
    ids = emit_through_sqs(moto, queue_url, {"n": 1}, {"n": 2})
    event = received_batch(moto, queue_url, 2)
    good, second = event["Records"]
    bad = break_record({**second, "messageId": "bad"})
    event["Records"] = [bad, good]
    with caplog.at_level(logging.ERROR, "fastapi_eventbus"):
        result = lambda_sqs_handler(consumer.app)(event, FakeContext())
    assert ids[0] in consumer.handled or ids[1] in consumer.handled  # the good one ran
    broken = isinstance(bad, str) or bad["messageId"] is None
    assert sum(consumer.handled.values()) == (1 if broken else 2)
    assert failures(result) == ([""] if broken else [])
    if broken:
        assert "it has no messageId: Lambda retries the whole batch" in caplog.text


def test_a_record_whose_processing_raises_is_logged_and_reported(
    moto: Moto,
    consumer: Consumer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found: an exception escaping a record's processing (a bug: in the library, in a
    tracing hook) reported the record as failed but logged nothing, its traceback lost."""
    from fastapi_eventbus.worker._delivery import Processor

    queue_url = moto.queue()
    emit_through_sqs(moto, queue_url, {"n": 1}, {"n": 2})
    event = received_batch(moto, queue_url, 2)
    event["Records"][0]["messageId"] = "bad"
    process = Processor.process

    async def buggy(self: Processor, held: Any) -> None:
        if held.message.message_id == "bad":
            raise RuntimeError("a bug in processing")
        await process(self, held)

    monkeypatch.setattr(Processor, "process", buggy)
    with caplog.at_level(logging.ERROR, "fastapi_eventbus"):
        result = lambda_sqs_handler(consumer.app)(event, FakeContext())
    assert failures(result) == ["bad"]
    assert sum(consumer.handled.values()) == 1
    (record,) = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert "bad" in record.getMessage()
    assert record.exc_info is not None


def test_a_decode_hook_reads_other_formats_as_in_the_worker(
    moto: Moto, consumer: Consumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's decode hook (the docs' example) works unchanged: it gets the record in
    ReceiveMessage's shape. A CloudEvent, which the hook leaves alone, is read as usual."""
    hook = load_module(ROOT / "docs/examples/worker_decode.py", monkeypatch).decode_legacy
    queue_url = moto.queue()
    ids = emit_through_sqs(moto, queue_url, {"n": 1})
    event = received_batch(moto, queue_url, 1)
    cloudevent = event["Records"][0]
    legacy = {**cloudevent, "messageId": "legacy", "body": '["order.legacy", {"n": 2}]'}
    event["Records"] = [cloudevent, legacy]
    handler = lambda_sqs_handler(consumer.app, decode=hook)
    try:
        assert failures(handler(event, FakeContext())) == []
    finally:
        handler.close()
    assert consumer.handled == Counter([*ids, "legacy"])  # the hook gave it the message id
    with pytest.raises(ConfigurationError, match="decode must be a callable"):
        lambda_sqs_handler(consumer.app, decode="json")  # type: ignore[arg-type]


def test_bad_arguments_and_events() -> None:
    with pytest.raises(ConfigurationError, match=r"bus\.install"):
        lambda_sqs_handler(FastAPI())
    app = FastAPI()
    EventBus().install(app)
    with pytest.raises(ConfigurationError, match="on_unhandled"):
        lambda_sqs_handler(app, on_unhandled="drop")  # type: ignore[arg-type]
    handler = lambda_sqs_handler(app)
    try:
        with pytest.raises(ConfigurationError, match="Records"):
            handler({"detail": {}}, FakeContext())
    finally:
        handler.close()


def test_the_docs_example_handles_the_aws_example_event() -> None:
    """``docs/examples/lambda_app.py``, given a record like AWS's documented example event."""
    import importlib.util

    from fastapi_eventbus.wire import sqs_body
    from tests._support import ROOT

    spec = importlib.util.spec_from_file_location(
        "lambda_app", ROOT / "docs/examples/lambda_app.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    event = Event(name="order.placed", payload={"order": 7})
    record = {
        "messageId": "059f36b4-87a3-44ab-83d2-661975830a7d",
        "receiptHandle": "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a...",
        "body": sqs_body(event),
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": "1545082649183",
            "SenderId": "AIDAIENQZJOLO23YVJ4VO",
            "ApproximateFirstReceiveTimestamp": "1545082649185",
        },
        "messageAttributes": {},
        "md5OfBody": "e4e68fb7bd0e697a0ae8f1bb342846b3",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-2:123456789012:my-queue",
        "awsRegion": "us-east-2",
    }
    unknown = {**record, "messageId": "2e1424d4-f796-459a-8184-9c92662be6da", "body": "{}"}
    try:
        result = module.handler({"Records": [record, unknown]}, FakeContext())
    finally:
        module.handler.close()
    assert result == {"batchItemFailures": [{"itemIdentifier": unknown["messageId"]}]}
    assert module.shipped == ["7 from eu-1"]


def test_a_handler_raising_system_exit_fails_its_record_only(moto: Moto) -> None:
    """Found: a handler (or a library it calls) raising `SystemExit` escaped its record's
    task: the invocation raised instead of answering, and the good records of the batch were
    not handled; they all came back, and kept coming back together."""
    bus = EventBus()
    app = FastAPI()
    handled: list[str] = []

    @bus.on("order.*")
    async def handle(event: Event) -> None:
        if event.payload.get("exit"):
            raise SystemExit(3)  # e.g. a CLI helper calling sys.exit
        handled.append(event.id)

    bus.install(app)
    queue_url = moto.queue()
    ids = emit_through_sqs(moto, queue_url, {"n": 1}, {"n": 2, "exit": True}, {"n": 3})
    event = received_batch(moto, queue_url, 3)
    bad = [r["messageId"] for r in event["Records"] if '"exit":true' in r["body"]]
    handler = lambda_sqs_handler(app)
    try:
        result = handler(event, FakeContext())
    finally:
        handler.close()
    assert failures(result) == bad
    assert sorted(handled) == sorted([ids[0], ids[2]])


STUBBORN_FUNCTION = """
import asyncio, logging, time
from fastapi import FastAPI
from fastapi_eventbus import Event, EventBus, wire
from fastapi_eventbus.serverless import lambda_sqs_handler

logging.basicConfig()
bus = EventBus(handler_timeout=None, shutdown_timeout=0.5)
app = FastAPI()
bus.install(app)


@bus.on("order.*")
async def stubborn(event: Event) -> None:
    while True:  # catches its cancellation and goes on
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass


class Context:
    started = time.monotonic()

    def get_remaining_time_in_millis(self) -> int:
        return int((0.5 - (time.monotonic() - self.started)) * 1000)


record = {
    "messageId": "m1",
    "receiptHandle": "r1",
    "body": wire.sqs_body(Event(name="order.placed")),
    "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:orders",
}
handler = lambda_sqs_handler(app, time_margin=0.1)
print(handler({"Records": [record]}, Context()), flush=True)
# the interpreter's exit calls handler.close() (atexit), as the Lambda runtime's shutdown does
"""


def test_the_process_exits_when_a_handler_ignores_cancellation(tmp_path: Path) -> None:
    """Found: a record cut off at the invocation's time limit is left running, by design;
    `close()`, which the interpreter's exit calls, then waited for it forever: the process
    never ended."""
    script = tmp_path / "function.py"
    script.write_text(STUBBORN_FUNCTION)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert time.monotonic() - started < 20
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{'batchItemFailures': [{'itemIdentifier': 'm1'}]}"
    assert "the event loop is closed without them" in done.stderr
