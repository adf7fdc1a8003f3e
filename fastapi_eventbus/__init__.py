"""Events for FastAPI, handled after the response, with FastAPI's own dependency injection.

```python
from fastapi import Depends, FastAPI
from fastapi_eventbus import Event, EventBus, get_bus

bus = EventBus()
app = FastAPI()
bus.install(app)

@bus.on("cat.*")
async def log_cat(event: Event) -> None:
    print(event.name, event.payload)

@app.post("/cats")
async def create_cat(bus: EventBus = Depends(get_bus)) -> dict[str, bool]:
    bus.emit("cat.created", {"id": 1})
    return {"ok": True}
```
"""

from importlib.metadata import PackageNotFoundError, version

from ._attributes import Extensions
from ._bus import EventBus, get_bus
from ._di import current_event
from ._events import Event
from ._hooks import DiscardedEvents, HandlerFailure, OnDiscard, OnError
from ._retry import Retry
from .exceptions import (
    BusNotInstalledError,
    CapacityError,
    ConfigurationError,
    EventBusError,
    EventChainError,
    ForwarderError,
    HandlerFailuresError,
    InvalidEventError,
    MessageDecodeError,
    MissingExtraError,
    OutsideRequestError,
    SourceError,
    SpoolError,
)

try:
    __version__ = version("fastapi-eventbus-di")
    """The installed distribution's version (``"0.0.0"`` in a source tree never installed)."""
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "BusNotInstalledError",
    "CapacityError",
    "ConfigurationError",
    "DiscardedEvents",
    "Event",
    "EventBus",
    "EventBusError",
    "EventChainError",
    "Extensions",
    "ForwarderError",
    "HandlerFailure",
    "HandlerFailuresError",
    "InvalidEventError",
    "MessageDecodeError",
    "MissingExtraError",
    "OnDiscard",
    "OnError",
    "OutsideRequestError",
    "Retry",
    "SourceError",
    "SpoolError",
    "__version__",
    "current_event",
    "get_bus",
]
