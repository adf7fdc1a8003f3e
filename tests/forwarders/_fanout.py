"""moto's SNS and EventBridge for the forwarder tests: topics and buses that deliver to SQS.

A topic with an SQS subscription (raw message delivery on or off) and a bus with a rule
whose target is an SQS queue, created on the moto server of `tests.forwarders._moto`;
the forwarders to them; and a `Worker` that reads the queue back and records what its
handlers ran, by event id.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI

from fastapi_eventbus import Event, EventBus, InvalidEventError, get_bus
from fastapi_eventbus.forwarders import Forwarder
from fastapi_eventbus.forwarders.eventbridge import EventBridgeForwarder
from fastapi_eventbus.forwarders.sns import SNSForwarder
from fastapi_eventbus.worker import Backoff, Worker
from tests._support import until
from tests.forwarders._moto import KEY_ID, REGION, SECRET, Moto

if TYPE_CHECKING:
    from aiobotocore.session import ClientCreatorContext
    from types_aiobotocore_events import EventBridgeClient
    from types_aiobotocore_sns import SNSClient

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def sns_client(moto: Moto) -> ClientCreatorContext[SNSClient]:
    """An aiobotocore SNS client for *moto*, to use with ``async with``."""
    from aiobotocore.session import AioSession

    return AioSession().create_client(
        "sns",
        endpoint_url=moto.endpoint,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )


def events_client(moto: Moto) -> ClientCreatorContext[EventBridgeClient]:
    """An aiobotocore EventBridge client for *moto*, to use with ``async with``."""
    from aiobotocore.session import AioSession

    return AioSession().create_client(
        "events",
        endpoint_url=moto.endpoint,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )


async def queue_arn(moto: Moto, queue_url: str) -> str:
    async with moto.client() as sqs:
        response = await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    return response["Attributes"]["QueueArn"]


async def subscribed_topic(moto: Moto, queue_url: str, *, raw: bool, fifo: bool = False) -> str:
    """A new topic (FIFO if *fifo*) to which *queue_url* subscribes; its ARN."""
    name = f"orders-{uuid.uuid4().hex[:12]}" + (".fifo" if fifo else "")
    attributes = {"FifoTopic": "true"} if fifo else {}
    async with sns_client(moto) as sns:
        topic = (await sns.create_topic(Name=name, Attributes=attributes))["TopicArn"]
        await sns.subscribe(
            TopicArn=topic,
            Protocol="sqs",
            Endpoint=await queue_arn(moto, queue_url),
            Attributes={"RawMessageDelivery": "true" if raw else "false"},
        )
    return topic


async def bus_with_rule(moto: Moto, queue_url: str, pattern: dict[str, Any]) -> str:
    """A new event bus whose rule sends events matching *pattern* to *queue_url*; its name."""
    name = f"shop-{uuid.uuid4().hex[:12]}"
    async with events_client(moto) as events:
        await events.create_event_bus(Name=name)
        await events.put_rule(Name="to-queue", EventBusName=name, EventPattern=json.dumps(pattern))
        arn = await queue_arn(moto, queue_url)
        await events.put_targets(
            Rule="to-queue", EventBusName=name, Targets=[{"Id": "queue", "Arn": arn}]
        )
    return name


def sns_forwarder(moto: Moto, topic_arn: str, **options: Any) -> SNSForwarder:
    """An `SNSForwarder` for *topic_arn* on *moto*."""
    return SNSForwarder(
        topic_arn,
        endpoint_url=moto.endpoint,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        **options,
    )


def eventbridge_forwarder(moto: Moto, bus: str, **options: Any) -> EventBridgeForwarder:
    """An `EventBridgeForwarder` for the event bus *bus* on *moto*."""
    return EventBridgeForwarder(
        bus,
        endpoint_url=moto.endpoint,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        **options,
    )


@dataclass
class Consumer:
    """A service that reads the queue with the worker: its handler records every event."""

    bus: EventBus = field(default_factory=EventBus)
    handled: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        @self.bus.on("*")
        async def record(event: Event) -> None:
            self.handled.append(event)

    @property
    def counts(self) -> Counter[str]:
        """How many times each event id was handled."""
        return Counter(event.id for event in self.handled)

    @property
    def by_id(self) -> dict[str, Event]:
        return {event.id: event for event in self.handled}

    async def consume(self, moto: Moto, queue_url: str, count: int, timeout: float = 20) -> None:
        """Run a `Worker` on *queue_url* until *count* messages were handled, and a bit more."""
        source = moto.source(queue_url, visibility_backoff=Backoff(initial=0))
        async with Worker(self.bus, source) as worker:
            await until(lambda: worker.stats.handled >= count, timeout=timeout)
            assert worker.stats.undecodable == worker.stats.failed == 0, worker.stats
        assert worker.stats.handled == count, worker.stats


def orders_app(forwarder: Forwarder, *, source: str, huge: int) -> tuple[FastAPI, EventBus]:
    """An app forwarding ``order.*`` to *forwarder*: ``POST /orders/{count}`` emits *count*
    ``order.placed`` events, ``POST /huge`` one with a *huge*-character string (its error)."""
    bus = EventBus(source=source)
    app = FastAPI()
    bus.install(app)
    bus.forward("order.*", forwarder)

    @app.post("/orders/{count}")
    async def place(
        count: int, bus: EventBus = Depends(get_bus), customer: str = "ada", size: int = 0
    ) -> list[str]:
        return [
            bus.emit("order.placed", {"n": n, "customer": customer, "pad": "x" * size}).id
            for n in range(count)
        ]

    @app.post("/huge")
    async def huge_one(bus: EventBus = Depends(get_bus)) -> dict[str, str]:
        try:
            bus.emit("order.placed", {"blob": "x" * huge})
        except InvalidEventError as exc:
            return {"error": str(exc)}
        return {"error": ""}

    return app, bus
