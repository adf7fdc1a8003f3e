"""An orders API that publishes to SNS and EventBridge, and a worker reading a queue behind
them: the example of docs/forwarders-sns-eventbridge.md."""

from typing import Annotated, Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.forwarders.eventbridge import EventBridgeForwarder
from fastapi_eventbus.forwarders.sns import SNSForwarder
from fastapi_eventbus.worker import SQSSource, Worker


class Order(BaseModel):
    item: str
    customer: str


# --8<-- [start:app]
def create_app(topic_arn: str, event_bus_name: str, **aws: Any) -> FastAPI:
    """The orders API: each `order.*` event goes to the SNS topic and the EventBridge bus."""
    bus = EventBus(source="//shop.example.com/orders")
    bus.forward("order.*", SNSForwarder(topic_arn, verify_on_start=True, **aws))
    bus.forward(
        "order.*",
        EventBridgeForwarder(event_bus_name, source="com.example.shop", **aws),
    )
    app = FastAPI()
    bus.install(app)

    @app.post("/orders")
    async def place_order(
        order: Order, bus: Annotated[EventBus, Depends(get_bus)]
    ) -> dict[str, str]:
        event = bus.emit("order.placed", order.model_dump())
        return {"event_id": event.id}

    return app


# --8<-- [end:app]


# --8<-- [start:fifo]
def customer_of(event: Event) -> str:
    """The message group: one customer's orders keep their order."""
    return str(event.payload["customer"])


fifo = SNSForwarder(
    "arn:aws:sns:eu-west-1:123456789012:orders.fifo",
    message_group_id=customer_of,  # required for a .fifo topic; dedup id = event id
)
# --8<-- [end:fifo]

# --8<-- [start:worker]
shipping = EventBus()  # the shipping service's bus: its own handlers
shipped: list[str] = []


@shipping.on("order.placed")
async def ship(event: Event) -> None:
    shipped.append(event.id)  # the id the orders API emitted, whichever way it came


def create_worker(queue_url: str, **options: Any) -> Worker:
    """A worker for an SQS queue subscribed to the topic, or a rule's target."""
    return Worker(shipping, SQSSource(queue_url, **options))


# --8<-- [end:worker]
