"""Events and your database: an orders API whose events commit with its data.

Async SQLAlchemy with aiosqlite. The database is ``DATABASE_URL`` (a file ``shop.db`` in the
working directory by default). Run it: ``uvicorn outbox:app``; run the job at the end with
``python outbox.py ORDER_ID``. Tested: tests/test_docs_outbox.py.
"""

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import String, create_engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.outbox import SQLAlchemyOutbox

MAILS: list[str] = []  # stands in for the mails a real handler would send


# --8<-- [start:setup]
class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20), default="placed")


engine = create_async_engine(os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///shop.db"))
sessions = async_sessionmaker(engine, expire_on_commit=False)

# The outbox's two tables are defined in Base.metadata, next to your models.
outbox = SQLAlchemyOutbox(engine, metadata=Base.metadata)
bus = EventBus(outbox=outbox)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as connection:  # in production: your migrations
        await connection.run_sync(Base.metadata.create_all)  # the outbox's tables too
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)
bus.install(app)  # its lifespan also runs the outbox's relay


async def get_db() -> AsyncIterator[AsyncSession]:
    async with sessions() as db:  # closing it without a commit rolls back
        yield db


Db = Annotated[AsyncSession, Depends(get_db)]
Bus = Annotated[EventBus, Depends(get_bus)]
# --8<-- [end:setup]


class NewOrder(BaseModel):
    item: str


# --8<-- [start:emit]
@app.post("/orders", status_code=201)
async def place_order(new: NewOrder, db: Db, bus: Bus) -> dict[str, int]:
    order = Order(item=new.item)
    db.add(order)
    await db.flush()  # gives the order its id
    bus.emit("order.placed", {"id": order.id}, session=db)  # written in db's transaction
    await db.commit()  # the order and its event, together
    return {"id": order.id}


@bus.on("order.*")
async def send_mail(event: Event, db: Db) -> None:
    order = await db.get(Order, event.payload["id"])
    if order is None:
        raise LookupError(f"order {event.payload['id']} not found")
    MAILS.append(f"order {order.id} ({order.item}) is {order.status}")
    # --8<-- [end:emit]


# --8<-- [start:rollback]
@app.post("/orders/{order_id}/cancel")
async def cancel_order(order_id: int, db: Db, bus: Bus) -> dict[str, str]:
    order = await db.get(Order, order_id)
    if order is None:
        raise HTTPException(404, "no such order")
    order.status = "cancelled"
    bus.emit("order.cancelled", {"id": order_id}, session=db)
    if order.item == "gift card":  # any failure before the commit
        raise HTTPException(409, "gift cards cannot be cancelled")
    await db.commit()
    return {"status": order.status}
    # On 409, get_db closes the session without committing: the status change and the
    # event are rolled back together, and send_mail never hears of it.
    # --8<-- [end:rollback]


# --8<-- [start:sync-script]
def import_orders(database_url: str, items: list[str]) -> None:
    """A sync script, with no event loop: a running app's relay delivers its events."""
    engine = create_engine(database_url)  # the app's database: "sqlite:///shop.db"
    with Session(engine) as db:
        for item in items:
            order = Order(item=item)
            db.add(order)
            db.flush()
            bus.emit("order.placed", {"id": order.id}, session=db)  # the app's bus
        db.commit()  # the orders and their events; the events are due at once
    engine.dispose()
    # --8<-- [end:sync-script]


# --8<-- [start:dead]
async def review_dead_letters() -> int:
    """Print what the outbox gave up on, and put it back in line."""
    for item in await outbox.dead():
        where = item.forwarder or "local handlers"  # "": the event's own handlers
        print(item.event.id, item.event.name, where, item.attempts, item.error)
    return await outbox.replay()  # due at once: a running app's relay delivers them
    # --8<-- [end:dead]


# --8<-- [start:script]
async def cancel_orders(order_ids: list[int]) -> None:
    """Outside any request: a command, a scheduled job. The transaction is the batch."""
    async with sessions() as db:
        for order_id in order_ids:
            order = await db.get(Order, order_id)
            if order is not None and order.status == "placed":
                order.status = "cancelled"
                bus.emit("order.cancelled", {"id": order_id}, session=db)
        await db.commit()  # the handlers start now, on this event loop
    await bus.close()  # waits for them; leaves what did not finish to the relay
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(cancel_orders([int(arg) for arg in sys.argv[1:]]))
# --8<-- [end:script]
