# mypy: disable-error-code="no-untyped-call, untyped-decorator"
"""fastapi-events: with ``fastapi-events[otel]``, dispatch() and LocalHandler make spans.

They use the global tracer provider. Here it keeps the spans in memory, so that
tests/test_docs_migrating.py can read them (in a process of its own, since the
global provider can be set only once).
"""

# --8<-- [start:otel]
from typing import Any

from fastapi import FastAPI
from fastapi_events.dispatcher import dispatch
from fastapi_events.handlers.local import LocalHandler
from fastapi_events.middleware import EventHandlerASGIMiddleware
from fastapi_events.typing import Event
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

PAYLOADS: list[Any] = []  # what the handler received

exporter = InMemorySpanExporter()  # in production: an OTLP exporter, in a BatchSpanProcessor
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)  # the only provider fastapi-events uses

local_handler = LocalHandler()
app = FastAPI()
app.add_middleware(EventHandlerASGIMiddleware, handlers=[local_handler])


@local_handler.register(event_name="order.*")
async def reserve_stock(event: Event) -> None:
    _, payload = event
    PAYLOADS.append(payload)


@app.post("/orders", status_code=201)
async def place_order() -> dict[str, int]:
    dispatch("order.placed", payload={"order_id": 1})
    return {"id": 1}
    # --8<-- [end:otel]
