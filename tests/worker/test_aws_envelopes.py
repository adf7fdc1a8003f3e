"""SNS and EventBridge messages on SQS, and the decode hook (issue 18, item 5).

An SNS topic delivers to an SQS queue in an envelope, the SNS notification JSON, unless the
subscription has raw message delivery on; an EventBridge rule delivers its event JSON. Both
shapes are built here as AWS documents them, and delivered for real by moto's SNS and
EventBridge in the end-to-end test. The decode hook (`SQSSource(decode=...)`,
`PubSubSource(decode=...)`, `decode_message(message, decode=...)`) reads any other format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from fastapi_eventbus import ConfigurationError, Event, EventBus, MessageDecodeError
from fastapi_eventbus.wire import decode_message, message_trace_context, sqs_body
from fastapi_eventbus.worker import (
    Backoff,
    PubSubSource,
    ReceivedMessage,
    SQSSource,
    Worker,
    WorkerStats,
)
from tests._support import ROOT, load_module, until
from tests.forwarders._fanout import events_client, queue_arn, sns_client
from tests.forwarders._moto import KEY_ID, REGION, SECRET, Moto
from tests.worker._helpers import counts, create_queue, send_raw

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
QUEUE_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/orders"
EVENT = Event(name="order.placed", payload={"id": 7}, source="/shop")


def sns_notification(message: str, attributes: Mapping[str, str] | None = None) -> str:
    """An SNS notification as an SQS subscription without raw delivery receives it (AWS docs)."""
    notification: dict[str, Any] = {
        "Type": "Notification",
        "MessageId": "da41e39f-ea4d-435a-b922-c6aae3915ebe",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:orders",
        "Subject": None,
        "Message": message,
        "Timestamp": "2026-11-24T05:39:01.655Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLElDMXvB8r9R83tGoNn0ecwd5UjllzsvSvbItzfaMpN2nk5HVSw7XnOn/49IkxDKz8Y=",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=arn:aws:sns:us-east-1:123456789012:orders:2bcfbf39-05c3-41de-beaa-fcfcc21c8f55",
    }
    if attributes:
        notification["MessageAttributes"] = {
            name: {"Type": "String", "Value": value} for name, value in attributes.items()
        }
    return json.dumps(notification)


def eventbridge_event(**overrides: Any) -> str:
    """An EventBridge event as a rule's SQS target receives it (AWS docs' example)."""
    event: dict[str, Any] = {
        "version": "0",
        "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
        "detail-type": "Order Placed",
        "source": "com.shop.orders",
        "account": "111122223333",
        "time": "2017-12-22T18:43:48Z",
        "region": "us-west-1",
        "resources": ["arn:aws:ec2:us-west-1:123456789012:instance/i-1234567890abcdef0"],
        "detail": {"id": 7, "state": "placed"},
    }
    event.update(overrides)
    return json.dumps(event)


def sqs_message(body: str, attributes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """*body* as ``ReceiveMessage`` returns it, with *attributes* as SQS message attributes."""
    return {
        "MessageId": "m1",
        "ReceiptHandle": "r1",
        "Body": body,
        "MessageAttributes": {
            name: {"DataType": "String", "StringValue": value}
            for name, value in (attributes or {}).items()
        },
    }


def source_decode(message: Mapping[str, Any], **options: Any) -> Event:
    """What `SQSSource` makes of *message*."""
    return SQSSource(QUEUE_URL, **options).decode(ReceivedMessage(message, "m1", "r1"))


def both(message: Mapping[str, Any], **options: Any) -> Event:
    """What `decode_message` and `SQSSource` make of *message*, checked to agree."""
    decoded = decode_message(message, **options)
    fresh = {"id", "time"} if "decode" in options else set()  # a hook's events: new ids
    assert source_decode(message, **options).model_dump(exclude=fresh) == decoded.model_dump(
        exclude=fresh
    )
    return decoded


# -- SNS --------------------------------------------------------------------------------


def test_an_sns_notification_carries_the_cloudevent_and_its_trace_context() -> None:
    body = sns_notification(sqs_body(EVENT), {"traceparent": TRACEPARENT, "other": "x"})
    message = sqs_message(body)
    decoded = both(message)
    assert decoded == EVENT.model_copy(update={"trace_context": {"traceparent": TRACEPARENT}})
    assert message_trace_context(message) == {"traceparent": TRACEPARENT}
    assert SQSSource(QUEUE_URL).trace_context(ReceivedMessage(message, "m1", "r1")) == {
        "traceparent": TRACEPARENT
    }


def test_raw_sns_delivery_is_the_cloudevent_with_sqs_attributes() -> None:
    message = sqs_message(sqs_body(EVENT), {"traceparent": TRACEPARENT})
    assert both(message).trace_context == {"traceparent": TRACEPARENT}
    assert both(message).id == EVENT.id


def test_an_sns_notification_of_an_eventbridge_event_is_that_event() -> None:
    decoded = both(sqs_message(sns_notification(eventbridge_event())))
    assert (decoded.name, decoded.id) == ("Order Placed", "6a7e8feb-b491-4cf7-a9f1-bf3703467718")


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (42, "SNS notification's Message must be a string"),
        ("not json", "SNS Message is not valid JSON"),
        ('{"id": 7}', "not a CloudEvent"),
    ],
)
def test_an_sns_notification_without_an_event_is_refused_with_the_reason(
    message: Any, error: str
) -> None:
    body = json.loads(sns_notification(""))
    body["Message"] = message
    with pytest.raises(MessageDecodeError, match=error):
        both(sqs_message(json.dumps(body)))


# -- EventBridge ------------------------------------------------------------------------


def test_an_eventbridge_event_is_an_event() -> None:
    decoded = both(sqs_message(eventbridge_event(), {"traceparent": TRACEPARENT}))
    assert decoded == Event(
        name="Order Placed",
        payload={"id": 7, "state": "placed"},
        id="6a7e8feb-b491-4cf7-a9f1-bf3703467718",
        time=datetime(2017, 12, 22, 18, 43, 48, tzinfo=UTC),
        source="com.shop.orders",
        trace_context={"traceparent": TRACEPARENT},
    )


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"detail-type": ""}, "EventBridge detail-type is no event name"),
        ({"detail-type": "Order\nPlaced"}, "control character"),
        ({"detail-type": 7}, "EventBridge detail-type is no event name"),
        ({"id": ""}, "EventBridge event without an id"),
        ({"time": "yesterday"}, "not an RFC 3339 timestamp"),
    ],
)
def test_an_eventbridge_event_that_is_no_event_is_refused_with_the_reason(
    overrides: dict[str, Any], error: str
) -> None:
    with pytest.raises(MessageDecodeError, match=error):
        both(sqs_message(eventbridge_event(**overrides)))


# -- the decode hook --------------------------------------------------------------------


def plain_json(message: Mapping[str, Any]) -> Event | None:
    """A decode hook: fastapi-events' ``["name", payload]`` and ``{"event": ..., ...}``."""
    body = json.loads(message["Body"]) if "Body" in message else None
    if isinstance(body, list) and len(body) == 2 and isinstance(body[0], str):
        return Event(name=body[0], payload=body[1])
    if isinstance(body, dict) and "event" in body:
        return Event(name=body.pop("event"), payload=body)
    return None


def test_a_decode_hook_reads_other_formats_and_falls_back_to_the_built_in() -> None:
    fastapi_events = both(sqs_message('["order.placed", {"id": 7}]'), decode=plain_json)
    assert (fastapi_events.name, fastapi_events.payload) == ("order.placed", {"id": 7})
    plain = both(sqs_message('{"event": "order.paid", "id": 7}'), decode=plain_json)
    assert (plain.name, plain.payload) == ("order.paid", {"id": 7})
    assert both(sqs_message(sqs_body(EVENT)), decode=plain_json) == EVENT  # None: built-in
    with pytest.raises(MessageDecodeError, match="a CloudEvent must be a JSON object"):
        both(sqs_message('["order.placed", {"id": 7}]'))  # no hook: refused as before


def test_a_pubsub_source_takes_a_decode_hook_too() -> None:
    def decode(message: Mapping[str, Any]) -> Event | None:
        return Event(name="pubsub.raw", payload=bytes(message["data"]).decode())

    source = PubSubSource("projects/my-project/subscriptions/orders", decode=decode)
    received = ReceivedMessage({"data": b"hello", "attributes": {}}, "m1", "r1")
    assert source.decode(received).payload == "hello"
    assert decode_message(received.body, decode=decode).payload == "hello"


@pytest.mark.parametrize("returned", ["order.placed", {"name": "order.placed"}])
def test_a_decode_hook_that_returns_no_event_makes_the_message_undecodable(
    returned: object,
) -> None:
    def decode(message: Mapping[str, Any]) -> Event | None:
        return cast(Event, returned)

    with pytest.raises(MessageDecodeError, match=r"decode hook .* returned a"):
        both(sqs_message(sqs_body(EVENT)), decode=decode)


@pytest.mark.parametrize("make", [SQSSource, PubSubSource])
def test_a_decode_hook_that_is_not_callable_is_refused_at_the_constructor(make: Any) -> None:
    where = QUEUE_URL if make is SQSSource else "projects/my-project/subscriptions/orders"
    with pytest.raises(ConfigurationError, match="decode must be a callable"):
        make(where, decode="json.loads")
    with pytest.raises(ConfigurationError, match="decode must be a callable"):
        decode_message(sqs_message(sqs_body(EVENT)), decode=cast(Any, 42))


# -- end to end: moto's SNS and EventBridge deliver to an SQS queue ------------------------


async def publish_to_sns(moto: Moto, queue_url: str, bodies: list[str]) -> None:
    """Publish *bodies* to a new topic the queue subscribes to, raw delivery off."""
    async with sns_client(moto) as sns:
        topic = (await sns.create_topic(Name=f"orders-{id(bodies)}"))["TopicArn"]
        await sns.subscribe(
            TopicArn=topic,
            Protocol="sqs",
            Endpoint=await queue_arn(moto, queue_url),
            Attributes={"RawMessageDelivery": "false"},
        )
        for body in bodies:
            await sns.publish(
                TopicArn=topic,
                Message=body,
                MessageAttributes={
                    "traceparent": {"DataType": "String", "StringValue": TRACEPARENT}
                },
            )


async def put_to_eventbridge(moto: Moto, queue_url: str, details: list[dict[str, Any]]) -> None:
    """Put events on a new bus whose rule targets the queue."""
    async with events_client(moto) as events:
        bus = f"shop-{id(details)}"
        await events.create_event_bus(Name=bus)
        pattern = json.dumps({"source": ["com.shop.orders"]})
        await events.put_rule(Name="to-queue", EventBusName=bus, EventPattern=pattern)
        arn = await queue_arn(moto, queue_url)
        await events.put_targets(
            Rule="to-queue", EventBusName=bus, Targets=[{"Id": "queue", "Arn": arn}]
        )
        response = await events.put_events(
            Entries=[
                {
                    "EventBusName": bus,
                    "Source": "com.shop.orders",
                    "DetailType": "Order Placed",
                    "Detail": json.dumps(detail),
                }
                for detail in details
            ]
        )
        assert response["FailedEntryCount"] == 0


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_worker_handles_what_sns_and_eventbridge_deliver_to_its_queue(
    moto: Moto,
) -> None:
    queue_url = await create_queue(moto, "fanout")
    sent = [Event(name="order.placed", payload={"n": n}, source="/shop") for n in range(3)]
    await publish_to_sns(moto, queue_url, [sqs_body(event) for event in sent])
    await put_to_eventbridge(moto, queue_url, [{"n": n} for n in range(3, 5)])
    await send_raw(moto, queue_url, '["order.placed", {"n": 5}]')  # fastapi-events' format
    bus = EventBus()
    handled: dict[str, Event] = {}

    @bus.on("order.placed", "Order Placed")
    async def record(event: Event) -> None:
        handled[event.id] = event

    source = moto.source(queue_url, visibility_backoff=Backoff(initial=0), decode=plain_json)
    async with Worker(bus, source) as worker:
        await until(lambda: worker.stats.handled == 6, timeout=20)
    assert worker.stats == WorkerStats(received=6, handled=6)
    for event in sent:  # by id: each once, with the trace context SNS carried
        assert handled.pop(event.id).trace_context == {"traceparent": TRACEPARENT}
    by_name = sorted((e.name, e.source, e.payload["n"]) for e in handled.values())
    assert by_name == [
        ("Order Placed", "com.shop.orders", 3),
        ("Order Placed", "com.shop.orders", 4),
        ("order.placed", None, 5),
    ]
    assert await counts(moto, queue_url) == (0, 0)


@pytest.mark.anyio
@pytest.mark.slow
async def test_the_docs_decode_hook_example(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    example = load_module(ROOT / "docs/examples/worker_decode.py", monkeypatch)
    handled: list[tuple[str, Any]] = []
    bus: EventBus = example.bus

    @bus.on("*")
    async def record(event: Event) -> None:
        handled.append((event.name, event.payload))

    queue_url = await create_queue(moto, "legacy")
    for body in ['["cat.created", {"id": 1}]', '{"event": "cat.fed", "id": 1}', sqs_body(EVENT)]:
        await send_raw(moto, queue_url, body)
    worker = example.create_worker(
        queue_url,
        endpoint_url=moto.endpoint,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        wait_time_seconds=1,
    )
    async with worker:
        await until(lambda: worker.stats.handled == 3, timeout=20)
    assert sorted(handled) == [
        ("cat.created", {"id": 1}),
        ("cat.fed", {"id": 1}),
        ("order.placed", {"id": 7}),
    ]
