"""An AWS Lambda function running an app's handlers on the batches of an SQS queue."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.serverless import lambda_sqs_handler

# --8<-- [start:handler]
bus = EventBus()
shipped: list[str] = []


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    yield {"warehouse": "eu-1"}  # entered once per cold start; handlers see it in request.state


app = FastAPI(lifespan=lifespan)


@bus.on("order.placed")
async def ship(event: Event, request: Request) -> None:
    shipped.append(f"{event.payload['order']} from {request.state.warehouse}")


bus.install(app)

# The function's handler setting: lambda_app.handler
handler = lambda_sqs_handler(app, on_undecodable="retry", on_unhandled="retry")
# --8<-- [end:handler]
