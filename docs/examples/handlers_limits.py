"""Time limits, retries and the event envelope, for the handlers of a shop's paid orders.

Paying an order emits ``order.paid``. One handler refreshes a cache and must be quick, one
books a shipment with a carrier whose API fails now and then, one sends the receipt once per
event. Another handler builds a monthly report: a long job.
"""

import asyncio
import math
from typing import Annotated, ClassVar

from fastapi import Depends, FastAPI
from pydantic import BaseModel

from fastapi_eventbus import Event, EventBus, Retry, current_event, get_bus


class StockCache:
    """Stands in for a cache server; with ``stuck = True`` it stops answering."""

    def __init__(self) -> None:
        self.refreshed: list[int] = []
        self.stuck = False

    async def refresh(self, order_id: int) -> None:
        if self.stuck:
            await asyncio.Event().wait()  # never set: only a time limit ends this call
        self.refreshed.append(order_id)


class Carrier:
    """Stands in for a carrier's API; it fails its next ``outages`` calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.outages = 0
        self.booked: list[int] = []

    async def book(self, order_id: int) -> str:
        self.calls += 1
        if self.outages > 0:
            self.outages -= 1
            raise ConnectionError("carrier API unavailable")
        self.booked.append(order_id)
        return f"TRACK-{order_id}"


STOCK_CACHE = StockCache()
CARRIER = Carrier()
REPORTS: list[str] = []  # the months whose report was built
RECEIPTS: dict[str, int] = {}  # event id -> order id, for each receipt sent


# --8<-- [start:timeouts]
bus = EventBus(handler_timeout=10.0)  # for handlers without timeout= (default: 60 s)
app = FastAPI()
bus.install(app)


@bus.on("order.paid", timeout=0.5)
async def refresh_stock_cache(event: Event) -> None:
    """Takes milliseconds: if the cache is stuck, give up after half a second."""
    await STOCK_CACHE.refresh(event.payload["id"])


@bus.on("report.requested", timeout=math.inf)
async def build_monthly_report(event: Event) -> None:
    """A long job: no time limit."""
    await asyncio.sleep(0)  # stands in for minutes of work
    REPORTS.append(event.payload["month"])
    # --8<-- [end:timeouts]


# --8<-- [start:retry]
class OrderPaid(BaseModel):
    __event_name__: ClassVar[str] = "order.paid"

    id: int
    amount: int


@bus.on(OrderPaid, retry=Retry(attempts=3, initial_delay=0.1, max_delay=1.0, total_timeout=10))
async def book_shipment(order: OrderPaid) -> None:
    """The carrier's API fails now and then: up to 3 tries, about 0.1 s, then 0.2 s apart."""
    await CARRIER.book(order.id)
    # --8<-- [end:retry]


# --8<-- [start:envelope]
@bus.on(OrderPaid)
async def send_receipt(order: OrderPaid, event: Annotated[Event, Depends(current_event)]) -> None:
    """A broker delivers an event again if any of its handlers failed: one receipt per id."""
    if event.id in RECEIPTS:
        return
    RECEIPTS[event.id] = order.id  # stands in for mailing the receipt
    # --8<-- [end:envelope]


@app.post("/orders/{order_id}/pay")
async def pay(
    order_id: int, amount: int, bus: Annotated[EventBus, Depends(get_bus)]
) -> dict[str, str]:
    event = bus.emit(OrderPaid(id=order_id, amount=amount))
    return {"event_id": event.id}
