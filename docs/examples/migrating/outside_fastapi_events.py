# mypy: disable-error-code="no-untyped-call, untyped-decorator"
"""fastapi-events: outside a request, dispatch() needs the middleware's id.

The README does this in an ``@app.on_event("startup")`` function; FastAPI
deprecates those, so this uses a lifespan. Either way the event is handled in
an asyncio task of its own, which nothing waits for.
"""

# --8<-- [start:outside]
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_events.dispatcher import dispatch
from fastapi_events.handlers.local import LocalHandler
from fastapi_events.middleware import EventHandlerASGIMiddleware
from fastapi_events.typing import Event

local_handler = LocalHandler()

STARTS: list[Any] = []  # the payload of each app.started event handled


@local_handler.register(event_name="app.started")
async def note_start(event: Event) -> None:
    _, payload = event
    STARTS.append(payload)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Without middleware_id, dispatch() here raises LookupError.
    dispatch("app.started", payload={"version": "1.0"}, middleware_id=event_handler_id)
    yield


app = FastAPI(lifespan=lifespan)
event_handler_id: int = id(app)
app.add_middleware(
    EventHandlerASGIMiddleware, handlers=[local_handler], middleware_id=event_handler_id
)
# --8<-- [end:outside]
