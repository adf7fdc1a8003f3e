"""fastapi-eventbus: outside a request, ``await bus.publish(...)`` handles the event now."""

# --8<-- [start:outside]
import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from fastapi_eventbus import Event, EventBus

bus = EventBus()

STARTS: list[Any] = []  # the payload of each app.started event handled


@bus.on("app.started")
async def note_start(event: Event) -> None:
    STARTS.append(event.payload)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await bus.publish("app.started", {"version": "1.0"})  # returns when the handlers are done
    yield


app = FastAPI(lifespan=lifespan)
bus.install(app)


async def main() -> None:
    """A script, a cron job: no app, no request, and no id to pass around."""
    await bus.publish("app.started", {"version": "script"})
    await bus.close()  # waits for what is in flight and closes the forwarders, if any


if __name__ == "__main__":
    asyncio.run(main())
# --8<-- [end:outside]
