"""Static typing as a user sees it, checked by ``mypy --strict`` (and run by pytest).

The ``type: ignore`` comments are assertions: mypy runs with ``warn_unused_ignores``,
so if ``@bus.on`` lost the handler's signature, or ``emit`` stopped rejecting a model
with a payload, the ignore would become unused and mypy would fail.
"""

from typing import Annotated, ClassVar, assert_type

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from fastapi_eventbus import Event, EventBus, get_bus

Bus = Annotated[EventBus, Depends(get_bus)]


class CatCreated(BaseModel):
    __event_name__: ClassVar[str] = "cat.created"
    id: int


def test_on_preserves_the_handler_signature() -> None:
    bus = EventBus()

    def retries() -> int:
        return 3

    @bus.on("cat.*")
    def handler(event: Event, retries: Annotated[int, Depends(retries)]) -> None: ...

    @bus.on(CatCreated)
    def typed(cat: CatCreated) -> str:
        return str(cat.id)

    assert_type(typed(CatCreated(id=1)), str)
    with pytest.raises(TypeError):
        handler(event=Event(name="x"), unknown=1)  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        typed("not a cat")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_emit_and_publish_overloads() -> None:
    bus = EventBus()
    assert_type(await bus.publish("cat.created", {"id": 1}), Event)
    assert_type(await bus.publish(CatCreated(id=1)), Event)
    with pytest.raises(ValueError, match="model and a payload"):
        await bus.publish(CatCreated(id=1), {"id": 2})  # type: ignore[call-overload]


def test_annotated_alias_for_the_bus() -> None:
    bus = EventBus()
    app = FastAPI()
    bus.install(app)

    @app.post("/")
    def endpoint(bus: Bus) -> str:
        return assert_type(bus.emit("cat.created", {"id": 1}), Event).name

    assert TestClient(app).post("/").json() == "cat.created"
