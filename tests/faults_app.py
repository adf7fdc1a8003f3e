"""The application of the fault tests (`tests/test_faults.py`), served by uvicorn in a subprocess.

```
python -m uvicorn tests.faults_app:create_app --factory --port 8000
```

Configured by environment variables: the spool file (`SPOOL_ENV`), the SQS queue
(`QUEUE_ENV`) and endpoint (`ENDPOINT_ENV`), AWS credentials and region from the
usual ``AWS_*`` variables, and optionally a file (`HANDLED_ENV`) to which a slow
local handler appends the id of every event it handled.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.forwarders import Retry
from fastapi_eventbus.forwarders.sqs import SQSForwarder

SPOOL_ENV = "FAULTS_SPOOL"
QUEUE_ENV = "FAULTS_QUEUE_URL"
ENDPOINT_ENV = "FAULTS_SQS_ENDPOINT"
HANDLED_ENV = "FAULTS_HANDLED"
SHUTDOWN_TIMEOUT = 5.0
HANDLER_SECONDS = 0.2
"""How long the local handler takes per event."""
RETRY = Retry(attempts=2, initial_delay=0.05, max_delay=0.1, total_timeout=5)
"""Short in-process retries: what still fails is left to the spool."""


def create_app() -> FastAPI:
    """The app: ``POST /orders?n=10`` emits *n* ``order.placed`` events and returns their ids."""
    bus = EventBus(spool=os.environ[SPOOL_ENV], shutdown_timeout=SHUTDOWN_TIMEOUT)
    bus.forward(
        "order.*",
        SQSForwarder(
            os.environ[QUEUE_ENV],
            endpoint_url=os.environ[ENDPOINT_ENV],
            region_name=os.environ["AWS_DEFAULT_REGION"],
            aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            retry=RETRY,
        ),
    )
    if handled := os.environ.get(HANDLED_ENV):
        _handle_locally(bus, Path(handled))
    app = FastAPI()
    bus.install(app)

    @app.post("/orders")
    async def place_orders(
        bus: Annotated[EventBus, Depends(get_bus)], n: int = 10
    ) -> dict[str, list[str]]:
        return {"ids": [bus.emit("order.placed", {"line": line}).id for line in range(n)]}

    return app


def _handle_locally(bus: EventBus, handled: Path) -> None:
    @bus.on("order.placed")
    async def record(event: Event) -> None:
        await asyncio.sleep(HANDLER_SECONDS)
        await asyncio.to_thread(_append, handled, event.id)


def _append(path: Path, line: str) -> None:
    with path.open("a") as file:
        file.write(line + "\n")
