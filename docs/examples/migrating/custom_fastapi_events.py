"""fastapi-events: a handler of your own, subclassing BaseEventHandler."""

# --8<-- [start:handler]
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi_events.dispatcher import dispatch
from fastapi_events.handlers.base import BaseEventHandler
from fastapi_events.middleware import EventHandlerASGIMiddleware
from fastapi_events.typing import Event

AUDIT_SERVICE: list[list[tuple[str, Any]]] = []  # stands in for a remote audit log: batches


class AuditLogHandler(BaseEventHandler):
    """Sends the events of each request to the audit service, in one call."""

    async def handle(self, event: Event) -> None:
        await self.handle_many([event])

    async def handle_many(self, events: Iterable[Event]) -> None:
        AUDIT_SERVICE.append([(str(name), payload) for name, payload in events])


app = FastAPI()
app.add_middleware(EventHandlerASGIMiddleware, handlers=[AuditLogHandler()])


@app.post("/orders", status_code=201)
async def place_order() -> dict[str, int]:
    dispatch("order.placed", payload={"order_id": 1})
    dispatch("order.paid", payload={"order_id": 1})
    return {"id": 1}
    # --8<-- [end:handler]
