"""The custom-forwarder recipe of docs/forwarders.md, against a real ASGI receiver."""

from types import ModuleType
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response

from fastapi_eventbus import Event
from fastapi_eventbus.forwarders import DeadLetter
from tests._support import ROOT, load_module


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    path = ROOT / "docs/examples/custom_forwarder.py"
    return load_module(path, monkeypatch, "docs_custom_forwarder")


def receiver(statuses: list[int]) -> tuple[FastAPI, list[Any]]:
    """A webhook receiver answering with *statuses* in turn (then 202), recording batches."""
    app = FastAPI()
    received: list[Any] = []

    @app.post("/hooks/events")
    async def hook(request: Request) -> Response:
        status = statuses.pop(0) if statuses else 202
        if status == 202:
            received.append(await request.json())
        return Response(status_code=status)

    return app, received


@pytest.mark.anyio
async def test_the_webhook_forwarder_sends_cloudevents_batches(example: ModuleType) -> None:
    app, received = receiver([503])  # first try fails: retried
    bus = example.create_bus("http://hooks/hooks/events", httpx.ASGITransport(app=app))
    event = await bus.publish("order.placed", {"id": 1})
    await bus.publish("cat.created", {"id": 2})  # not matched: not forwarded
    await bus.close()
    assert received == [
        [
            {
                "specversion": "1.0",
                "id": event.id,
                "source": "/shop",
                "type": "order.placed",
                "time": event.time.isoformat().replace("+00:00", "Z"),
                "datacontenttype": "application/json",
                "data": {"id": 1},
            }
        ]
    ]


@pytest.mark.anyio
async def test_a_refusing_webhook_dead_letters_at_once(example: ModuleType) -> None:
    app, received = receiver([400])
    forwarder = example.WebhookForwarder(
        "http://hooks/hooks/events", transport=httpx.ASGITransport(app=app)
    )
    dead: list[DeadLetter] = []
    forwarder.dead_letter = dead.append
    event = Event(name="order.placed")
    await forwarder.deliver([event])
    await forwarder.aclose()
    assert received == []
    assert [d.ids for d in dead] == [[event.id]]
    assert "refused the events: 400" in dead[0].reason
