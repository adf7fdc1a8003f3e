# mypy: disable-error-code="no-untyped-call, untyped-decorator"
"""fastapi-events: FASTAPI_EVENTS_DISABLE_DISPATCH turns dispatch() into a no-op."""

# --8<-- [start:test]
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from fastapi_events.dispatcher import dispatch
from fastapi_events.handlers.local import LocalHandler
from fastapi_events.middleware import EventHandlerASGIMiddleware
from fastapi_events.typing import Event

local_handler = LocalHandler()
app = FastAPI()
app.add_middleware(EventHandlerASGIMiddleware, handlers=[local_handler])

WELCOMED: list[int] = []  # stands in for a mail server


@local_handler.register(event_name="user.*")
async def send_welcome(event: Event) -> None:
    _, payload = event
    WELCOMED.append(payload["id"])


@app.post("/users", status_code=201)
async def sign_up() -> dict[str, int]:
    dispatch("user.signed_up", payload={"id": 1})
    return {"id": 1}


def test_sign_up_without_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTAPI_EVENTS_DISABLE_DISPATCH", "1")  # read by every dispatch()
    with TestClient(app) as client:
        assert client.post("/users").status_code == 201

    assert WELCOMED == []
    # --8<-- [end:test]
