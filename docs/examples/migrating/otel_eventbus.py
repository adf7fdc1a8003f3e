"""fastapi-eventbus: instrument_bus(bus) traces emits, handlers, sends and workers.

The provider keeps the spans in memory, so that tests/test_docs_migrating.py can read them.
"""

# --8<-- [start:otel]
from typing import Annotated

from fastapi import Depends, FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.otel import instrument_bus

EVENTS: list[Event] = []  # what the handler received

exporter = InMemorySpanExporter()  # in production: an OTLP exporter, in a BatchSpanProcessor
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))

bus = EventBus()
instrument_bus(bus, tracer_provider=provider)  # without tracer_provider: the global provider
app = FastAPI()
bus.install(app)


@bus.on("order.*")
async def reserve_stock(event: Event) -> None:
    EVENTS.append(event)


@app.post("/orders", status_code=201)
async def place_order(bus: Annotated[EventBus, Depends(get_bus)]) -> dict[str, int]:
    bus.emit("order.placed", {"order_id": 1})
    return {"id": 1}
    # --8<-- [end:otel]
