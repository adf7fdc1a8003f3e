# mypy: disable-error-code="no-untyped-call, untyped-decorator"
"""fastapi-events: a pydantic model with __event_name__ is dispatched as the event."""

# --8<-- [start:model]
import pydantic
from fastapi import FastAPI
from fastapi_events.dispatcher import dispatch
from fastapi_events.handlers.local import LocalHandler
from fastapi_events.middleware import EventHandlerASGIMiddleware
from fastapi_events.typing import Event

local_handler = LocalHandler()
app = FastAPI()
app.add_middleware(EventHandlerASGIMiddleware, handlers=[local_handler])

FED: list[object] = []  # the cat_id of each cat that got a fish


class CatRequestedAFishEvent(pydantic.BaseModel):
    __event_name__ = "cat-requested-a-fish"

    cat_id: pydantic.UUID4


@local_handler.register(event_name="cat-requested-a-fish")
async def feed_cat(event: Event) -> None:
    _, payload = event  # the model, dumped to a dict
    FED.append(payload["cat_id"])


@app.post("/cats/{cat_id}/fish", status_code=202)
async def request_fish(cat_id: pydantic.UUID4) -> dict[str, bool]:
    dispatch(CatRequestedAFishEvent(cat_id=cat_id))
    return {"ok": True}
    # --8<-- [end:model]
