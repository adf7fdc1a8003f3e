"""`EventBridgeForwarder` against a real EventBridge: moto's server, a rule targeting SQS.

Every delivery goes through the forwarder's real aiobotocore client to moto's EventBridge,
whose rule puts matching events on an SQS queue, read back with aiobotocore or consumed by
a `Worker`. moto answers ``PutEvents`` with a failed entry (``MalformedDetail``) for a
``Detail`` that is not JSON: `FailingPutEvents`, the one stand-in, spoils one entry's
``Detail`` to get that real answer, and answers ``ThrottlingException``/``InternalFailure``
for others itself, as moto never does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fastapi_eventbus import (
    ConfigurationError,
    Event,
    EventBus,
    Extensions,
    ForwarderError,
    InvalidEventError,
)
from fastapi_eventbus.forwarders import DeadLetter, Retry
from fastapi_eventbus.forwarders.eventbridge import (
    MAX_CALL_BYTES,
    MAX_ENTRY_BYTES,
    EventBridgeForwarder,
    entry_detail,
    entry_size,
)
from fastapi_eventbus.testing import capture
from fastapi_eventbus.wire import decode_message, sqs_body
from tests.contracts.forwarder import ForwarderContract, MakeForwarder, ReceivedIds
from tests.forwarders import _fanout
from tests.forwarders._fanout import TRACEPARENT, Consumer, bus_with_rule, eventbridge_forwarder
from tests.forwarders._moto import Moto, running_moto

if TYPE_CHECKING:
    from types_aiobotocore_events import EventBridgeClient
    from types_aiobotocore_events.type_defs import (
        PutEventsRequestEntryTypeDef,
        PutEventsResponseTypeDef,
        PutEventsResultEntryTypeDef,
    )

FAST_RETRY = Retry(attempts=3, initial_delay=0.01, max_delay=0.02, total_timeout=5)
SOURCE = "//tests/orders"
FROM_THE_APP = {"source": [SOURCE]}


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with running_moto() as server:
        yield server


def queue_and_bus(moto: Moto, pattern: Mapping[str, Any] = FROM_THE_APP) -> tuple[str, str]:
    """A new queue, and a new bus whose rule sends what matches *pattern* to it."""
    queue = moto.queue()
    return queue, asyncio.run(bus_with_rule(moto, queue, dict(pattern)))


def orders_app(forwarder: EventBridgeForwarder) -> tuple[FastAPI, EventBus]:
    """An app whose ``POST /orders/{count}`` emits *count* ``order.placed`` events."""
    return _fanout.orders_app(forwarder, source=SOURCE, huge=MAX_ENTRY_BYTES)


def record_calls(forwarder: EventBridgeForwarder) -> list[list[PutEventsRequestEntryTypeDef]]:
    """Record the entries of every ``PutEvents`` call the forwarder's real client makes."""
    calls: list[list[PutEventsRequestEntryTypeDef]] = []

    def before_call(params: dict[str, Any], **_: Any) -> None:
        calls.append(list(params["Entries"]))

    forwarder.client.meta.events.register("before-parameter-build.events.PutEvents", before_call)
    return calls


def aws_size(entry: PutEventsRequestEntryTypeDef) -> int:
    """AWS's entry-size formula, written out: 14 for Time, then UTF-8 bytes."""
    size = 14 if "Time" in entry else 0
    for text in (entry.get("Source", ""), entry.get("DetailType", ""), entry.get("Detail", "")):
        size += len(text.encode())
    return size


# -- the contract -------------------------------------------------------------------------


class TestEventBridgeForwarderContract(ForwarderContract):
    @pytest.fixture
    def queue_and_bus(self, moto: Moto) -> tuple[str, str]:
        return queue_and_bus(moto, {"source": ["com.shop"]})

    @pytest.fixture
    def make_forwarder(self, moto: Moto, queue_and_bus: tuple[str, str]) -> MakeForwarder:
        return lambda: eventbridge_forwarder(moto, queue_and_bus[1], source="com.shop")

    @pytest.fixture
    def received_ids(self, moto: Moto, queue_and_bus: tuple[str, str]) -> ReceivedIds:
        async def ids(count: int) -> list[str]:
            found = await moto.collect_ids(queue_and_bus[0], lambda c: c.total() >= count, 10)
            return list(found.elements())

        return ids

    @pytest.fixture
    def make_failing_forwarder(self, moto: Moto) -> MakeForwarder:
        return lambda: eventbridge_forwarder(moto, "no-such-bus", source="com.shop")


# -- delivery through the flush, to a rule's SQS target -----------------------------------


def test_events_arrive_as_eventbridge_events_whose_detail_is_the_cloudevent(moto: Moto) -> None:
    queue, bus_name = queue_and_bus(moto)
    app, bus = orders_app(eventbridge_forwarder(moto, bus_name))
    with capture(bus) as seen, TestClient(app) as client:
        for count in (3, 1, 5):
            assert client.post(f"/orders/{count}").status_code == 200
    messages = moto.receive(queue, 9)
    received = {event.id: event for event in map(decode_message, messages)}
    assert set(received) == {event.id for event in seen.emitted}  # our ids, not EventBridge's
    for event in seen.emitted:
        got = received[event.id]
        assert (got.name, got.payload, got.time, got.source) == (
            event.name,
            event.payload,
            event.time,
            SOURCE,
        )
    for message in messages:
        body = json.loads(message["Body"])
        assert (body["source"], body["detail-type"]) == (SOURCE, "order.placed")
        assert body["detail"]["specversion"] == "1.0"
        assert body["id"] != body["detail"]["id"]


def test_rules_match_the_payload_as_detail_data(moto: Moto) -> None:
    queue, bus_name = queue_and_bus(moto, {"detail": {"data": {"customer": ["bob"]}}})
    app, _ = orders_app(eventbridge_forwarder(moto, bus_name))
    with TestClient(app) as client:
        client.post("/orders/2", params={"customer": "ada"})
        bobs = client.post("/orders/3", params={"customer": "bob"}).json()
    assert sorted(decode_message(m).id for m in moto.receive(queue, 3)) == sorted(bobs)


@pytest.mark.anyio
async def test_source_and_detail_type_can_be_set_and_the_trace_rides_in_the_detail(
    moto: Moto,
) -> None:
    queue = await moto.create_queue()
    bus_name = await bus_with_rule(moto, queue, {"detail-type": ["Order Placed"]})
    trace = {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
    event = Event(name="order.placed", payload={"n": 1}, trace_context=trace)
    forwarder = eventbridge_forwarder(
        moto, bus_name, source="com.example.shop", detail_type="Order Placed"
    )
    async with forwarder:
        assert (await forwarder.deliver([event])).lost == 0
    [message] = await moto.receive_async(queue, 1)
    body = json.loads(message["Body"])
    assert (body["source"], body["detail-type"]) == ("com.example.shop", "Order Placed")
    assert body["detail"]["traceparent"] == TRACEPARENT
    assert TRACEPARENT not in json.dumps(body["detail"]["data"])
    decoded = decode_message(message)
    assert (decoded.id, decoded.name, decoded.trace_context) == (event.id, event.name, trace)


def test_the_entry_size_is_aws_formula_to_the_byte() -> None:
    forwarder = EventBridgeForwarder("shop", source="com.shop")
    event = Event(
        name="order.placed", payload={"note": "café"}, trace_context={"traceparent": TRACEPARENT}
    )
    text = entry_detail(event)
    assert json.loads(text) == {**json.loads(sqs_body(event)), "traceparent": TRACEPARENT}
    expected = 14 + len("com.shop") + len("order.placed") + len(text.encode())
    assert forwarder.encoded_size(event) == entry_size("com.shop", "order.placed", text) == expected
    forwarder.max_message_bytes = expected
    forwarder.check(event)
    forwarder.max_message_bytes = expected - 1
    with pytest.raises(InvalidEventError, match=f"{expected}-byte message, over the"):
        forwarder.check(event)


def test_25_events_take_3_calls_and_large_ones_split_by_size(moto: Moto) -> None:
    queue, bus_name = queue_and_bus(moto)
    forwarder = eventbridge_forwarder(moto, bus_name)
    app, _ = orders_app(forwarder)
    with TestClient(app) as client:
        calls = record_calls(forwarder)  # the lifespan started the forwarder
        ids = client.post("/orders/25").json()
        assert sorted(len(call) for call in calls) == [5, 10, 10]
        calls.clear()
        ids += client.post("/orders/10", params={"size": 100_000}).json()
    assert len(calls) == 5  # two ~100 KB entries per call: a third would pass 256 KiB
    assert all(sum(map(aws_size, call)) <= MAX_CALL_BYTES for call in calls)
    assert {decode_message(m).id for m in moto.receive(queue, 35)} == set(ids)


def test_an_entry_over_the_limit_is_refused_at_emit(moto: Moto) -> None:
    queue, bus_name = queue_and_bus(moto)
    forwarder = eventbridge_forwarder(moto, bus_name)
    app, _ = orders_app(forwarder)
    with TestClient(app) as client:
        calls = record_calls(forwarder)
        error = client.post("/huge").json()["error"]
    assert f"over the {MAX_ENTRY_BYTES}-byte limit of forwarder EventBridgeForwarder" in error
    assert calls == []
    moto.receive(queue, 0)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("bus_source", "name", "error"),
    [
        ("aws.orders", "order.placed", "starts with 'aws.'"),
        (None, "order." + "x" * 130, "1 to 128 characters"),
    ],
)
async def test_what_eventbridge_would_refuse_fails_at_emit(
    bus_source: str | None, name: str, error: str
) -> None:
    bus = EventBus(source=bus_source)
    bus.forward("order.*", EventBridgeForwarder("shop", region_name="us-east-1"))
    with pytest.raises(InvalidEventError, match=error):
        await bus.publish(name, {"n": 1})


# -- what the worker reads ----------------------------------------------------------------


def eventbridge_message(detail: object, **attributes: str) -> dict[str, Any]:
    """An EventBridge event with *detail*, as a rule's SQS target receives it."""
    body = {
        "version": "0",
        "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
        "detail-type": "Order Placed",
        "source": "com.example.shop",
        "account": "111122223333",
        "time": "2017-12-22T18:43:48Z",
        "region": "us-west-1",
        "resources": [],
        "detail": detail,
    }
    return {
        "Body": json.dumps(body),
        "MessageAttributes": {
            name: {"DataType": "String", "StringValue": value} for name, value in attributes.items()
        },
    }


def test_a_detail_that_is_a_cloudevent_is_decoded_as_that_event() -> None:
    extensions: Extensions = {"subject": "orders/1", "priority": 5}  # kept, with JSON's types
    event = Event(name="order.placed", payload={"n": 1}, source="/shop", extensions=extensions)
    traced = event.model_copy(update={"trace_context": {"traceparent": TRACEPARENT}})
    assert decode_message(eventbridge_message(json.loads(entry_detail(traced)))) == traced
    plain = decode_message(eventbridge_message(json.loads(sqs_body(event)), traceparent="x-y"))
    assert plain == event.model_copy(update={"trace_context": {"traceparent": "x-y"}})


def test_a_detail_that_looks_like_a_cloudevent_but_is_none_is_refused() -> None:
    from fastapi_eventbus import MessageDecodeError

    detail = {"specversion": "1.0", "id": "1", "type": "order.placed"}  # no source
    with pytest.raises(MessageDecodeError, match="missing source"):
        decode_message(eventbridge_message(detail))


def test_a_plain_detail_keeps_the_eventbridge_mapping() -> None:
    decoded = decode_message(eventbridge_message({"specversion": "1.0", "n": 1}))
    assert (decoded.name, decoded.id, decoded.source) == (
        "Order Placed",
        "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
        "com.example.shop",
    )
    assert decoded.payload == {"specversion": "1.0", "n": 1}


# -- failures ---------------------------------------------------------------------------------


class FailingPutEvents:
    """The only stand-in here: the real client's ``PutEvents``, spoiling chosen entries.

    An event in *spoil* has its ``Detail`` cut short, and moto fails that entry with
    ``MalformedDetail`` (a real answer). An event in *fail_once* is left out of the real
    call once and answered with its code (``ThrottlingException``, ``InternalFailure``),
    which moto never gives. The answer keeps the request's order, as AWS's does.
    """

    def __init__(
        self,
        client: EventBridgeClient,
        *,
        spoil: Sequence[str] = (),
        fail_once: Mapping[str, str] | None = None,
    ) -> None:
        self.real = client.put_events
        self.spoil = set(spoil)
        self.fail_once = dict(fail_once or {})
        self.calls: list[list[str]] = []

    async def put_events(
        self, *, Entries: Sequence[PutEventsRequestEntryTypeDef]
    ) -> PutEventsResponseTypeDef:
        ids = [json.loads(entry["Detail"])["id"] for entry in Entries]
        self.calls.append(ids)
        passed: list[PutEventsRequestEntryTypeDef] = []
        for event_id, entry in zip(ids, Entries, strict=True):
            if event_id in self.spoil:
                passed.append({**entry, "Detail": entry["Detail"][:-1]})
            elif event_id not in self.fail_once:
                passed.append(entry)
        response = await self.real(Entries=passed)
        answers = iter(response["Entries"])
        merged: list[PutEventsResultEntryTypeDef] = []
        for event_id in ids:
            if code := self.fail_once.pop(event_id, None):
                merged.append({"ErrorCode": code, "ErrorMessage": "try again"})
            else:
                merged.append(next(answers))
        failed = sum(1 for answer in merged if "ErrorCode" in answer)
        return {**response, "Entries": merged, "FailedEntryCount": failed}


@pytest.mark.anyio
async def test_failed_entries_are_retried_or_dead_lettered_by_error_code(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await moto.create_queue()
    bus_name = await bus_with_rule(moto, queue, {"source": ["com.shop"]})
    events = [Event(name="order.placed", payload={"n": n}) for n in range(12)]
    ids = [event.id for event in events]
    letters: list[DeadLetter] = []
    forwarder = eventbridge_forwarder(
        moto, bus_name, source="com.shop", retry=FAST_RETRY, dead_letter=letters.append
    )
    async with forwarder:
        fake = FailingPutEvents(
            forwarder.client,
            spoil=[ids[4]],
            fail_once={ids[1]: "ThrottlingException", ids[11]: "InternalFailure"},
        )
        monkeypatch.setattr(forwarder.client, "put_events", fake.put_events)
        outcome = await forwarder.deliver(events)
    assert [event.id for event, _ in outcome.dead] == [ids[4]]
    [letter] = letters
    assert letter.ids == [ids[4]]
    assert letter.reason.startswith("rejected:")
    assert "MalformedDetail" in letter.reason
    assert sorted(map(sorted, fake.calls)) == sorted(
        map(sorted, [ids[:10], ids[10:], [ids[1], ids[11]]])
    )
    received = await moto.receive_async(queue, 11)
    assert sorted(decode_message(m).id for m in received) == sorted(set(ids) - {ids[4]})


def test_a_missing_bus_stops_the_app_at_startup(moto: Moto) -> None:
    app, _ = orders_app(eventbridge_forwarder(moto, "no-such-bus", verify_on_start=True))
    with pytest.raises(ForwarderError) as caught, TestClient(app):
        pytest.fail("the app started")
    assert str(caught.value).startswith(
        "forwarder EventBridgeForwarder failed its start-up check (verify_on_start=True): "
        "DescribeEventBus on no-such-bus: ResourceNotFoundException"
    )


@pytest.mark.anyio
async def test_an_unreachable_eventbridge_is_transient() -> None:
    forwarder = EventBridgeForwarder(
        "shop",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:1",
        aws_access_key_id="a",
        aws_secret_access_key="b",
    )
    async with forwarder:
        with pytest.raises(ForwarderError, match="cannot reach EventBridge") as caught:
            await forwarder.send([Event(name="order.placed")])
    assert caught.value.transient


# -- consumed back by the worker --------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_handles_every_put_event_once_with_its_id_and_trace(moto: Moto) -> None:
    queue, bus_name = queue_and_bus(moto)
    forwarder = eventbridge_forwarder(moto, bus_name, detail_type="Order Placed")
    app, bus = orders_app(forwarder)
    with capture(bus) as seen, TestClient(app) as client:
        for count in (12, 1, 7):
            client.post(f"/orders/{count}")
    trace = {"traceparent": TRACEPARENT}
    traced = Event(name="order.placed", payload={"n": -1}, source=SOURCE, trace_context=trace)

    async def deliver_traced() -> None:
        async with eventbridge_forwarder(moto, bus_name) as again:
            assert (await again.deliver([traced])).lost == 0

    asyncio.run(deliver_traced())
    consumer = Consumer()
    asyncio.run(consumer.consume(moto, queue, 21))
    sent = [*seen.emitted, traced]
    assert consumer.counts == {event.id: 1 for event in sent}
    for event in sent:  # the event's own name, whatever the detail-type said
        got = consumer.by_id[event.id]
        assert (got.name, got.payload, got.time, got.source) == (
            event.name,
            event.payload,
            event.time,
            SOURCE,
        )
    assert consumer.by_id[traced.id].trace_context == trace


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"event_bus_name": ""},
        {"event_bus_name": "arn:x"},  # was an IndexError
        {"event_bus_name": "arn:aws:sns:eu-west-3:123456789012:shop"},
        {"source": "aws.orders"},
        {"source": ""},
        {"detail_type": "x" * 129},
        {"aws_access_key_id": "only-the-key"},
        {"max_message_bytes": 0},
        {"max_message_bytes": MAX_ENTRY_BYTES + 1},
    ],
)
def test_bad_settings_fail_in_the_constructor(options: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"event_bus_name": "shop", **options}
    with pytest.raises(ConfigurationError):
        EventBridgeForwarder(**arguments)


@pytest.mark.anyio
async def test_the_region_comes_from_a_bus_arn_and_repr_shows_no_credentials() -> None:
    arn = "arn:aws:events:eu-west-3:123456789012:event-bus/shop"
    forwarder = EventBridgeForwarder(
        arn, aws_access_key_id="AKIAEXAMPLE", aws_secret_access_key="SECRET"
    )
    assert "AKIAEXAMPLE" not in repr(forwarder) + repr(vars(forwarder))
    assert "SECRET" not in repr(forwarder) + repr(vars(forwarder))
    assert forwarder.destination == "shop"
    async with forwarder:
        assert forwarder.client.meta.region_name == "eu-west-3"
