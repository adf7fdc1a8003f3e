from fastapi import Depends, FastAPI

from fastapi_eventbus import Event, EventBus, get_bus

app, bus = FastAPI(), EventBus()
bus.install(app)
outbox: list[str] = []


def get_outbox() -> list[str]:  # any dependency: yield, sub-dependencies, overrides
    return outbox


@bus.on("cat.*")  # wildcard patterns
async def welcome(event: Event, mail: list[str] = Depends(get_outbox)) -> None:
    mail.append(f"welcome, cat {event.payload['id']}")  # runs after the response


@app.post("/cats")
async def create_cat(bus: EventBus = Depends(get_bus)) -> dict[str, int]:
    bus.emit("cat.created", {"id": 1})  # validated here, handled after the response
    return {"id": 1}
