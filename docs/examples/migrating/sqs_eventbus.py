"""fastapi-eventbus: SQSForwarder sends the events to SQS; workers run the handlers.

The queue URL comes from ``EVENTS_QUEUE_URL``; aiobotocore reads the rest from
botocore's usual environment (credentials, ``AWS_ENDPOINT_URL_SQS`` for LocalStack or moto).
"""

# --8<-- [start:app]
import os
from typing import Annotated

from fastapi import Depends, FastAPI

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.forwarders.sqs import SQSForwarder

bus = EventBus()
app = FastAPI()
bus.install(app)  # its lifespan closes the SQS client on shutdown
bus.forward("*", SQSForwarder(os.environ["EVENTS_QUEUE_URL"], region_name="us-east-1"))


@app.post("/orders", status_code=201)
async def place_order(bus: Annotated[EventBus, Depends(get_bus)]) -> dict[str, int]:
    bus.emit("order.placed", {"order_id": 1})
    return {"id": 1}
    # --8<-- [end:app]


# --8<-- [start:worker]
RECEIPTS: list[int] = []  # the orders send_receipt handled, in the worker

worker_bus = EventBus()
worker_app = FastAPI()  # `fastapi-eventbus worker sqs_eventbus:worker_app --sqs ...`
worker_bus.install(worker_app)


@worker_bus.on("order.*")
async def send_receipt(event: Event) -> None:
    RECEIPTS.append(event.payload["order_id"])
    # --8<-- [end:worker]
