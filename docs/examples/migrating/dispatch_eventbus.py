"""fastapi-eventbus: code that emits asks for the request's bus, as a dependency."""

# --8<-- [start:dispatch]
from typing import Annotated, Any

from fastapi import Depends, FastAPI

from fastapi_eventbus import Event, EventBus, get_bus

SEEN: list[tuple[str, Any]] = []  # (event name, payload) the handler received

bus = EventBus()
app = FastAPI()
bus.install(app)


@bus.on("cat.*")
async def record(event: Event) -> None:
    SEEN.append((event.name, event.payload))


class Adoptions:
    """Service code, used as a dependency: FastAPI gives it the request's bus."""

    def __init__(self, bus: Annotated[EventBus, Depends(get_bus)]) -> None:
        self.bus = bus

    def adopt(self, cat_id: int) -> None:
        self.bus.emit("cat.adopted", {"cat_id": cat_id})
        self.bus.emit("cat.spotted")  # no payload: None


@app.post("/cats/{cat_id}/adopt")
def adopt_cat(cat_id: int, adoptions: Annotated[Adoptions, Depends()]) -> dict[str, bool]:
    adoptions.adopt(cat_id)
    return {"ok": True}
    # --8<-- [end:dispatch]
