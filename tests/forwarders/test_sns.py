"""`SNSForwarder` against a real SNS: moto's server, a topic with an SQS subscription.

Every delivery goes through the forwarder's real aiobotocore client to moto's SNS, which
delivers to a subscribed SQS queue (raw message delivery on or off) read back with
aiobotocore or consumed by a `Worker`. moto answers ``PublishBatch`` with a ``Failed``
entry (``SenderFault``) for a message over 256 KiB, so the dead-letter path of a partial
failure is tested on a real answer; the one stand-in is `FailingPublishBatch`, for the
answers moto never gives (a failed entry that is not the sender's fault, throttling).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fastapi_eventbus import (
    ConfigurationError,
    Event,
    EventBus,
    ForwarderError,
    InvalidEventError,
)
from fastapi_eventbus.forwarders import DeadLetter, Retry
from fastapi_eventbus.forwarders.sns import MAX_MESSAGE_BYTES, SNSForwarder
from fastapi_eventbus.testing import capture
from fastapi_eventbus.wire import decode_message, sqs_body
from tests.contracts.forwarder import ForwarderContract, MakeForwarder, ReceivedIds
from tests.forwarders import _fanout
from tests.forwarders._fanout import (
    TRACEPARENT,
    Consumer,
    sns_forwarder,
    subscribed_topic,
)
from tests.forwarders._moto import Moto, running_moto

if TYPE_CHECKING:
    from types_aiobotocore_sns import SNSClient
    from types_aiobotocore_sns.type_defs import (
        BatchResultErrorEntryTypeDef,
        PublishBatchRequestEntryTypeDef,
        PublishBatchResponseTypeDef,
    )

FAST_RETRY = Retry(attempts=3, initial_delay=0.01, max_delay=0.02, total_timeout=5)
TOPIC = "arn:aws:sns:eu-west-1:123456789012:orders"


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with running_moto() as server:
        yield server


def orders_app(forwarder: SNSForwarder) -> tuple[FastAPI, EventBus]:
    """An app whose ``POST /orders/{count}`` emits *count* ``order.placed`` events."""
    return _fanout.orders_app(forwarder, source="//tests/orders", huge=MAX_MESSAGE_BYTES)


def record_batches(forwarder: SNSForwarder) -> list[list[PublishBatchRequestEntryTypeDef]]:
    """Record the entries of every ``PublishBatch`` call the forwarder's real client makes."""
    calls: list[list[PublishBatchRequestEntryTypeDef]] = []

    def before_call(params: dict[str, Any], **_: Any) -> None:
        calls.append(list(params["PublishBatchRequestEntries"]))

    forwarder.client.meta.events.register("before-parameter-build.sns.PublishBatch", before_call)
    return calls


def call_bytes(entries: Sequence[PublishBatchRequestEntryTypeDef]) -> int:
    """What one ``PublishBatch`` call carries: messages and string attributes."""
    total = 0
    for entry in entries:
        total += len(entry["Message"].encode())
        for name, value in entry.get("MessageAttributes", {}).items():
            total += len(name) + len(value["DataType"]) + len(value.get("StringValue", ""))
    return total


# -- the contract -------------------------------------------------------------------------


class TestSNSForwarderContract(ForwarderContract):
    @pytest.fixture
    def queue_and_topic(self, moto: Moto) -> tuple[str, str]:
        queue = moto.queue()
        return queue, asyncio.run(subscribed_topic(moto, queue, raw=True))

    @pytest.fixture
    def make_forwarder(self, moto: Moto, queue_and_topic: tuple[str, str]) -> MakeForwarder:
        return lambda: sns_forwarder(moto, queue_and_topic[1])

    @pytest.fixture
    def received_ids(self, moto: Moto, queue_and_topic: tuple[str, str]) -> ReceivedIds:
        async def ids(count: int) -> list[str]:
            found = await moto.collect_ids(queue_and_topic[0], lambda c: c.total() >= count, 10)
            return list(found.elements())

        return ids

    @pytest.fixture
    def make_failing_forwarder(self, moto: Moto) -> MakeForwarder:
        return lambda: sns_forwarder(moto, "arn:aws:sns:us-east-1:123456789012:no-such-topic")


# -- delivery through the flush, to a subscribed queue ------------------------------------


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "notification"])
def test_events_of_several_requests_reach_the_subscribed_queue(moto: Moto, raw: bool) -> None:
    queue = moto.queue()
    topic = asyncio.run(subscribed_topic(moto, queue, raw=raw))
    app, bus = orders_app(sns_forwarder(moto, topic))
    with capture(bus) as seen, TestClient(app) as client:
        for count in (3, 1, 5):
            assert client.post(f"/orders/{count}").status_code == 200
    messages = moto.receive(queue, 9)
    received = {event.id: event for event in map(decode_message, messages)}
    assert set(received) == {event.id for event in seen.emitted}
    for event in seen.emitted:
        got = received[event.id]
        assert (got.name, got.payload, got.time, got.source) == (
            event.name,
            event.payload,
            event.time,
            "//tests/orders",
        )
    for message in messages:
        body = json.loads(message["Body"])
        if raw:  # the CloudEvent itself, as SQSForwarder would send it
            assert body["specversion"] == "1.0"
        else:  # SNS's notification around it
            assert body["Type"] == "Notification"
            assert body["TopicArn"] == topic
            assert json.loads(body["Message"])["specversion"] == "1.0"


@pytest.mark.anyio
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "notification"])
async def test_trace_context_travels_in_message_attributes(moto: Moto, raw: bool) -> None:
    queue = await moto.create_queue()
    topic = await subscribed_topic(moto, queue, raw=raw)
    trace = {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
    event = Event(name="order.placed", payload={"n": 1}, trace_context=trace)
    async with sns_forwarder(moto, topic) as forwarder:
        assert (await forwarder.deliver([event])).lost == 0
        size = forwarder.encoded_size(event)
    [message] = await moto.receive_async(queue, 1)
    assert TRACEPARENT not in json.loads(message["Body"]).get("Message", message["Body"])
    assert decode_message(message).trace_context == trace
    attributes = len("traceparentString" + TRACEPARENT) + len("tracestateStringvendor=1")
    assert size == len(sqs_body(event).encode()) + attributes


def test_25_events_take_3_calls_and_large_ones_split_by_size(moto: Moto) -> None:
    queue = moto.queue()
    forwarder = sns_forwarder(moto, asyncio.run(subscribed_topic(moto, queue, raw=True)))
    app, _ = orders_app(forwarder)
    with TestClient(app) as client:
        calls = record_batches(forwarder)  # the lifespan started the forwarder
        ids = client.post("/orders/25").json()
        assert sorted(len(call) for call in calls) == [5, 10, 10]
        calls.clear()
        ids += client.post("/orders/10", params={"size": 100_000}).json()
    assert len(calls) == 5  # two ~100 KB messages per call: a third would pass 256 KiB
    assert all(call_bytes(call) <= MAX_MESSAGE_BYTES for call in calls)
    assert {decode_message(m).id for m in moto.receive(queue, 35)} == set(ids)


def test_a_fifo_topic_keeps_each_groups_order_and_deduplicates_by_event_id(moto: Moto) -> None:
    queue = moto.queue("orders", fifo=True)
    topic = asyncio.run(subscribed_topic(moto, queue, raw=True, fifo=True))
    forwarder = sns_forwarder(moto, topic, message_group_id=lambda e: e.payload["customer"])
    app, bus = orders_app(forwarder)
    with capture(bus) as seen, TestClient(app) as client:
        calls = record_batches(forwarder)
        for _ in range(2):
            for customer in ("ada", "bob"):
                client.post("/orders/12", params={"customer": customer})
    assert [len(call) for call in calls] == [10, 2] * 4  # one after the other, in order
    received: dict[str, list[str]] = {}
    for message in moto.receive(queue, 48):
        event = decode_message(message)
        assert message["Attributes"]["MessageGroupId"] == event.payload["customer"]
        assert message["Attributes"]["MessageDeduplicationId"] == event.id
        received.setdefault(event.payload["customer"], []).append(event.id)
    for customer in ("ada", "bob"):
        assert received[customer] == [
            e.id for e in seen.emitted if e.payload["customer"] == customer
        ]


def test_a_message_over_the_limit_is_refused_at_emit(moto: Moto) -> None:
    queue = moto.queue()
    forwarder = sns_forwarder(moto, asyncio.run(subscribed_topic(moto, queue, raw=True)))
    app, _ = orders_app(forwarder)
    with TestClient(app) as client:
        calls = record_batches(forwarder)
        error = client.post("/huge").json()["error"]
    assert f"over the {MAX_MESSAGE_BYTES}-byte limit of forwarder SNSForwarder" in error
    assert calls == []
    moto.receive(queue, 0)


# -- failures -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_entry_sns_refuses_is_dead_lettered_and_the_others_arrive(moto: Moto) -> None:
    """A real ``Failed`` entry: moto refuses a message over 256 KiB (``SenderFault``).

    `deliver` does not run the emit-time check, so the oversized event reaches SNS.
    """
    queue = await moto.create_queue()
    topic = await subscribed_topic(moto, queue, raw=True)
    letters: list[DeadLetter] = []
    events = [Event(name="order.placed", payload={"n": n}) for n in range(3)]
    huge = Event(name="order.placed", payload={"blob": "x" * MAX_MESSAGE_BYTES})
    forwarder = sns_forwarder(moto, topic, retry=FAST_RETRY, dead_letter=letters.append)
    async with forwarder:
        outcome = await forwarder.deliver([events[0], huge, *events[1:]])
    assert [event.id for event, _ in outcome.dead] == [huge.id]
    [letter] = letters
    assert letter.ids == [huge.id]
    assert letter.reason.startswith("rejected:")
    assert "InvalidParameter" in letter.reason
    received = await moto.receive_async(queue, 3)
    assert sorted(decode_message(m).id for m in received) == sorted(e.id for e in events)


class FailingPublishBatch:
    """The only stand-in here: the real client's ``PublishBatch``, failing chosen events.

    moto never fails an entry for a reason that is not the sender's, nor throttles. Events
    in *fail_once* fail once (``SenderFault=False``, as for an SNS-side error); a call with
    an event of *throttle_once* fails whole, once, with ``ThrottlingException``; the rest
    go to the real client.
    """

    def __init__(
        self,
        client: SNSClient,
        *,
        fail_once: Collection[str] = (),
        throttle_once: Collection[str] = (),
    ) -> None:
        self.real = client.publish_batch
        self.fail_once = set(fail_once)
        self.throttle_once = set(throttle_once)
        self.calls: list[list[str]] = []

    async def publish_batch(
        self,
        *,
        TopicArn: str,
        PublishBatchRequestEntries: Sequence[PublishBatchRequestEntryTypeDef],
    ) -> PublishBatchResponseTypeDef:
        from botocore.exceptions import ClientError

        entries = PublishBatchRequestEntries
        ids = [json.loads(entry["Message"])["id"] for entry in entries]
        self.calls.append(ids)
        if throttled := self.throttle_once.intersection(ids):
            self.throttle_once -= throttled
            error: Any = {
                "Error": {"Code": "Throttling", "Message": "Rate exceeded"},
                "ResponseMetadata": {"HTTPStatusCode": 400},
            }
            raise ClientError(error, "PublishBatch")
        failed: list[BatchResultErrorEntryTypeDef] = []
        passed = []
        for event_id, entry in zip(ids, entries, strict=True):
            if event_id in self.fail_once:
                self.fail_once.discard(event_id)
                failed.append({"Id": entry["Id"], "SenderFault": False, "Code": "InternalError"})
            else:
                passed.append(entry)
        response = await self.real(TopicArn=TopicArn, PublishBatchRequestEntries=passed)
        response["Failed"] = [*response.get("Failed", []), *failed]
        return response


@pytest.mark.anyio
async def test_failed_entries_and_throttled_calls_are_retried_each_event_once(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await moto.create_queue()
    topic = await subscribed_topic(moto, queue, raw=True)
    events = [Event(name="order.placed", payload={"n": n}) for n in range(25)]
    ids = [event.id for event in events]
    letters: list[DeadLetter] = []
    async with sns_forwarder(moto, topic, retry=FAST_RETRY, dead_letter=letters.append) as f:
        fake = FailingPublishBatch(f.client, fail_once={ids[1], ids[11]}, throttle_once={ids[22]})
        monkeypatch.setattr(f.client, "publish_batch", fake.publish_batch)
        outcome = await f.deliver(events)
    assert outcome.lost == 0
    assert letters == []
    assert len(fake.calls) == 4  # 10, 10 and 5, then one retry of what failed
    assert sorted(fake.calls[3]) == sorted([ids[1], ids[11], *ids[20:]])
    received = await moto.receive_async(queue, 25)
    assert sorted(decode_message(m).id for m in received) == sorted(ids)  # each once


@pytest.mark.anyio
async def test_a_missing_topic_is_dead_lettered_without_retrying(moto: Moto) -> None:
    letters: list[DeadLetter] = []
    topic = "arn:aws:sns:us-east-1:123456789012:no-such-topic"
    async with sns_forwarder(moto, topic, retry=FAST_RETRY, dead_letter=letters.append) as f:
        calls = record_batches(f)
        await f.deliver([Event(name="order.placed")])
    assert len(calls) == 1
    [letter] = letters
    assert letter.reason.startswith("permanent failure")
    assert isinstance(letter.exception, ForwarderError)
    assert not letter.exception.transient


def test_a_missing_topic_stops_the_app_at_startup(moto: Moto) -> None:
    topic = "arn:aws:sns:us-east-1:123456789012:no-such-topic"
    app, _ = orders_app(sns_forwarder(moto, topic, verify_on_start=True))
    with pytest.raises(ForwarderError) as caught, TestClient(app):
        pytest.fail("the app started")
    assert str(caught.value).startswith(
        "forwarder SNSForwarder failed its start-up check (verify_on_start=True): "
        f"GetTopicAttributes on {topic}: NotFound"
    )


@pytest.mark.anyio
async def test_an_unreachable_sns_is_transient() -> None:
    forwarder = SNSForwarder(
        TOPIC,
        endpoint_url="http://127.0.0.1:1",
        aws_access_key_id="a",
        aws_secret_access_key="b",
    )
    async with forwarder:
        with pytest.raises(ForwarderError, match="cannot reach SNS") as caught:
            await forwarder.send([Event(name="order.placed")])
    assert caught.value.transient


# -- consumed back by the worker --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "notification"])
def test_a_worker_handles_every_published_event_once(moto: Moto, raw: bool) -> None:
    queue = moto.queue()
    topic = asyncio.run(subscribed_topic(moto, queue, raw=raw))
    forwarder = sns_forwarder(moto, topic)
    app, bus = orders_app(forwarder)
    with capture(bus) as seen, TestClient(app) as client:
        for count in (12, 1, 7):
            client.post(f"/orders/{count}")
    traced = Event(
        name="order.placed", payload={"n": -1}, trace_context={"traceparent": TRACEPARENT}
    )

    async def deliver_traced() -> None:
        async with sns_forwarder(moto, topic) as again:
            assert (await again.deliver([traced])).lost == 0

    asyncio.run(deliver_traced())
    consumer = Consumer()
    asyncio.run(consumer.consume(moto, queue, 21))
    sent = [*seen.emitted, traced]
    assert consumer.counts == {event.id: 1 for event in sent}
    for event in sent:
        got = consumer.by_id[event.id]
        assert (got.name, got.payload, got.time) == (event.name, event.payload, event.time)
    assert consumer.by_id[traced.id].trace_context == {"traceparent": TRACEPARENT}


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"topic_arn": "orders"},
        {"topic_arn": "arn:aws:sqs:eu-west-1:123456789012:orders"},
        {"topic_arn": "arn:aws:sns:eu-west-1:123456789012:orders.fifo"},  # no message_group_id
        {"aws_access_key_id": "only-the-key"},
        {"message_group_id": "customer"},
        {"max_message_bytes": 0},
        {"max_message_bytes": MAX_MESSAGE_BYTES + 1},
    ],
)
def test_bad_settings_fail_in_the_constructor(options: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"topic_arn": TOPIC, **options}
    with pytest.raises(ConfigurationError):
        SNSForwarder(**arguments)


@pytest.mark.anyio
async def test_the_region_comes_from_the_arn_and_repr_shows_no_credentials() -> None:
    forwarder = SNSForwarder(TOPIC, aws_access_key_id="AKIAEXAMPLE", aws_secret_access_key="SECRET")
    assert "AKIAEXAMPLE" not in repr(forwarder) + repr(vars(forwarder))
    assert "SECRET" not in repr(forwarder) + repr(vars(forwarder))
    assert forwarder.destination == "orders"
    async with forwarder:
        assert forwarder.client.meta.region_name == "eu-west-1"


@pytest.mark.anyio
async def test_a_bad_message_group_id_fails_at_emit() -> None:
    bus = EventBus()
    bus.forward(
        "order.*",
        SNSForwarder(TOPIC + ".fifo", message_group_id=lambda event: event.payload["customer"]),
    )
    with pytest.raises(InvalidEventError, match=r"message_group_id .* failed .*KeyError"):
        await bus.publish("order.placed", {"n": 1})
    with pytest.raises(InvalidEventError, match="1 to 128 characters"):
        await bus.publish("order.placed", {"customer": ""})


GOOD_GROUP = "Acme-42_" + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
"""Letters, digits and every ASCII punctuation character: a ``MessageGroupId`` AWS takes."""


@pytest.mark.parametrize("group", ["Acme Corp", "Zoë", "tab\there", "x" * 129])
def test_a_group_id_sns_refuses_fails_at_emit(moto: Moto, group: str) -> None:
    """Found: the emit-time check took any str of 1 to 128 characters, where SNS takes only
    letters, digits and ASCII punctuation in a ``MessageGroupId``: a space or an accented
    letter passed ``emit`` and was refused only at send, in the background. It is refused in
    the caller; a group of every character SNS takes is sent as it is."""
    url = moto.queue("orders", fifo=True)
    topic = asyncio.run(subscribed_topic(moto, url, raw=True, fifo=True))
    forwarder = sns_forwarder(moto, topic, message_group_id=lambda e: e.payload["customer"])
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


def test_creating_a_forwarder_does_not_import_the_sdk() -> None:
    code = (
        "import sys\n"
        "from fastapi_eventbus.forwarders import SNSForwarder, EventBridgeForwarder\n"
        f"SNSForwarder({TOPIC!r}); EventBridgeForwarder('shop', source='com.shop')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('aiobotocore', 'botocore')]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
