"""An app factory: one module-level bus and its handlers, installed on every app it builds.

The app is at the top; the tests below it, one new app each, are what you would put in your
test suite.
"""

from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.testing import capture


# --8<-- [start:app]
class Mailer:
    """Stands in for a mail client; it keeps what it sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, to: str) -> None:
        self.sent.append(to)


def get_mailer() -> Mailer:
    return Mailer()


bus = EventBus()  # module level: its handlers are registered once, at import


@bus.on("user.created")
async def welcome(event: Event, mailer: Annotated[Mailer, Depends(get_mailer)]) -> None:
    mailer.send(event.payload["email"])


def create_app() -> FastAPI:
    app = FastAPI()
    bus.install(app)  # the same bus on every app the factory builds

    @app.post("/users")
    async def create_user(email: str, bus: Annotated[EventBus, Depends(get_bus)]) -> None:
        bus.emit("user.created", {"email": email})

    return app
    # --8<-- [end:app]


# --8<-- [start:tests]
def test_a_new_user_is_welcomed() -> None:
    app = create_app()  # a new app for this test
    mailer = Mailer()
    app.dependency_overrides[get_mailer] = lambda: mailer  # this app's overrides only

    with TestClient(app) as client, capture(EventBus.of(app)) as events:
        client.post("/users", params={"email": "ada@example.com"})

    assert events.names == ["user.created"]
    assert mailer.sent == ["ada@example.com"]


def test_each_app_has_overrides_of_its_own() -> None:
    first, second = create_app(), create_app()
    mailer = Mailer()
    first.dependency_overrides[get_mailer] = lambda: mailer

    with TestClient(second) as client:
        client.post("/users", params={"email": "bob@example.com"})  # second's own Mailer

    assert mailer.sent == []
    # --8<-- [end:tests]
