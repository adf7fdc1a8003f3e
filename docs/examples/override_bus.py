"""Replacing a handler's dependency, or the whole bus, in tests."""

import smtplib
from email.message import EmailMessage
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_eventbus import Event, EventBus, get_bus

# --8<-- [start:app]
bus = EventBus()
app = FastAPI()
bus.install(app)


class Mailer:
    def __init__(self, host: str) -> None:
        self.host = host

    def send(self, to: str, subject: str) -> None:
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "shop@example.com", to, subject
        with smtplib.SMTP(self.host) as smtp:
            smtp.send_message(message)


def get_mailer() -> Mailer:
    return Mailer("smtp.example.com")


@bus.on("cat.adopted")
def email_adopter(event: Event, mailer: Annotated[Mailer, Depends(get_mailer)]) -> None:
    mailer.send(event.payload["email"], "Welcome home!")


@app.post("/cats/{cat_id}/adopt")
async def adopt(
    cat_id: int, email: str, bus: Annotated[EventBus, Depends(get_bus)]
) -> dict[str, int]:
    bus.emit("cat.adopted", {"id": cat_id, "email": email})
    return {"id": cat_id}
    # --8<-- [end:app]


# --8<-- [start:override-dependency]
class FakeMailer(Mailer):
    def __init__(self) -> None:
        super().__init__(host="unused")
        self.sent: list[tuple[str, str]] = []

    def send(self, to: str, subject: str) -> None:
        self.sent.append((to, subject))


def test_adopter_gets_an_email() -> None:
    mailer = FakeMailer()
    app.dependency_overrides[get_mailer] = lambda: mailer
    try:
        with TestClient(app) as client:
            client.post("/cats/1/adopt", params={"email": "ada@example.com"})
    finally:
        app.dependency_overrides.clear()

    assert mailer.sent == [("ada@example.com", "Welcome home!")]
    # --8<-- [end:override-dependency]


# --8<-- [start:override-bus]
def test_with_a_bus_of_its_own() -> None:
    test_bus = EventBus()  # not installed: it only serves the override
    seen: list[Event] = []

    @test_bus.on("*")
    async def record(event: Event) -> None:
        seen.append(event)

    app.dependency_overrides[get_bus] = test_bus.dependency
    try:
        with TestClient(app) as client:
            client.post("/cats/2/adopt", params={"email": "bob@example.com"})
    finally:
        app.dependency_overrides.clear()

    assert [event.payload for event in seen] == [{"id": 2, "email": "bob@example.com"}]
    # --8<-- [end:override-bus]
