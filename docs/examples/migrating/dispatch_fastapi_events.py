# mypy: disable-error-code="no-untyped-call, untyped-decorator"
"""fastapi-events: dispatch() works anywhere in the request, through a context variable."""

# --8<-- [start:dispatch]
from typing import Any

from fastapi import FastAPI
from fastapi_events.dispatcher import dispatch
from fastapi_events.handlers.local import LocalHandler
from fastapi_events.middleware import EventHandlerASGIMiddleware
from fastapi_events.typing import Event

SEEN: list[tuple[str, Any]] = []  # (event name, payload) the handler received

local_handler = LocalHandler()
app = FastAPI()
app.add_middleware(EventHandlerASGIMiddleware, handlers=[local_handler])


@local_handler.register(event_name="cat.*")
async def record(event: Event) -> None:
    event_name, payload = event
    SEEN.append((str(event_name), payload))


def adopt(cat_id: int) -> None:
    """Service code, called by the endpoint: it dispatches without being given anything."""
    dispatch("cat.adopted", payload={"cat_id": cat_id})
    dispatch("cat.spotted")  # no payload


@app.post("/cats/{cat_id}/adopt")
def adopt_cat(cat_id: int) -> dict[str, bool]:
    adopt(cat_id)
    return {"ok": True}
    # --8<-- [end:dispatch]
