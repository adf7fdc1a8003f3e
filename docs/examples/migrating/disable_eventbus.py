"""fastapi-eventbus: FASTAPI_EVENTBUS_DISABLED, read when the bus is created, or capture()."""

# --8<-- [start:test]
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.testing import capture

bus = EventBus()  # reads FASTAPI_EVENTBUS_DISABLED now, once
app = FastAPI()
bus.install(app)

WELCOMED: list[int] = []  # stands in for a mail server


@bus.on("user.*")
async def send_welcome(event: Event) -> None:
    WELCOMED.append(event.payload["id"])


@app.post("/users", status_code=201)
async def sign_up(bus: Annotated[EventBus, Depends(get_bus)]) -> dict[str, int]:
    bus.emit("user.signed_up", {"id": 1})
    return {"id": 1}


def test_sign_up_without_events() -> None:
    with TestClient(app) as client, capture(bus, handle=False) as events:
        assert client.post("/users").status_code == 201

    assert events.names == ["user.signed_up"]  # emitted and validated, not handled
    assert WELCOMED == []
    # --8<-- [end:test]
