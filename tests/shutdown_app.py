"""The application of the shutdown tests (`tests/test_shutdown.py`), served by uvicorn.

```
python -m uvicorn tests.shutdown_app:create_app --factory --port 8000
```

``POST /orders?n=20`` emits *n* ``order.placed`` events, each handled by a slow
handler: async (``asyncio.sleep``), sync (``time.sleep`` in the threadpool) or
hung (never returns), per `KIND_ENV`; or, with ``forwarding``, no handler but a
forwarder whose broker is down (its sends retried for a minute). Every id the
handler finished is appended to the file `HANDLED_ENV` names; every id the bus
reported through its hooks (``on_discard``, ``on_error``, ``dead_letter``) to the
file `REPORTED_ENV` names.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI

from fastapi_eventbus import (
    DiscardedEvents,
    Event,
    EventBus,
    ForwarderError,
    HandlerFailure,
    get_bus,
)
from fastapi_eventbus.forwarders import DeadLetter, Forwarder, Retry

KIND_ENV = "SHUTDOWN_HANDLER_KIND"
HANDLED_ENV = "SHUTDOWN_HANDLED"
REPORTED_ENV = "SHUTDOWN_REPORTED"
SHUTDOWN_TIMEOUT = 2.0
HANDLER_SECONDS = 0.2


def create_app() -> FastAPI:
    handled, reported = Path(os.environ[HANDLED_ENV]), Path(os.environ[REPORTED_ENV])

    def on_discard(discarded: DiscardedEvents) -> None:
        _append(reported, *discarded.ids)

    def on_error(failure: HandlerFailure) -> None:
        _append(reported, failure.event.id)

    bus = EventBus(shutdown_timeout=SHUTDOWN_TIMEOUT, on_discard=on_discard, on_error=on_error)
    kind = os.environ[KIND_ENV]
    if kind == "async":

        @bus.on("order.placed")
        async def record(event: Event) -> None:
            await asyncio.sleep(HANDLER_SECONDS)
            _append(handled, event.id)

    elif kind == "sync":

        @bus.on("order.placed")
        def record_sync(event: Event) -> None:
            time.sleep(HANDLER_SECONDS)
            _append(handled, event.id)

    elif kind == "forwarding":  # no handler: a broker that is down, retried for a minute
        bus.forward("order.*", Down(dead_letter=lambda letter: _append(reported, *letter.ids)))
    else:

        @bus.on("order.placed", timeout=math.inf)
        async def hang(event: Event) -> None:
            await asyncio.Event().wait()

    app = FastAPI()
    bus.install(app)

    @app.post("/orders")
    async def place_orders(
        bus: Annotated[EventBus, Depends(get_bus)], n: int = 10
    ) -> dict[str, list[str]]:
        return {"ids": [bus.emit("order.placed", {"line": line}).id for line in range(n)]}

    return app


class Down(Forwarder):
    """A broker that is down: every send fails, and is retried for up to a minute."""

    def __init__(self, dead_letter: Callable[[DeadLetter], None]) -> None:
        super().__init__(name="down", retry=Retry(total_timeout=60), dead_letter=dead_letter)

    async def send(self, events: Sequence[Event]) -> None:
        raise ForwarderError("the broker is down", transient=True)


def _append(path: Path, *ids: str) -> None:
    with path.open("a") as file:
        file.writelines(f"{event_id}\n" for event_id in ids)
