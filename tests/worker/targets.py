"""Things for ``fastapi-eventbus handlers`` to list, and things it must refuse."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI

from fastapi_eventbus import Event, EventBus, Retry
from fastapi_eventbus.forwarders import EchoForwarder


def settings() -> dict[str, str]:
    """A dependency."""
    return {}


class Mailer:
    """A class dependency."""


bus = EventBus()
app = FastAPI()
bus.install(app)
bus.forward(["order.*", "cat.*"], EchoForwarder(name="echo"))


@bus.on("order.*", "cat.*")
async def audit(event: Event, config: Annotated[dict[str, str], Depends(settings)]) -> None:
    """Registered under two patterns."""


@bus.on("order.placed", timeout=2.5, retry=Retry(attempts=3))
def send_mail(event: Event, mailer: Annotated[Mailer, Depends()]) -> None:
    """A sync handler."""


empty = EventBus()
nothing = 42


def create_app() -> FastAPI:
    """A factory: ``--factory`` calls it."""
    return app


def failing_factory() -> FastAPI:
    """A factory that cannot build its app."""
    raise RuntimeError("no settings")
