"""The smallest useful app: one endpoint emits, one handler runs after the response."""

from typing import Annotated

from fastapi import Depends, FastAPI

from fastapi_eventbus import Event, EventBus, get_bus

bus = EventBus()
app = FastAPI()
bus.install(app)

welcomed: list[int] = []  # stands in for a mail server


@bus.on("cat.*")
async def welcome_cat(event: Event) -> None:
    welcomed.append(event.payload["id"])


@app.post("/cats", status_code=201)
async def create_cat(bus: Annotated[EventBus, Depends(get_bus)]) -> dict[str, int]:
    bus.emit("cat.created", {"id": 1})  # collected now, handled after the response
    return {"id": 1}
