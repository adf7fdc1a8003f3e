"""Scaling out: the web app forwards order events to SQS, workers run the handlers.

One module builds both sides, so that they share the event models and the
handlers' dependencies:

* ``create_app()`` is the web app (serve it with uvicorn). ``POST /orders``
  emits ``order.placed``; its bus forwards ``order.*`` to the SQS queue and runs
  no handler for them.
* ``create_worker_app()`` is what the workers run: the same app with the
  handlers registered and no forwarder::

      fastapi-eventbus worker examples.worker.app:create_worker_app --factory \\
          --sqs "$ORDERS_QUEUE_URL"

Configuration comes from the environment: ``ORDERS_QUEUE_URL``, ``ORDERS_DB``
(the SQLite file both sides use) and botocore's own variables (region,
credentials, ``AWS_ENDPOINT_URL_SQS`` for LocalStack or moto).
``examples/worker/demo.py`` runs everything on one machine against moto.
"""

import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, ClassVar

from fastapi import Depends, FastAPI
from pydantic import BaseModel

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.forwarders.sqs import SQSForwarder


class OrderPlaced(BaseModel):
    """Emitted by ``POST /orders``; handled by the workers."""

    __event_name__: ClassVar[str] = "order.placed"

    order_id: int
    item: str
    email: str


class NewOrder(BaseModel):
    """The request body of ``POST /orders``."""

    item: str
    email: str


# --8<-- [start:shared]
def db_path() -> str:
    """The SQLite file of the shop (``ORDERS_DB``)."""
    return os.environ.get("ORDERS_DB", "orders.sqlite3")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Startup code: runs in the web app and, before any message, in every worker."""
    with sqlite3.connect(db_path()) as db:
        db.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item TEXT)")
        db.execute(
            "CREATE TABLE IF NOT EXISTS receipts (event_id TEXT PRIMARY KEY, order_id INTEGER,"
            " email TEXT, pid INTEGER)"
        )
    yield


def get_db() -> Iterator[sqlite3.Connection]:
    """One connection per use: committed if the caller succeeded, rolled back if not."""
    db = sqlite3.connect(db_path(), timeout=10, check_same_thread=False)
    try:
        yield db
        db.commit()
    finally:
        db.close()


Db = Annotated[sqlite3.Connection, Depends(get_db)]


def build(bus: EventBus) -> FastAPI:
    """The app both sides share: lifespan, routes, and *bus* installed."""
    app = FastAPI(title="orders", lifespan=lifespan)
    bus.install(app)

    @app.post("/orders", status_code=201)
    def place_order(
        order: NewOrder,
        db: Annotated[sqlite3.Connection, Depends(get_db, scope="function")],  # commits first
        bus: Annotated[EventBus, Depends(get_bus)],
    ) -> dict[str, int]:
        order_id = db.execute("INSERT INTO orders (item) VALUES (?)", (order.item,)).lastrowid
        assert order_id is not None
        bus.emit(OrderPlaced(order_id=order_id, item=order.item, email=order.email))
        return {"id": order_id}

    return app


# --8<-- [end:shared]


# --8<-- [start:sides]
def create_app() -> FastAPI:
    """The web app: forwards ``order.*`` to SQS, handles nothing itself."""
    bus = EventBus(source="//shop.example.com/orders")
    bus.forward("order.*", SQSForwarder(os.environ["ORDERS_QUEUE_URL"]))
    return build(bus)


def create_worker_app() -> FastAPI:
    """What ``fastapi-eventbus worker`` runs: the same app, with the handlers."""
    bus = EventBus(source="//shop.example.com/orders-worker")

    @bus.on(OrderPlaced)
    def send_receipt(event: Event, db: Db) -> None:
        order = OrderPlaced.model_validate(event.payload)
        # At-least-once delivery: the event id makes a second delivery harmless.
        db.execute(
            "INSERT OR IGNORE INTO receipts VALUES (?, ?, ?, ?)",
            (event.id, order.order_id, order.email, os.getpid()),
        )

    return build(bus)


# --8<-- [end:sides]
