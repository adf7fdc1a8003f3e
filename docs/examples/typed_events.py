"""Typed events: pydantic models as events, and payload schemas checked at emit time."""

from datetime import date
from typing import Annotated, ClassVar

from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field

from fastapi_eventbus import Event, EventBus, get_bus

bus = EventBus()
app = FastAPI()
bus.install(app)

Bus = Annotated[EventBus, Depends(get_bus)]

GREETED: list["CatCreated"] = []  # the cats greet_cat received
RECORDED: list[tuple[str, object]] = []  # (event name, payload) seen by record


# --8<-- [start:model]
class CatCreated(BaseModel):
    __event_name__: ClassVar[str] = "cat.created"

    id: int
    name: str
    born: date | None = None


@bus.on(CatCreated)  # matches "cat.created" exactly
async def greet_cat(cat: CatCreated) -> None:
    GREETED.append(cat)  # a validated CatCreated, rebuilt from the payload


@bus.on("cat.*")
async def record(event: Event) -> None:
    RECORDED.append((event.name, event.payload))  # the payload as JSON data


@app.post("/cats", status_code=201)
async def create_cat(cat: CatCreated, bus: Bus) -> CatCreated:
    bus.emit(cat)
    return cat
    # --8<-- [end:model]


# --8<-- [start:schema]
class CatRenamed(BaseModel):
    id: int
    new_name: str = Field(min_length=1)


bus.register("cat.renamed", CatRenamed)


class Rename(BaseModel):
    new_name: str


@app.post("/cats/{cat_id}/rename")
async def rename_cat(cat_id: int, body: Rename, bus: Bus) -> dict[str, bool]:
    # Validated against CatRenamed here: an empty name raises InvalidEventError now.
    bus.emit("cat.renamed", {"id": cat_id, "new_name": body.new_name})
    return {"ok": True}
    # --8<-- [end:schema]
