"""Handlers declare dependencies exactly like endpoints.

An order shop: placing an order emits ``order.placed``; four handlers react to
it, each with the dependencies it needs.
"""

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import BackgroundTasks, Depends, FastAPI, Query, Request
from pydantic import BaseModel

from fastapi_eventbus import Event, EventBus, get_bus

bus = EventBus()
app = FastAPI()
bus.install(app)

Bus = Annotated[EventBus, Depends(get_bus)]

# Stand-ins for the outside world, so the example runs anywhere.
OUTBOX: list[tuple[str, str, str]] = []  # (sender, recipient, subject) sent by the mailer
WAREHOUSE: list[int] = []  # order ids the warehouse was told about
CACHE_WARMED: list[int] = []  # order ids whose cache entry was refreshed
REQUEST_IDS: list[str | None] = []  # X-Request-ID of the requests that emitted events


class Session:
    """Stands in for a database session; every instance is kept in SESSIONS."""

    def __init__(self) -> None:
        self.rows: list[str] = []
        self.committed = False
        self.closed = False
        SESSIONS.append(self)

    def commit(self) -> None:
        self.committed = True


SESSIONS: list[Session] = []


# --8<-- [start:dependencies]
@dataclass(frozen=True)
class Settings:
    sender: str = "shop@example.com"


def get_settings() -> Settings:
    return Settings()


class Mailer:
    """A class used as a dependency, with a sub-dependency of its own."""

    def __init__(self, settings: Annotated[Settings, Depends(get_settings)]) -> None:
        self.sender = settings.sender

    def send(self, to: str, subject: str) -> None:
        OUTBOX.append((self.sender, to, subject))


async def get_session() -> AsyncIterator[Session]:
    session = Session()
    try:
        yield session  # the handler runs here
    finally:
        session.closed = True  # after the handler returned or raised


class AuditLog:
    def __init__(self, session: Annotated[Session, Depends(get_session)]) -> None:
        self.session = session

    def write(self, line: str) -> None:
        self.session.rows.append(line)


@bus.on("order.placed")
async def send_confirmation(event: Event, mailer: Annotated[Mailer, Depends()]) -> None:
    mailer.send(event.payload["email"], f"Order {event.payload['id']} confirmed")


@bus.on("order.*")
async def record_audit(
    event: Event,
    audit: Annotated[AuditLog, Depends()],
    session: Annotated[Session, Depends(get_session)],  # the session AuditLog got
) -> None:
    audit.write(f"{event.name} {event.payload['id']}")
    session.commit()
    # --8<-- [end:dependencies]


# --8<-- [start:chaining]
@bus.on("order.placed")
async def reserve_stock(event: Event, bus: Bus) -> None:
    bus.emit("stock.reserved", {"order_id": event.payload["id"]})  # handled when we return


@bus.on("stock.reserved")
async def notify_warehouse(event: Event) -> None:
    WAREHOUSE.append(event.payload["order_id"])
    # --8<-- [end:chaining]


# --8<-- [start:request]
def warm_cache(order_id: int) -> None:
    CACHE_WARMED.append(order_id)


@bus.on("order.placed", "order.cancelled")
def remember_request(event: Event, request: Request, tasks: BackgroundTasks) -> None:
    """A sync handler: it runs in the threadpool, like a sync endpoint."""
    REQUEST_IDS.append(request.headers.get("x-request-id"))
    tasks.add_task(warm_cache, event.payload["id"])  # runs after this handler returns
    # --8<-- [end:request]


# --8<-- [start:endpoint]
class Order(BaseModel):
    item: str
    email: str


_order_ids = itertools.count(1)


@app.post("/orders", status_code=201)
async def place_order(order: Order, bus: Bus) -> dict[str, int]:
    order_id = next(_order_ids)
    bus.emit("order.placed", {"id": order_id, "item": order.item, "email": order.email})
    return {"id": order_id}


@app.delete("/orders/{order_id}", status_code=204)
async def cancel_order(order_id: int, bus: Bus) -> None:
    bus.emit("order.cancelled", {"id": order_id})
    # --8<-- [end:endpoint]


# --8<-- [start:rejected]
def register_handler_with_query_param(bus: EventBus) -> None:
    """Raises ConfigurationError: a handler has no HTTP request to read ``limit`` from."""

    @bus.on("order.placed")
    async def list_recent(event: Event, limit: Annotated[int, Query()] = 10) -> None:
        """Never registered: the decorator raises."""
        # --8<-- [end:rejected]
