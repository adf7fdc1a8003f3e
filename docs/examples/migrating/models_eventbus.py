"""fastapi-eventbus: a pydantic model with __event_name__ is emitted as the event."""

# --8<-- [start:model]
from typing import Annotated, ClassVar

import pydantic
from fastapi import Depends, FastAPI

from fastapi_eventbus import EventBus, get_bus

bus = EventBus()
app = FastAPI()
bus.install(app)

FED: list[object] = []  # the cat_id of each cat that got a fish


class CatRequestedAFishEvent(pydantic.BaseModel):
    __event_name__: ClassVar[str] = "cat-requested-a-fish"

    cat_id: pydantic.UUID4


@bus.on(CatRequestedAFishEvent)  # the name "cat-requested-a-fish", exactly
async def feed_cat(event: CatRequestedAFishEvent) -> None:
    FED.append(event.cat_id)  # validated again: a UUID


@app.post("/cats/{cat_id}/fish", status_code=202)
async def request_fish(
    cat_id: pydantic.UUID4, bus: Annotated[EventBus, Depends(get_bus)]
) -> dict[str, bool]:
    bus.emit(CatRequestedAFishEvent(cat_id=cat_id))
    return {"ok": True}
    # --8<-- [end:model]
