"""Tracing with OpenTelemetry: one trace from the request to every handler.

``create_app`` builds a small shop whose bus is traced by
`fastapi_eventbus.otel.instrument_bus` and whose requests are traced by
``FastAPIInstrumentor``. ``POST /orders`` emits ``order.placed`` and
``order.paid``; after the response:

* ``reserve_stock`` and ``notify_warehouse`` handle ``order.placed``; the
  warehouse is down, so ``notify_warehouse`` raises and its span has ERROR status;
* ``send_receipt`` handles ``order.paid`` and emits ``receipt.sent`` through
  ``Depends(get_bus)``; ``file_receipt`` handles that one.

Every handler span is a child of its event's emit span, and the chained emit is a
child of the handler that emitted it: the whole request is one trace.
``create_native_app`` is the same shop traced by FastAPI's built-in telemetry
instead (FastAPI versions with ``fastapi.telemetry``).

Run it: ``python examples/tracing.py``. It makes one request and prints the
finished spans as a tree, from an in-memory exporter.
"""

import itertools
from collections import defaultdict
from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.otel import instrument_bus


class NewOrder(BaseModel):
    """The request body of ``POST /orders``."""

    item: str
    price: float


# --8<-- [start:provider]
def tracing_to_memory() -> tuple[TracerProvider, InMemorySpanExporter]:
    """An SDK tracer provider that keeps finished spans in memory.

    In production, give the provider a ``BatchSpanProcessor`` with an OTLP exporter.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


# --8<-- [end:provider]


# --8<-- [start:instrument]
def create_app(provider: TracerProvider) -> FastAPI:
    """The shop, traced: the bus by `instrument_bus`, the requests by ``FastAPIInstrumentor``."""
    bus = EventBus()
    instrument_bus(bus, tracer_provider=provider)
    app = FastAPI(title="shop")
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=provider, exclude_spans=["receive", "send"]
    )
    return add_shop(app, bus)


# --8<-- [end:instrument]


# --8<-- [start:native]
def create_native_app(provider: TracerProvider) -> FastAPI:
    """The same shop, with FastAPI's built-in telemetry tracing the requests."""
    bus = EventBus()
    instrument_bus(bus, tracer_provider=provider)
    app = FastAPI(title="shop", telemetry={"tracer_provider": provider})
    return add_shop(app, bus)


# --8<-- [end:native]


# --8<-- [start:shop]
def add_shop(app: FastAPI, bus: EventBus) -> FastAPI:
    """Install *bus* on *app*, with the shop's endpoint and handlers."""
    bus.install(app)
    stock = {"book": 3}
    outbox: list[str] = []
    order_ids = itertools.count(1)

    def get_stock() -> dict[str, int]:
        return stock

    def get_outbox() -> list[str]:
        return outbox

    @bus.on("order.placed")
    def reserve_stock(event: Event, stock: Annotated[dict[str, int], Depends(get_stock)]) -> None:
        stock[event.payload["item"]] -= 1

    @bus.on("order.placed")
    async def notify_warehouse(event: Event) -> None:
        raise ConnectionError("warehouse unreachable")

    @bus.on("order.paid")
    async def send_receipt(
        event: Event,
        outbox: Annotated[list[str], Depends(get_outbox)],
        bus: Annotated[EventBus, Depends(get_bus)],
    ) -> None:
        outbox.append(f"receipt for order {event.payload['order_id']}")
        bus.emit("receipt.sent", {"order_id": event.payload["order_id"]})  # a chained event

    @bus.on("receipt.sent")
    async def file_receipt(event: Event, outbox: Annotated[list[str], Depends(get_outbox)]) -> None:
        outbox.append(f"filed receipt {event.payload['order_id']}")

    @app.post("/orders", status_code=201)
    async def place_order(
        order: NewOrder, bus: Annotated[EventBus, Depends(get_bus)]
    ) -> dict[str, int]:
        order_id = next(order_ids)
        bus.emit("order.placed", {"order_id": order_id, "item": order.item})
        bus.emit("order.paid", {"order_id": order_id, "amount": order.price})
        return {"id": order_id}

    return app


# --8<-- [end:shop]


Children = defaultdict[int | None, list[ReadableSpan]]
"""Spans by the span id of their parent (None: roots)."""


def span_tree(spans: Iterable[ReadableSpan]) -> str:
    """*spans* as indented trees, one per trace: children under their parent, by start time.

    Each line: the span's name, kind and status, and the handler of a handler span.
    """
    children = _by_parent(spans)
    rows: list[tuple[int, ReadableSpan]] = []
    for root in children[None]:
        _walk(root, 1, children, rows)
    width = max((2 * depth + len(span.name) for depth, span in rows), default=0)
    lines: list[str] = []
    trace_id = None
    for depth, span in rows:
        context = span.get_span_context()
        if depth == 1 and context is not None and context.trace_id != trace_id:
            trace_id = context.trace_id
            lines.append(f"trace {trace_id:032x}")
        lines.append(_line(span, depth, width))
    return "\n".join(lines)


def _by_parent(spans: Iterable[ReadableSpan]) -> Children:
    """*spans* by start time, under their parent; a span whose parent is missing is a root."""
    ordered = sorted(spans, key=lambda span: span.start_time or 0)
    ids = {_span_id(span) for span in ordered}
    children: Children = defaultdict(list)
    for span in ordered:
        parent = span.parent.span_id if span.parent is not None else None
        children[parent if parent in ids else None].append(span)
    return children


def _walk(
    span: ReadableSpan, depth: int, children: Children, rows: list[tuple[int, ReadableSpan]]
) -> None:
    rows.append((depth, span))
    for child in children[_span_id(span)]:
        _walk(child, depth + 1, children, rows)


def _line(span: ReadableSpan, depth: int, width: int) -> str:
    label = f"{'  ' * depth}{span.name}".ljust(width)
    status = span.status.status_code.name
    handler = str((span.attributes or {}).get("code.function.name", "")).rsplit(".", 1)[-1]
    return f"{label}  {span.kind.name:<8}  {status:<5}  {handler}".rstrip()


def _span_id(span: ReadableSpan) -> int | None:
    context = span.get_span_context()
    return context.span_id if context is not None else None


def main() -> None:
    """Make one request, then print its spans (the global tracer provider is never set)."""
    provider, exporter = tracing_to_memory()
    app = create_app(provider)
    with TestClient(app) as client:
        response = client.post("/orders", json={"item": "book", "price": 12.5})
        print(f"POST /orders -> {response.status_code} {response.json()}")
    print(span_tree(exporter.get_finished_spans()))


if __name__ == "__main__":
    main()
