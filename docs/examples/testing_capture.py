"""Testing an app's events with `fastapi_eventbus.testing.capture`.

The app is at the top; the tests below it are what you would put in your test suite.
"""

from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.testing import capture

# --8<-- [start:app]
bus = EventBus()
app = FastAPI()
bus.install(app)


class Shelter:
    """Stands in for the shelter's API client."""

    def __init__(self) -> None:
        self.notes: list[int] = []

    def note_adoption(self, cat_id: int) -> None:
        self.notes.append(cat_id)


SHELTER = Shelter()


def get_shelter() -> Shelter:
    return SHELTER


@bus.on("cat.adopted")
async def notify_shelter(event: Event, shelter: Annotated[Shelter, Depends(get_shelter)]) -> None:
    shelter.note_adoption(event.payload["id"])


@app.post("/cats/{cat_id}/adopt")
async def adopt(cat_id: int, bus: Annotated[EventBus, Depends(get_bus)]) -> dict[str, int]:
    bus.emit("cat.adopted", {"id": cat_id})
    return {"id": cat_id}
    # --8<-- [end:app]


# --8<-- [start:capture]
def test_adopting_a_cat_notifies_the_shelter() -> None:
    with TestClient(app) as client, capture(bus) as events:
        response = client.post("/cats/7/adopt")

    assert response.status_code == 200
    assert events.names == ["cat.adopted"]
    assert events.emitted[0].payload == {"id": 7}
    assert events.handlers_for("cat.adopted") == [f"{__name__}.notify_shelter"]
    assert SHELTER.notes == [7]
    # --8<-- [end:capture]


# --8<-- [start:no-handlers]
def test_adopt_emits_without_running_handlers() -> None:
    with TestClient(app) as client, capture(bus, handle=False) as events:
        client.post("/cats/8/adopt")

    assert events.names == ["cat.adopted"]
    assert events.handled == []
    assert 8 not in SHELTER.notes
    # --8<-- [end:no-handlers]


# --8<-- [start:publish]
@pytest.mark.anyio
async def test_notify_shelter_on_its_own() -> None:
    with capture(bus) as events:
        await bus.publish("cat.adopted", {"id": 9})  # returns once the handlers are done

    assert [call.handler for call in events.handled] == [f"{__name__}.notify_shelter"]
    assert SHELTER.notes[-1] == 9
    # --8<-- [end:publish]


# --8<-- [start:failures]
class ClosedShelter(Shelter):
    def note_adoption(self, cat_id: int) -> None:
        raise ConnectionError("the shelter's API is down")


def test_a_shelter_outage_is_a_handler_failure() -> None:
    app.dependency_overrides[get_shelter] = ClosedShelter
    try:
        with TestClient(app) as client, capture(bus, raise_failures=False) as events:
            response = client.post("/cats/10/adopt")
    finally:
        app.dependency_overrides.clear()

    assert response.status_code == 200  # sent before the handler ran
    [failure] = events.failures
    assert failure.handler == f"{__name__}.notify_shelter"
    assert isinstance(failure.error, ConnectionError)
    # --8<-- [end:failures]
