"""`SQSForwarder` against a real SQS: moto's server, spoken to by aiobotocore over HTTP.

Tests that deliver send through the forwarder's real client to moto and read the
queue back; an unreachable broker is a port nothing listens on, or moto stopped.
The one stand-in is `FakeSQSClientReturningFailed`, for the answers moto never
gives (``Failed`` entries, throttling). The rest are configuration and emit-time
checks, and the translation of botocore's exceptions.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_eventbus import (
    ConfigurationError,
    Event,
    EventBus,
    ForwarderError,
    InvalidEventError,
    MissingExtraError,
    get_bus,
)
from fastapi_eventbus._brokers import aws
from fastapi_eventbus.forwarders import DeadLetter, Retry
from fastapi_eventbus.forwarders.sqs import MAX_MESSAGE_BYTES, SQSForwarder
from fastapi_eventbus.testing import capture
from fastapi_eventbus.wire import decode_message
from tests._support import wait_for
from tests.conftest import serve
from tests.forwarders._moto import KEY_ID, REGION, SECRET, Moto, running_moto, start_moto, stop_moto

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import (
        BatchResultErrorEntryTypeDef,
        MessageTypeDef,
        SendMessageBatchRequestEntryTypeDef,
        SendMessageBatchResultTypeDef,
    )

Bus = Annotated[EventBus, Depends(get_bus)]
Calls = list[list["SendMessageBatchRequestEntryTypeDef"]]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
FAST_RETRY = Retry(attempts=3, initial_delay=0.01, max_delay=0.02, total_timeout=5)


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with running_moto() as server:
        yield server


# -- helpers ----------------------------------------------------------------------


def starting(forwarder: SQSForwarder) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """A lifespan that starts *forwarder*, so that tests can hook its client before requests."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await forwarder.ensure_started()
        yield

    return lifespan


def orders_app(
    forwarder: SQSForwarder,
    *,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
) -> tuple[FastAPI, EventBus]:
    """An app whose ``POST /orders/{count}`` emits *count* ``order.placed`` events."""
    bus = EventBus(source="//tests/orders")
    app = FastAPI(lifespan=lifespan)
    bus.install(app)
    bus.forward("order.*", forwarder)

    @app.post("/orders/{count}")
    async def place(count: int, bus: Bus, customer: str = "ada", size: int = 0) -> list[str]:
        return [
            bus.emit("order.placed", {"n": n, "customer": customer, "pad": "x" * size}).id
            for n in range(count)
        ]

    @app.post("/huge")
    async def huge(bus: Bus) -> dict[str, str]:
        try:
            bus.emit("order.placed", {"blob": "x" * MAX_MESSAGE_BYTES})
        except InvalidEventError as exc:
            return {"error": str(exc)}
        return {"error": ""}

    @app.get("/ping")
    async def ping() -> str:
        return "pong"

    return app, bus


def record_batches(forwarder: SQSForwarder) -> Calls:
    """Record the entries of every ``SendMessageBatch`` call the forwarder's real client makes."""
    calls: Calls = []

    def before_call(params: dict[str, Any], **_: Any) -> None:
        calls.append(list(params["Entries"]))

    forwarder.client.meta.events.register(
        "before-parameter-build.sqs.SendMessageBatch", before_call
    )
    return calls


def payload_bytes(entries: Sequence[SendMessageBatchRequestEntryTypeDef]) -> int:
    """What SQS counts against the per-call limit: bodies and attributes."""
    total = 0
    for entry in entries:
        total += len(entry["MessageBody"].encode())
        for name, value in entry.get("MessageAttributes", {}).items():
            total += len(name) + len(value["DataType"]) + len(value.get("StringValue", ""))
    return total


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def decoded(messages: Sequence[MessageTypeDef]) -> dict[str, Event]:
    return {event.id: event for event in map(decode_message, messages)}


# -- delivery through the flush -------------------------------------------------------


def test_events_of_several_requests_arrive_as_cloudevents(moto: Moto) -> None:
    url = moto.queue()
    app, bus = orders_app(moto.forwarder(url))
    with capture(bus) as seen, TestClient(app) as client:
        for count in (3, 1, 5):
            assert client.post(f"/orders/{count}").status_code == 200
    messages = moto.receive(url, 9)
    received = decoded(messages)
    assert set(received) == {event.id for event in seen.emitted}
    for event in seen.emitted:
        got = received[event.id]
        assert (got.name, got.payload, got.time) == (event.name, event.payload, event.time)
        assert got.source == "//tests/orders"
    for message in messages:
        body = json.loads(message["Body"])
        assert set(body) == {
            "specversion",
            "id",
            "source",
            "type",
            "time",
            "datacontenttype",
            "data",
        }
        assert (body["specversion"], body["datacontenttype"]) == ("1.0", "application/json")
        assert "MessageAttributes" not in message  # no trace context: no attributes at all


@pytest.mark.anyio
async def test_trace_context_travels_in_message_attributes_never_in_the_body(moto: Moto) -> None:
    url = await moto.create_queue()
    trace = {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
    event = Event(name="order.placed", payload={"n": 1}, trace_context=trace)
    async with moto.forwarder(url) as forwarder:
        await forwarder.deliver([event])
        size = forwarder.encoded_size(event)
    [message] = await moto.receive_async(url, 1)
    assert message["MessageAttributes"] == {
        "traceparent": {"DataType": "String", "StringValue": TRACEPARENT},
        "tracestate": {"DataType": "String", "StringValue": "vendor=1"},
    }
    assert "traceparent" not in message["Body"]
    assert TRACEPARENT not in message["Body"]
    assert decode_message(message).trace_context == trace
    attributes = len("traceparentString" + TRACEPARENT) + len("tracestateStringvendor=1")
    assert size == len(message["Body"].encode()) + attributes


def test_25_events_in_one_request_take_3_batch_calls(moto: Moto) -> None:
    url = moto.queue()
    forwarder = moto.forwarder(url)
    app, _ = orders_app(forwarder, lifespan=starting(forwarder))
    with TestClient(app) as client:
        calls = record_batches(forwarder)
        ids = client.post("/orders/25").json()
    assert sorted(len(call) for call in calls) == [5, 10, 10]
    assert set(decoded(moto.receive(url, 25))) == set(ids)


def test_large_events_are_split_by_size_not_only_by_count(moto: Moto) -> None:
    url = moto.queue()
    forwarder = moto.forwarder(url)
    app, _ = orders_app(forwarder, lifespan=starting(forwarder))
    with TestClient(app) as client:
        calls = record_batches(forwarder)
        ids = client.post("/orders/10", params={"size": 100_000}).json()
    assert len(calls) == 5  # two ~100 KB messages per call: a third would pass 256 KiB
    for call in calls:
        assert payload_bytes(call) <= MAX_MESSAGE_BYTES
    assert set(decoded(moto.receive(url, 10))) == set(ids)


def test_fifo_queue_keeps_the_order_of_each_group(moto: Moto) -> None:
    url = moto.queue("orders", fifo=True)
    forwarder = moto.forwarder(url, message_group_id=lambda event: event.payload["customer"])
    app, bus = orders_app(forwarder, lifespan=starting(forwarder))
    with capture(bus) as seen, TestClient(app) as client:
        calls = record_batches(forwarder)
        for _ in range(4):
            for customer in ("ada", "bob", "cy"):
                client.post("/orders/4", params={"customer": customer})
    assert [len(call) for call in calls] == [4] * 12
    messages = moto.receive(url, 48)
    received: dict[str, list[str]] = {}
    for message in messages:
        attributes = message["Attributes"]
        event = decode_message(message)
        assert attributes["MessageGroupId"] == event.payload["customer"]
        assert attributes["MessageDeduplicationId"] == event.id
        received.setdefault(event.payload["customer"], []).append(event.id)
    for customer in ("ada", "bob", "cy"):
        sent = [e.id for e in seen.emitted if e.payload["customer"] == customer]
        assert received[customer] == sent


def test_fifo_calls_of_one_flush_are_made_in_order(moto: Moto) -> None:
    url = moto.queue("orders", fifo=True)
    forwarder = moto.forwarder(url, message_group_id=lambda event: "all")
    app, _ = orders_app(forwarder, lifespan=starting(forwarder))
    with TestClient(app) as client:
        calls = record_batches(forwarder)
        ids = client.post("/orders/23").json()
    assert [[entry["Id"] for entry in call] for call in calls] == [
        [str(n) for n in range(10)],
        [str(n) for n in range(10, 20)],
        [str(n) for n in range(20, 23)],
    ]
    assert [event.id for event in map(decode_message, moto.receive(url, 23))] == ids


def test_a_message_over_the_limit_is_refused_at_emit(moto: Moto) -> None:
    url = moto.queue()
    forwarder = moto.forwarder(url)
    app, _ = orders_app(forwarder, lifespan=starting(forwarder))
    with TestClient(app) as client:
        calls = record_batches(forwarder)
        error = client.post("/huge").json()["error"]
    assert f"over the {MAX_MESSAGE_BYTES}-byte limit of forwarder SQSForwarder" in error
    assert calls == []
    moto.receive(url, 0)


def test_the_limit_counts_body_and_attributes_to_the_byte(moto: Moto) -> None:
    forwarder = moto.forwarder(moto.queue(), max_message_bytes=1_000)
    trace = {"traceparent": TRACEPARENT}
    probe = Event(name="order.placed", payload="", trace_context=trace)
    room = 1_000 - forwarder.encoded_size(probe)
    forwarder.check(probe.model_copy(update={"payload": "x" * room}))
    with pytest.raises(InvalidEventError, match="1001-byte message, over the 1000-byte"):
        forwarder.check(probe.model_copy(update={"payload": "x" * (room + 1)}))


# -- failures -------------------------------------------------------------------------


def test_broker_stopped_mid_run_then_restarted_gets_everything(
    moto: Moto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_eventbus")
    url = moto.queue()  # moto's queues are process-wide: the second server serves it too
    broker = start_moto()
    port = broker.get_host_and_port()[1]
    letters: list[DeadLetter] = []
    forwarder = SQSForwarder(
        url,
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        retry=Retry(attempts=100, initial_delay=0.05, max_delay=0.2, total_timeout=30),
        dead_letter=letters.append,
    )
    app, _ = orders_app(forwarder)
    try:
        with serve(app) as base, httpx.Client(base_url=base) as client:
            before = client.post("/orders/2").json()
            assert set(decoded(moto.receive(url, 2))) == set(before)
            stop_moto(broker)
            during = client.post("/orders/3").json() + client.post("/orders/1").json()
            wait_for(lambda: "retrying in" in caplog.text, timeout=10)
            broker = start_moto(port)
            assert set(decoded(moto.receive(url, 4))) == set(during)
    finally:
        stop_moto(broker)
    assert letters == []
    assert "cannot reach SQS" in caplog.text


def test_broker_gone_for_good_dead_letters_exactly_the_undelivered_ids(
    caplog: pytest.LogCaptureFixture,
) -> None:
    letters: list[DeadLetter] = []
    forwarder = SQSForwarder(
        "http://127.0.0.1:1/123456789012/orders",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        # Waits of at least 0.2 + 0.4 + 0.4 s: 1 s before giving up.
        retry=Retry(attempts=4, initial_delay=0.4, max_delay=0.8, total_timeout=10),
        dead_letter=letters.append,
    )
    app, _ = orders_app(forwarder)
    sent: list[list[str]] = []
    with serve(app) as base, httpx.Client(base_url=base) as client:
        client.get("/ping")
        for count in (3, 2):
            started = time.perf_counter()
            sent.append(client.post(f"/orders/{count}").json())
            assert time.perf_counter() - started < 0.5  # the response does not wait
        wait_for(lambda: len(letters) == 2, timeout=10)
    assert sorted(letter.ids for letter in letters) == sorted(sent)
    for letter in letters:
        assert letter.forwarder == "SQSForwarder"
        assert letter.reason.startswith("gave up after 4 attempt(s)")
        assert isinstance(letter.exception, ForwarderError)
        assert letter.exception.transient
        assert type(letter.exception.__cause__).__name__ == "EndpointConnectionError"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert {r.getMessage().rsplit(": ", 1)[1] for r in errors} == {", ".join(s) for s in sent}


@pytest.mark.anyio
async def test_a_missing_queue_is_not_retried(moto: Moto) -> None:
    letters: list[DeadLetter] = []
    url = moto.endpoint + "/123456789012/no-such-queue"
    async with moto.forwarder(url, retry=FAST_RETRY, dead_letter=letters.append) as forwarder:
        calls = record_batches(forwarder)
        await forwarder.deliver([Event(name="order.placed")])
    assert len(calls) == 1
    [letter] = letters
    assert letter.reason.startswith("permanent failure")
    assert isinstance(letter.exception, ForwarderError)
    assert not letter.exception.transient
    assert "NonExistentQueue" in str(letter.exception)


class FakeSQSClientReturningFailed:
    """The only fake in these tests: it stands in for the aiobotocore client's batch call.

    Moto never answers ``SendMessageBatch`` with ``Failed`` entries, nor throttles.
    This passes every entry to the real client's method except those of events in
    *fail_once* (failed once with ``SenderFault=False``, as for an SQS-side error)
    and in *reject* (always failed with ``SenderFault=True``); a call with an event
    of *throttle_once* fails whole, once, with botocore's ``ThrottlingException``.
    """

    def __init__(
        self,
        client: SQSClient,
        *,
        fail_once: Collection[str] = (),
        reject: Collection[str] = (),
        throttle_once: Collection[str] = (),
    ) -> None:
        self.real_send = client.send_message_batch
        self.fail_once = set(fail_once)
        self.reject = set(reject)
        self.throttle_once = set(throttle_once)
        self.calls: list[list[str]] = []
        """The event ids of every call."""

    async def send_message_batch(
        self, *, QueueUrl: str, Entries: Sequence[SendMessageBatchRequestEntryTypeDef]
    ) -> SendMessageBatchResultTypeDef:
        from botocore.exceptions import ClientError

        ids = [json.loads(entry["MessageBody"])["id"] for entry in Entries]
        self.calls.append(ids)
        if throttled := self.throttle_once.intersection(ids):
            self.throttle_once -= throttled
            error: Any = {
                "Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"},
                "ResponseMetadata": {"HTTPStatusCode": 400},
            }
            raise ClientError(error, "SendMessageBatch")
        failed: list[BatchResultErrorEntryTypeDef] = []
        passed = []
        for event_id, entry in zip(ids, Entries, strict=True):
            if event_id in self.reject:
                failed.append(
                    {"Id": entry["Id"], "SenderFault": True, "Code": "InvalidMessageContents"}
                )
            elif event_id in self.fail_once:
                self.fail_once.discard(event_id)
                failed.append({"Id": entry["Id"], "SenderFault": False, "Code": "InternalError"})
            else:
                passed.append(entry)
        response = await self.real_send(QueueUrl=QueueUrl, Entries=passed)
        response["Failed"] = [*response.get("Failed", []), *failed]
        return response


@pytest.mark.anyio
async def test_failed_entries_are_retried_unless_the_sender_is_at_fault(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = await moto.create_queue()
    letters: list[DeadLetter] = []
    events = [Event(name="order.placed", payload={"n": n}) for n in range(12)]
    ids = [event.id for event in events]
    async with moto.forwarder(url, retry=FAST_RETRY, dead_letter=letters.append) as forwarder:
        fake = FakeSQSClientReturningFailed(
            forwarder.client, fail_once={ids[1], ids[11]}, reject={ids[4]}
        )
        monkeypatch.setattr(forwarder.client, "send_message_batch", fake.send_message_batch)
        await forwarder.deliver(events)
    assert sorted(map(len, fake.calls)) == [2, 2, 10]  # then only the two to retry
    assert sorted(fake.calls[-1]) == sorted([ids[1], ids[11]])
    [letter] = letters
    assert letter.ids == [ids[4]]
    assert letter.reason.startswith("rejected:")
    assert "InvalidMessageContents" in letter.reason
    received = decoded(await moto.receive_async(url, 11))
    assert set(received) == set(ids) - {ids[4]}


@pytest.mark.anyio
async def test_fifo_holds_back_later_calls_behind_a_failed_entry(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = await moto.create_queue("orders", fifo=True)
    events = [Event(name="order.placed", payload={"n": n}) for n in range(23)]
    ids = [event.id for event in events]
    forwarder = moto.forwarder(url, message_group_id=lambda event: "all", retry=FAST_RETRY)
    async with forwarder:
        fake = FakeSQSClientReturningFailed(forwarder.client, fail_once={ids[3]}, reject=set())
        monkeypatch.setattr(forwarder.client, "send_message_batch", fake.send_message_batch)
        await forwarder.deliver(events)
    # The first call fails one entry: the two later calls wait for the retry.
    assert fake.calls == [ids[:10], [ids[3], *ids[10:19]], ids[19:]]
    received = [decode_message(m).id for m in await moto.receive_async(url, 23)]
    assert received == [*ids[:3], *ids[4:10], ids[3], *ids[10:]]


@pytest.mark.anyio
async def test_an_event_that_cannot_be_encoded_any_more_is_dead_lettered_alone(
    moto: Moto,
) -> None:
    """Resent events (a spool's, an outbox's) were checked by the release that emitted
    them: one that this release's ``message_group_id`` refuses is dead-lettered alone,
    and the others of its send go through (the whole send was dead-lettered)."""
    url = await moto.create_queue("orders", fifo=True)
    events = [Event(name="order.paid", payload={"customer": f"c{n}"}) for n in range(5)]
    old = Event(name="order.paid", payload={"order": 1})  # written before `customer` was
    events.insert(2, old)
    letters: list[DeadLetter] = []
    forwarder = moto.forwarder(
        url,
        message_group_id=lambda event: event.payload["customer"],
        dead_letter=letters.append,
        retry=FAST_RETRY,
    )
    async with forwarder:
        outcome = await forwarder.deliver(events)
    [letter] = letters
    assert letter.ids == [old.id]
    assert "message_group_id" in letter.reason
    assert "KeyError" in letter.reason
    received = decoded(await moto.receive_async(url, 5))
    assert set(received) == {event.id for event in events} - {old.id}
    assert outcome.unsent == []


@pytest.mark.anyio
async def test_a_queue_url_off_aws_is_its_own_endpoint(moto: Moto) -> None:
    """Found: without ``endpoint_url``, a LocalStack or moto queue URL (or a VPC endpoint's)
    was sent to AWS's public endpoint for the region, not to the host the URL names."""
    from fastapi_eventbus.worker import SQSSource

    url = await moto.create_queue("orders")
    keys: dict[str, Any] = {
        "region_name": REGION,
        "aws_access_key_id": KEY_ID,
        "aws_secret_access_key": SECRET,
    }
    event = Event(name="order.placed", payload={"n": 1})
    async with SQSForwarder(url, retry=FAST_RETRY, **keys) as forwarder:
        outcome = await forwarder.deliver([event])
    assert (outcome.unsent, outcome.dead) == ([], [])
    async with SQSSource(url, wait_time_seconds=0, **keys) as source:
        [message] = await source.receive(10)
        assert source.decode(message).id == event.id
        await source.ack(message)


@pytest.mark.anyio
async def test_one_message_the_queue_refuses_is_dead_lettered_alone(moto: Moto) -> None:
    """Found: a queue whose MaximumMessageSize is below the forwarder's limit fails the whole
    ``SendMessageBatch`` for one message over it, and every event of the send was
    dead-lettered, the four good ones too."""
    url = await moto.create_queue("orders", attributes={"MaximumMessageSize": "1024"})
    events = [Event(name="order.placed", payload={"n": n}) for n in range(4)]
    big = Event(name="order.placed", payload={"pad": "x" * 1500})
    events.insert(2, big)
    letters: list[DeadLetter] = []
    async with moto.forwarder(url, retry=FAST_RETRY, dead_letter=letters.append) as forwarder:
        outcome = await forwarder.deliver(events)
    [letter] = letters
    assert letter.ids == [big.id]
    assert letter.reason.startswith("permanent failure")
    received = decoded(await moto.receive_async(url, 4))
    assert set(received) == {event.id for event in events} - {big.id}
    assert outcome.unsent == []


@pytest.mark.anyio
async def test_a_throttled_call_is_retried_while_the_others_go_through(
    moto: Moto, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = await moto.create_queue()
    events = [Event(name="order.placed", payload={"n": n}) for n in range(25)]
    ids = [event.id for event in events]
    async with moto.forwarder(url, retry=FAST_RETRY) as forwarder:
        fake = FakeSQSClientReturningFailed(forwarder.client, throttle_once={ids[12]})
        monkeypatch.setattr(forwarder.client, "send_message_batch", fake.send_message_batch)
        await forwarder.deliver(events)
    assert sorted(map(sorted, fake.calls)) == sorted(
        map(sorted, [ids[:10], ids[10:20], ids[20:], ids[10:20]])
    )
    assert "ThrottlingException" in caplog.text
    assert set(decoded(await moto.receive_async(url, 25))) == set(ids)  # each once


@pytest.mark.anyio
async def test_fifo_holds_back_later_calls_behind_a_throttled_one(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = await moto.create_queue("orders", fifo=True)
    events = [Event(name="order.placed", payload={"n": n}) for n in range(25)]
    ids = [event.id for event in events]
    forwarder = moto.forwarder(url, message_group_id=lambda event: "all", retry=FAST_RETRY)
    async with forwarder:
        fake = FakeSQSClientReturningFailed(forwarder.client, throttle_once={ids[12]})
        monkeypatch.setattr(forwarder.client, "send_message_batch", fake.send_message_batch)
        await forwarder.deliver(events)
    assert fake.calls == [ids[:10], ids[10:20], ids[10:20], ids[20:]]
    assert [decode_message(m).id for m in await moto.receive_async(url, 25)] == ids


@pytest.mark.anyio
async def test_a_client_that_cannot_be_created_dead_letters_without_retrying(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for variable in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    letters: list[DeadLetter] = []
    forwarder = SQSForwarder(
        "http://127.0.0.1:1/123456789012/orders",
        aws_access_key_id="a",
        aws_secret_access_key="b",
        retry=FAST_RETRY,
        dead_letter=letters.append,
    )
    await forwarder.deliver([Event(name="order.placed")])
    [letter] = letters
    assert letter.reason.startswith("permanent failure")
    assert isinstance(letter.exception, ForwarderError)
    assert type(letter.exception.__cause__).__name__ == "NoRegionError"


# -- start-up checks (verify_on_start) --------------------------------------------------


def startup_error(app: FastAPI) -> str:
    """The message of the `ForwarderError` that stops *app*'s startup."""
    with pytest.raises(ForwarderError) as caught, TestClient(app):
        pytest.fail("the app started")
    return str(caught.value)


CHECK_FAILED = "forwarder SQSForwarder failed its start-up check (verify_on_start=True): "


def test_a_missing_queue_stops_the_app_at_startup(moto: Moto) -> None:
    url = moto.endpoint + "/123456789012/no-such-queue"
    app, _ = orders_app(moto.forwarder(url, verify_on_start=True))
    message = startup_error(app)
    assert message.startswith(f"{CHECK_FAILED}GetQueueAttributes on {url}: ")
    assert "NonExistentQueue (HTTP 400)" in message


def test_without_verify_on_start_a_missing_queue_is_found_at_the_first_send(moto: Moto) -> None:
    letters: list[DeadLetter] = []
    url = moto.endpoint + "/123456789012/no-such-queue"
    app, _ = orders_app(moto.forwarder(url, dead_letter=letters.append))
    with TestClient(app) as client:
        ids = client.post("/orders/2").json()
    [letter] = letters
    assert letter.ids == ids
    assert "NonExistentQueue" in letter.reason


def test_a_forwarder_without_a_region_stops_the_app_at_startup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for variable in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    forwarder = SQSForwarder(
        "http://127.0.0.1:1/123456789012/orders",
        aws_access_key_id="a",
        aws_secret_access_key="b",
        verify_on_start=True,
    )
    app, _ = orders_app(forwarder)
    assert startup_error(app) == (
        f"{CHECK_FAILED}no AWS region: pass region_name=, or set AWS_DEFAULT_REGION"
    )


def test_missing_credentials_stop_the_app_at_startup(
    moto: Moto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    for variable in ("AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to ask
    url = moto.queue()
    forwarder = SQSForwarder(
        url, endpoint_url=moto.endpoint, region_name="us-east-1", verify_on_start=True
    )
    app, _ = orders_app(forwarder)
    assert startup_error(app) == (
        f"{CHECK_FAILED}GetQueueAttributes on {url}: no AWS credentials found "
        "(environment, ~/.aws, container or instance role)"
    )


def test_a_queue_taking_smaller_messages_than_max_message_bytes_stops_the_app(
    moto: Moto,
) -> None:
    url = moto.queue(attributes={"MaximumMessageSize": "1024"})
    app, _ = orders_app(moto.forwarder(url, verify_on_start=True))
    assert startup_error(app) == (
        f"{CHECK_FAILED}{url} takes messages of up to 1024 bytes (its MaximumMessageSize), "
        "less than max_message_bytes=262144: pass max_message_bytes=1024, or raise the "
        "queue's MaximumMessageSize"
    )
    app, _ = orders_app(moto.forwarder(url, verify_on_start=True, max_message_bytes=1024))
    with TestClient(app) as client:
        ids = client.post("/orders/2").json()
    assert set(decoded(moto.receive(url, 2))) == set(ids)


def test_a_verified_forwarder_starts_and_sends(moto: Moto) -> None:
    url = moto.queue()
    app, _ = orders_app(moto.forwarder(url, verify_on_start=True))
    with TestClient(app) as client:
        ids = client.post("/orders/3").json()
    assert set(decoded(moto.receive(url, 3))) == set(ids)


def _translate(exc: Exception, forwarder: str) -> ForwarderError | None:
    """The `ForwarderError` the forwarder raises for *exc*, or None if *exc* passes through."""
    with pytest.raises(Exception) as raised, aws.translated(forwarder, ForwarderError):
        raise exc
    if not isinstance(raised.value, ForwarderError):
        assert raised.value is exc
        return None
    assert raised.value.__cause__ is exc
    assert str(raised.value).startswith(f"{forwarder}: ")
    return raised.value


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [
        (503, "ServiceUnavailable", True),
        (500, "InternalError", True),
        (400, "RequestThrottled", True),
        (400, "ThrottlingException", True),
        (429, "TooManyRequests", True),
        (400, "AWS.SimpleQueueService.NonExistentQueue", False),
        (403, "AccessDenied", False),
        (400, "InvalidParameterValue", False),
    ],
)
def test_sdk_errors_are_translated(status: int, code: str, transient: bool) -> None:
    from botocore.exceptions import ClientError

    response: Any = {
        "Error": {"Code": code, "Message": "no"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    error = _translate(ClientError(response, "SendMessageBatch"), "orders")
    assert error is not None
    assert error.transient is transient
    assert code in str(error)


def test_connection_errors_are_transient_and_others_are_left_alone() -> None:
    from botocore.exceptions import (
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    url = "http://127.0.0.1:1"
    for exc in (
        EndpointConnectionError(endpoint_url=url),
        ConnectionClosedError(endpoint_url=url),
        ReadTimeoutError(endpoint_url=url),
    ):
        error = _translate(exc, "orders")
        assert error is not None
        assert error.transient, exc
    no_credentials = _translate(NoCredentialsError(), "orders")
    assert no_credentials is not None
    assert not no_credentials.transient
    assert _translate(ValueError("a bug"), "orders") is None


# -- the bus and the forwarder's life ---------------------------------------------------


@pytest.mark.anyio
async def test_publish_forwards_and_waits(moto: Moto) -> None:
    url = await moto.create_queue()
    bus = EventBus()
    forwarder = moto.forwarder(url)
    bus.forward("order.*", forwarder)
    event = await bus.publish("order.placed", {"id": 7})
    await bus.publish("user.created", {"id": 8})  # not forwarded
    [message] = await moto.receive_async(url, 1, timeout=0)
    assert decode_message(message).id == event.id
    await bus.close()
    with pytest.raises(ForwarderError, match="has not started"):
        forwarder.client  # noqa: B018 - closed with the bus


def test_the_lifespan_opens_the_client_at_startup_and_closes_it(moto: Moto) -> None:
    url = moto.queue()
    forwarder = moto.forwarder(url)
    app, _ = orders_app(forwarder)
    with TestClient(app) as client:
        opened = forwarder.client  # before any request
        client.post("/orders/1")
        assert forwarder.client is opened
    with pytest.raises(ForwarderError, match="has not started"):
        forwarder.client  # noqa: B018
    moto.receive(url, 1)


# Each request of a bare TestClient runs on its own event loop, which is closed after it:
# the clients opened on those loops are never closed (no lifespan), and aiohttp warns when
# they are garbage-collected. Collected here, inside the test, so no other test sees that.
@pytest.mark.filterwarnings("ignore:Unclosed:ResourceWarning")
def test_an_app_without_its_lifespan_opens_a_client_per_event_loop(
    moto: Moto, caplog: pytest.LogCaptureFixture
) -> None:
    url = moto.queue()

    def two_requests() -> list[str]:
        forwarder = moto.forwarder(url)
        app, _ = orders_app(forwarder)
        client = TestClient(app)  # no `with`: no lifespan, and a new event loop per request
        ids: list[str] = client.post("/orders/2").json()
        first = forwarder.client
        ids += client.post("/orders/1").json()
        assert forwarder.client is not first  # abandoned, and a new one opened
        return ids

    ids = two_requests()
    gc.collect()
    assert set(decoded(moto.receive(url, 3))) == set(ids)
    restarts = [r for r in caplog.records if "another event loop" in r.getMessage()]
    assert len(restarts) == 1
    assert restarts[0].levelno == logging.WARNING
    assert restarts[0].getMessage().startswith("forwarder SQSForwarder: ")


@pytest.mark.anyio
async def test_region_comes_from_an_aws_queue_url() -> None:
    url = "https://sqs.eu-west-3.amazonaws.com/123456789012/orders"
    async with SQSForwarder(url, aws_access_key_id="a", aws_secret_access_key="b") as forwarder:
        assert forwarder.client.meta.region_name == "eu-west-3"
    legacy = "https://ap-south-1.queue.amazonaws.com/123456789012/orders"
    async with SQSForwarder(
        legacy, region_name="us-west-2", aws_access_key_id="a", aws_secret_access_key="b"
    ) as forwarder:
        assert forwarder.client.meta.region_name == "us-west-2"  # explicit wins


@pytest.mark.anyio
async def test_sending_before_start_is_an_error() -> None:
    url = "https://sqs.eu-west-3.amazonaws.com/123456789012/orders"
    forwarder = SQSForwarder(url, aws_access_key_id="a", aws_secret_access_key="b")
    with pytest.raises(ForwarderError, match="has not started"):
        await forwarder.send([Event(name="order.placed")])


# -- configuration -------------------------------------------------------------------------


def test_repr_shows_no_credentials() -> None:
    forwarder = SQSForwarder(
        "https://sqs.us-east-1.amazonaws.com/1/orders",
        aws_access_key_id="AKIAEXAMPLEKEY",
        aws_secret_access_key="SECRETsecret",
        aws_session_token="TOKENtoken",
    )
    for text in (repr(forwarder), str(forwarder), repr(vars(forwarder).get("_settings"))):
        assert "AKIAEXAMPLEKEY" not in text
        assert "SECRETsecret" not in text
        assert "TOKENtoken" not in text
    assert "orders" in repr(forwarder)


def test_a_fifo_queue_needs_a_message_group_id() -> None:
    with pytest.raises(ConfigurationError, match="message_group_id"):
        SQSForwarder("https://sqs.us-east-1.amazonaws.com/1/orders.fifo")


@pytest.mark.parametrize(
    "options",
    [
        {"queue_url": "orders"},
        {"aws_access_key_id": "only-the-key"},
        {"message_group_id": "customer"},
        {"max_message_bytes": 0},
        {"max_message_bytes": None},
    ],
)
def test_bad_settings_fail_in_the_constructor(options: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"queue_url": "https://sqs.us-east-1.amazonaws.com/1/q"}
    arguments.update(options)
    with pytest.raises(ConfigurationError):
        SQSForwarder(**arguments)


@pytest.mark.anyio
async def test_a_bad_message_group_id_fails_at_emit() -> None:
    bus = EventBus()
    bus.forward(
        "order.*",
        SQSForwarder(
            "https://sqs.us-east-1.amazonaws.com/1/orders.fifo",
            message_group_id=lambda event: event.payload["customer"],
        ),
    )
    with pytest.raises(InvalidEventError, match=r"message_group_id .* failed .*KeyError"):
        await bus.publish("order.placed", {"n": 1})
    with pytest.raises(InvalidEventError, match="1 to 128 characters"):
        await bus.publish("order.placed", {"customer": ""})


GOOD_GROUP = "Acme-42_" + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
"""Letters, digits and every ASCII punctuation character: a ``MessageGroupId`` AWS takes."""


@pytest.mark.parametrize("group", ["Acme Corp", "Zoë", "tab\there", "x" * 129])
def test_a_group_id_sqs_refuses_fails_at_emit(moto: Moto, group: str) -> None:
    """Found: the emit-time check took any str of 1 to 128 characters, where SQS takes only
    letters, digits and ASCII punctuation in a ``MessageGroupId``: a space or an accented
    letter passed ``emit`` and was refused only at send, in the background. It is refused in
    the caller; a group of every character SQS takes is sent as it is."""
    url = moto.queue("orders", fifo=True)
    forwarder = moto.forwarder(url, message_group_id=lambda event: event.payload["customer"])
    bus = EventBus()
    bus.forward("order.*", forwarder)

    async def publish() -> Event:
        with pytest.raises(InvalidEventError, match=r"letter or digit .* ASCII punctuation"):
            await bus.publish("order.placed", {"customer": group})
        try:
            return await bus.publish("order.placed", {"customer": GOOD_GROUP})
        finally:
            await forwarder.aclose()

    event = asyncio.run(publish())
    [message] = moto.receive(url, 1)
    assert decode_message(message).id == event.id
    assert message["Attributes"]["MessageGroupId"] == GOOD_GROUP


@pytest.mark.anyio
async def test_characters_sqs_refuses_fail_at_emit() -> None:
    bus = EventBus()
    bus.forward("order.*", SQSForwarder("https://sqs.us-east-1.amazonaws.com/1/orders"))
    with pytest.raises(InvalidEventError, match="a character SQS refuses"):
        await bus.publish("order.placed", {"note": "\uffff"})


def test_a_missing_aiobotocore_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "aiobotocore" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingExtraError, match=r"fastapi-eventbus-di\[aws\]") as caught:
        SQSForwarder("https://sqs.us-east-1.amazonaws.com/1/orders")
    assert caught.value.extra == "aws"


def test_creating_a_forwarder_does_not_import_the_sdk() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from fastapi_eventbus.forwarders.sqs import SQSForwarder\n"
        "SQSForwarder('https://sqs.us-east-1.amazonaws.com/1/orders')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('aiobotocore', 'botocore')]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
