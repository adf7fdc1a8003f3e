"""fastapi-eventbus: PubSubForwarder publishes the events to a topic; workers run the handlers.

The topic comes from ``EVENTS_TOPIC`` (``projects/my-shop/topics/events``); with
``PUBSUB_EMULATOR_HOST`` set, the forwarder and the worker use that emulator.
"""

# --8<-- [start:app]
import os
from typing import Annotated

from fastapi import Depends, FastAPI

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.forwarders.pubsub import PubSubForwarder

bus = EventBus()
app = FastAPI()
bus.install(app)  # its lifespan closes the HTTP session on shutdown
bus.forward("*", PubSubForwarder(os.environ["EVENTS_TOPIC"]))


@app.post("/orders", status_code=201)
async def place_order(bus: Annotated[EventBus, Depends(get_bus)]) -> dict[str, int]:
    bus.emit("order.placed", {"order_id": 1})
    return {"id": 1}
    # --8<-- [end:app]


# --8<-- [start:worker]
RECEIPTS: list[int] = []  # the orders send_receipt handled, in the worker

worker_bus = EventBus()
worker_app = FastAPI()  # `fastapi-eventbus worker pubsub_eventbus:worker_app --pubsub ...`
worker_bus.install(worker_app)


@worker_bus.on("order.*")
async def send_receipt(event: Event) -> None:
    RECEIPTS.append(event.payload["order_id"])
    # --8<-- [end:worker]
