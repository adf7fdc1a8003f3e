"""A small shop with an outbox: orders written with their events, as a user would write it.

The handler records each event it handled in the ``handled`` table (its id and whether it
saw the order's row), so that tests count events by id across processes. Run by uvicorn in
the crash test: ``SHOP_DB`` is the database URL (``uvicorn tests.outbox.shop:app``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import Boolean, Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.outbox import SQLAlchemyOutbox

metadata = MetaData()
orders = Table(
    "orders",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("item", String(50), nullable=False),
)
handled = Table(
    "handled",
    metadata,
    Column("n", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False),
    Column("order_id", Integer, nullable=False),
    Column("saw_order", Boolean, nullable=False),
)


def make_shop(
    url: str, *, bus_options: dict[str, Any] | None = None, **outbox_options: Any
) -> tuple[FastAPI, EventBus, AsyncEngine]:
    """The shop's app on the database at *url*; its outbox made with *outbox_options*."""
    engine = create_async_engine(url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    outbox = SQLAlchemyOutbox(engine, metadata=metadata, **outbox_options)
    bus = EventBus(outbox=outbox, **(bus_options or {}))
    slow = float(os.environ.get("SHOP_SLOW", "0"))  # the crash test's first process

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    bus.install(app)

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with sessions() as db:
            yield db

    @app.post("/orders/{order_id}")
    async def create_order(
        order_id: int,
        item: str = "book",
        fail: bool = False,
        db: AsyncSession = Depends(get_db),
        bus: EventBus = Depends(get_bus),
    ) -> dict[str, str]:
        await db.execute(insert(orders).values(id=order_id, item=item))
        event = bus.emit("order.created", {"id": order_id, "item": item}, session=db)
        if fail:
            await db.rollback()
            raise HTTPException(409, "rolled back")
        await db.commit()
        return {"event_id": event.id}

    @bus.on("order.*")
    async def record(event: Event, db: AsyncSession = Depends(get_db)) -> None:
        if slow:
            await asyncio.sleep(slow)
        order_id = event.payload["id"]
        found = await db.scalar(select(orders.c.id).where(orders.c.id == order_id))
        await db.execute(
            insert(handled).values(
                event_id=event.id, order_id=order_id, saw_order=found is not None
            )
        )
        await db.commit()

    return app, bus, engine


if "SHOP_DB" in os.environ:
    # SHOP_LEASE: a lease longer than a relay's batch takes on a busy machine (the
    # two-relay test, which counts double claims, not leases run out mid-delivery).
    lease = float(os.environ.get("SHOP_LEASE", "1.0"))
    app = make_shop(os.environ["SHOP_DB"], lease=lease, poll_interval=0.1)[0]
