"""Handlers for events that other services produced: their names, payloads and attributes."""

from fastapi_eventbus import Event, EventBus

bus = EventBus()
seen: list[str] = []


# --8<-- [start:handlers]
@bus.on("com.example.billing.*")  # a CloudEvent from another service: its `type`
async def billing(event: Event) -> None:
    invoice = event.payload  # its `data` (or `data_base64`, decoded)
    subject = event.extensions.get("subject")  # its other attributes: subject, dataschema, ...
    seen.append(f"{event.name} {invoice['id']} {subject} from {event.source}")


@bus.on("Order Placed")  # an EventBridge event: its `detail-type`
async def order_placed(event: Event) -> None:
    order = event.payload  # its `detail`
    seen.append(f"{event.name} {order['id']} from {event.source}")  # source: com.shop.orders


# --8<-- [end:handlers]
