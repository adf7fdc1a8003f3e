"""fastapi-eventbus: a forwarder of your own, subclassing Forwarder."""

# --8<-- [start:handler]
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.forwarders import Forwarder

AUDIT_SERVICE: list[list[tuple[str, Any]]] = []  # stands in for a remote audit log: batches


class AuditLogForwarder(Forwarder):
    """Sends the events of each request to the audit service, in one call."""

    loop_bound = False  # no client tied to an event loop (see "Writing your own forwarder")

    async def send(self, events: Sequence[Event]) -> None:
        AUDIT_SERVICE.append([(event.name, event.payload) for event in events])


bus = EventBus()
app = FastAPI()
bus.install(app)
bus.forward("*", AuditLogForwarder())


@app.post("/orders", status_code=201)
async def place_order(bus: Annotated[EventBus, Depends(get_bus)]) -> dict[str, int]:
    bus.emit("order.placed", {"order_id": 1})
    bus.emit("order.paid", {"order_id": 1})
    return {"id": 1}
    # --8<-- [end:handler]
