"""The spool and the capacity limits of docs/delivery.md (tested: tests/test_docs_delivery.py)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException

from fastapi_eventbus import CapacityError, EventBus, get_bus
from fastapi_eventbus.forwarders import Forwarder
from fastapi_eventbus.spool import Spool


# --8<-- [start:spool]
def create_app(spool_path: Path, orders: Forwarder, max_pending: int = 50_000) -> FastAPI:
    bus = EventBus(
        spool=Spool(spool_path, max_attempts=20),  # or just spool=spool_path
        max_batch_events=1_000,  # per request; more raise CapacityError at emit
        max_pending_events=max_pending,  # across requests; bounds memory if brokers stall
    )
    bus.forward("order.*", orders)
    app = FastAPI()
    bus.install(app)  # its lifespan sends what a previous run left, then keeps at it

    @app.post("/orders", status_code=201)
    async def place(events: Annotated[EventBus, Depends(get_bus)]) -> dict[str, str]:
        try:
            event = events.emit("order.placed", {"item": "book"})  # on disk when this returns
        except CapacityError as exc:  # the process is behind: tell the client to come back
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from exc
        return {"event": event.id}

    return app


# --8<-- [end:spool]


# --8<-- [start:dead]
def review_dead_letters(spool_path: Path) -> int:
    """Print what could not be delivered, and put it back in line."""
    spool = Spool(spool_path)
    for item in spool.dead():
        print(item.forwarder, item.event.id, item.event.name, item.error)
    return spool.replay()  # a running app sends them within its resend interval


# --8<-- [end:dead]


# --8<-- [start:mounted]
def mount_shop(shop: FastAPI) -> FastAPI:
    """An outer app serving *shop* (which has the bus) under /shop."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with shop.router.lifespan_context(shop):  # Starlette runs only the outer one's
            yield

    main = FastAPI(lifespan=lifespan)
    main.mount("/shop", shop)
    return main


# --8<-- [end:mounted]
