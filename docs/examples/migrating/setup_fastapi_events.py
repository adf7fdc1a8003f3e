# mypy: disable-error-code="no-untyped-call, untyped-decorator"
"""fastapi-events: a middleware runs the registered handlers after each response."""

# --8<-- [start:app]
from fastapi import FastAPI
from fastapi_events.dispatcher import dispatch
from fastapi_events.handlers.local import LocalHandler
from fastapi_events.middleware import EventHandlerASGIMiddleware
from fastapi_events.typing import Event

WELCOMED: list[int] = []  # stands in for a mail server

local_handler = LocalHandler()  # or: from fastapi_events.handlers.local import local_handler
app = FastAPI()
app.add_middleware(EventHandlerASGIMiddleware, handlers=[local_handler])


@local_handler.register(event_name="cat.*")
async def welcome_cat(event: Event) -> None:
    _, payload = event
    WELCOMED.append(payload["id"])


@app.post("/cats", status_code=201)
async def create_cat() -> dict[str, int]:
    dispatch("cat.created", payload={"id": 1})
    return {"id": 1}
    # --8<-- [end:app]
