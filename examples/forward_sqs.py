"""Forward order events to AWS SQS, after the response, as CloudEvents.

``create_app`` builds an orders API whose ``order.*`` events go to an SQS queue:
the endpoint emits, the response is sent, then the request's events leave in
``SendMessageBatch`` calls. A consumer reads them back with
`fastapi_eventbus.wire.decode_message` (see ``receive_events``).

Configuration comes from the arguments or from the environment:
``ORDERS_QUEUE_URL`` for the queue, and botocore's own variables for the rest
(``AWS_DEFAULT_REGION``, credentials, ``AWS_ENDPOINT_URL_SQS`` for LocalStack or moto).

Run it: ``python examples/forward_sqs.py``. It starts moto's SQS server on
127.0.0.1 (``pip install 'moto[server]'``), creates a queue, serves the app with
uvicorn, places a few orders over HTTP, then reads the queue and prints the events.
"""

import asyncio
import itertools
import logging
import os
import threading
import time
from typing import Annotated, ClassVar

from fastapi import Depends, FastAPI
from pydantic import BaseModel

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.forwarders import DeadLetter, Retry
from fastapi_eventbus.forwarders.sqs import SQSForwarder
from fastapi_eventbus.wire import decode_message

logger = logging.getLogger("orders")


class OrderPlaced(BaseModel):
    """Emitted when an order is placed; forwarded to SQS."""

    __event_name__: ClassVar[str] = "order.placed"

    order_id: int
    item: str
    customer: str


class NewOrder(BaseModel):
    """The request body of ``POST /orders``."""

    item: str
    customer: str


# --8<-- [start:dead-letter]
def log_undelivered(letter: DeadLetter) -> None:
    """Dead-letter callback: the events SQS did not take, after every retry.

    In production, store them somewhere durable (a table, a file) to replay later.
    """
    logger.error("not sent to SQS (%s): %s", letter.reason, ", ".join(letter.ids))


# --8<-- [end:dead-letter]


# --8<-- [start:app]
def create_app(queue_url: str | None = None, *, endpoint_url: str | None = None) -> FastAPI:
    """The orders API; its ``order.*`` events go to the SQS queue at *queue_url*."""
    bus = EventBus(source="//shop.example.com/orders")  # the CloudEvents `source`
    app = FastAPI(title="orders")
    bus.install(app)  # its lifespan closes the forwarder's client on shutdown
    bus.forward(
        "order.*",
        SQSForwarder(
            queue_url or os.environ["ORDERS_QUEUE_URL"],
            endpoint_url=endpoint_url,  # None: AWS, or AWS_ENDPOINT_URL_SQS if set
            retry=Retry(initial_delay=0.2, total_timeout=30),  # tries for 30 s
            dead_letter=log_undelivered,
            verify_on_start=True,  # a wrong queue, region or credentials stop the startup
        ),
    )
    order_ids = itertools.count(1)

    @app.post("/orders", status_code=201)
    async def place_order(
        order: NewOrder, bus: Annotated[EventBus, Depends(get_bus)]
    ) -> dict[str, int]:
        order_id = next(order_ids)
        bus.emit(OrderPlaced(order_id=order_id, item=order.item, customer=order.customer))
        return {"id": order_id}  # sent before the event leaves for SQS

    return app


# --8<-- [end:app]


# --8<-- [start:receive]
async def receive_events(
    queue_url: str, *, endpoint_url: str | None = None, count: int = 1, timeout: float = 10
) -> list[Event]:
    """Read *count* events from the queue (deleting them), as a worker would."""
    from aiobotocore.session import AioSession

    events: list[Event] = []
    deadline = time.monotonic() + timeout
    async with AioSession().create_client("sqs", endpoint_url=endpoint_url) as sqs:
        while len(events) < count and time.monotonic() < deadline:
            response = await sqs.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=10,
                MessageAttributeNames=["All"],  # trace context travels there
                WaitTimeSeconds=1,
            )
            for message in response.get("Messages", []):
                events.append(decode_message(message))
                await sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return events


# --8<-- [end:receive]


async def create_queue(name: str, *, endpoint_url: str | None = None) -> str:
    """Create the queue *name* (if it does not exist) and return its URL."""
    from aiobotocore.session import AioSession

    async with AioSession().create_client("sqs", endpoint_url=endpoint_url) as sqs:
        return (await sqs.create_queue(QueueName=name))["QueueUrl"]


def main() -> None:
    """Run the whole round trip against moto's SQS server, printing what happens."""
    import httpx
    import uvicorn
    from moto.server import ThreadedMotoServer

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
    # moto accepts any credentials; these keep botocore from looking for real ones.
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    queue_url = asyncio.run(create_queue("orders", endpoint_url=endpoint))
    print(f"moto SQS on {endpoint}, queue {queue_url}")

    app = create_app(queue_url, endpoint_url=endpoint)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    app_port = server.servers[0].sockets[0].getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{app_port}") as client:
        for item in ("book", "lamp", "kettle"):
            response = client.post("/orders", json={"item": item, "customer": "ada"})
            print(f"POST /orders {item!r} -> {response.status_code} {response.json()}")
    server.should_exit = True  # the shutdown waits for events still being sent
    thread.join(timeout=10)

    events = asyncio.run(receive_events(queue_url, endpoint_url=endpoint, count=3))
    for event in sorted(events, key=lambda event: event.payload["order_id"]):
        print(f"received {event.name} from {event.source}: {event.payload} (id {event.id})")
    moto.stop()


if __name__ == "__main__":
    main()
