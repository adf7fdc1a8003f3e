"""A custom forwarder: POST each flush's events as a CloudEvents batch to a webhook."""

from collections.abc import Sequence

import httpx

from fastapi_eventbus import Event, EventBus, ForwarderError
from fastapi_eventbus.forwarders import Forwarder, Retry
from fastapi_eventbus.wire import to_cloudevent


# --8<-- [start:forwarder]
class WebhookForwarder(Forwarder):
    """Sends events to an HTTP endpoint, one request per flush."""

    def __init__(self, url: str, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(retry=Retry(attempts=3, initial_delay=0.05))
        self.url = url
        self.transport = transport
        self.client: httpx.AsyncClient | None = None

    async def start(self) -> None:  # once, before the first send
        self.client = httpx.AsyncClient(transport=self.transport, timeout=5)

    async def close(self) -> None:  # at application shutdown
        if self.client is not None:
            await self.client.aclose()

    def abandon(self) -> None:  # used on a new event loop: drop the old loop's client
        self.client = None

    async def send(self, events: Sequence[Event]) -> None:
        assert self.client is not None
        batch = [to_cloudevent(event) for event in events]
        headers = {"content-type": "application/cloudevents-batch+json"}
        try:
            response = await self.client.post(self.url, json=batch, headers=headers)
        except httpx.TransportError as exc:  # translate SDK errors where they enter
            raise ForwarderError(f"webhook unreachable: {exc}", transient=True) from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise ForwarderError(f"webhook busy: {response.status_code}", transient=True)
        if response.is_error:  # the receiver refused the events: retrying will not help
            raise ForwarderError(f"webhook refused the events: {response.status_code}")
        # --8<-- [end:forwarder]


# --8<-- [start:attach]
def create_bus(webhook_url: str, transport: httpx.AsyncBaseTransport | None = None) -> EventBus:
    bus = EventBus(source="/shop")
    bus.forward("order.*", WebhookForwarder(webhook_url, transport=transport))
    return bus
    # --8<-- [end:attach]
