"""A Cloud Run service whose handlers run on Pub/Sub push and Eventarc requests."""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.serverless import GoogleOIDC, push_router

# --8<-- [start:app]
bus = EventBus(handler_timeout=20)
shipped: list[str] = []


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    yield {"warehouse": "eu-1"}  # handlers see it in request.state


app = FastAPI(lifespan=lifespan)


@bus.on("order.placed")
async def ship(event: Event, request: Request) -> None:
    shipped.append(f"{event.payload['order']} from {request.state.warehouse}")


bus.install(app)

# Google signs each push with the subscription's service account; the emulator does not.
audience = os.environ.get("PUSH_AUDIENCE")  # the subscription's oidcToken.audience
verify = GoogleOIDC(audience, email=os.environ["PUSH_SERVICE_ACCOUNT"]) if audience else None

# POST /events/pubsub (push subscriptions) and POST /events/cloudevents (Eventarc)
app.include_router(push_router(path="/events", verify=verify))
# --8<-- [end:app]
