# mypy: disable-error-code="no-untyped-call, untyped-decorator"
"""fastapi-events: payload schemas in a global registry, checked by dispatch()."""

# --8<-- [start:schema]
import uuid
from datetime import UTC, datetime
from enum import Enum
from typing import Literal

from fastapi import FastAPI
from fastapi_events.dispatcher import dispatch
from fastapi_events.handlers.local import LocalHandler
from fastapi_events.middleware import EventHandlerASGIMiddleware
from fastapi_events.registry.payload_schema import registry as payload_schema
from fastapi_events.typing import Event
from pydantic import BaseModel

local_handler = LocalHandler()
app = FastAPI()
app.add_middleware(EventHandlerASGIMiddleware, handlers=[local_handler])

WELCOMED: list[tuple[str, int]] = []  # (plan, year of sign-up) of each welcome mail


class UserEvents(Enum):
    SIGNED_UP = "USER_SIGNED_UP"
    ACTIVATED = "USER_ACTIVATED"


@payload_schema.register(event_name=UserEvents.SIGNED_UP)
class SignUpPayload(BaseModel):
    user_id: uuid.UUID
    plan: Literal["free", "pro"]
    created_at: datetime


@local_handler.register(event_name=UserEvents.SIGNED_UP)
async def send_welcome(event: Event) -> None:
    _, payload = event  # a dict: created_at is a datetime
    WELCOMED.append((payload["plan"], payload["created_at"].year))


class NewUser(BaseModel):
    plan: str


@app.post("/users", status_code=201)
async def sign_up(user: NewUser) -> dict[str, bool]:
    # Validated here: a plan other than "free" or "pro" raises pydantic's ValidationError.
    dispatch(
        UserEvents.SIGNED_UP,
        {"user_id": uuid.uuid4(), "plan": user.plan, "created_at": datetime.now(UTC)},
    )
    return {"ok": True}
    # --8<-- [end:schema]
