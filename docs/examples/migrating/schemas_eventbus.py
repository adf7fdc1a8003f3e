"""fastapi-eventbus: payload schemas registered on the bus, checked by emit()."""

# --8<-- [start:schema]
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from fastapi import Depends, FastAPI
from pydantic import BaseModel

from fastapi_eventbus import Event, EventBus, get_bus

bus = EventBus()
app = FastAPI()
bus.install(app)

WELCOMED: list[tuple[str, int]] = []  # (plan, year of sign-up) of each welcome mail


class UserEvents(StrEnum):  # event names are str: a StrEnum, not a plain Enum
    SIGNED_UP = "USER_SIGNED_UP"
    ACTIVATED = "USER_ACTIVATED"


class SignUpPayload(BaseModel):
    user_id: uuid.UUID
    plan: Literal["free", "pro"]
    created_at: datetime


bus.register(UserEvents.SIGNED_UP, SignUpPayload)


@bus.on(UserEvents.SIGNED_UP)
async def send_welcome(event: Event) -> None:
    payload = SignUpPayload.model_validate(event.payload)  # JSON data: created_at is a str
    WELCOMED.append((payload.plan, payload.created_at.year))


class NewUser(BaseModel):
    plan: str


@app.post("/users", status_code=201)
async def sign_up(user: NewUser, bus: Annotated[EventBus, Depends(get_bus)]) -> dict[str, bool]:
    # Validated here: a plan other than "free" or "pro" raises InvalidEventError.
    bus.emit(
        UserEvents.SIGNED_UP,
        {"user_id": uuid.uuid4(), "plan": user.plan, "created_at": datetime.now(UTC)},
    )
    return {"ok": True}
    # --8<-- [end:schema]
