"""A worker's handlers tested without a broker: `MemorySource` stands in for the queue."""

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.testing import MemorySource
from fastapi_eventbus.worker import Worker

bus = EventBus()
PAID: list[str] = []


@bus.on("order.paid")
async def book_payment(event: Event) -> None:
    if event.payload["amount"] < 0:
        raise ValueError("a negative amount")
    PAID.append(event.id)


# --8<-- [start:test]
async def test_book_payment() -> None:
    source = MemorySource(max_deliveries=3)  # then dead-lettered, like a redrive policy
    good = Event(name="order.paid", payload={"amount": 5})
    source.put(good)
    source.put(Event(name="order.paid", payload={"amount": -1}))
    async with Worker(bus, source):
        await source.join()  # every message acknowledged or dead
    assert [good.id] == PAID
    (dead,) = source.dead
    assert dead.receive_count == 3
    # --8<-- [end:test]
