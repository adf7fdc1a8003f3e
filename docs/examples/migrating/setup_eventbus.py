"""fastapi-eventbus: the bus is installed on the app; endpoints get it with Depends(get_bus)."""

# --8<-- [start:app]
from typing import Annotated

from fastapi import Depends, FastAPI

from fastapi_eventbus import Event, EventBus, get_bus

WELCOMED: list[int] = []  # stands in for a mail server

bus = EventBus()
app = FastAPI()
bus.install(app)  # instead of the middleware


@bus.on("cat.*")
async def welcome_cat(event: Event) -> None:
    WELCOMED.append(event.payload["id"])


@app.post("/cats", status_code=201)
async def create_cat(bus: Annotated[EventBus, Depends(get_bus)]) -> dict[str, int]:
    bus.emit("cat.created", {"id": 1})
    return {"id": 1}
    # --8<-- [end:app]
