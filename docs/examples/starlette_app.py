"""A plain Starlette app: no FastAPI routing, the same bus, handlers and dependencies."""

from typing import Annotated

from fastapi import Depends
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.starlette import request_bus, with_bus

bus = EventBus()

welcomed: list[str] = []  # stands in for a mail server
audited: list[str] = []  # stands in for an audit log


def greeting() -> str:  # handlers still get FastAPI's dependency injection
    return "welcome"


@bus.on("cat.created")
async def welcome_cat(event: Event, word: Annotated[str, Depends(greeting)]) -> None:
    welcomed.append(f"{word}, {event.payload['name']}")


@bus.on("cat.audited")
def record_audit(event: Event) -> None:
    audited.append(event.payload["name"])


# --8<-- [start:endpoints]
@with_bus
async def create_cat(request: Request, bus: EventBus) -> JSONResponse:
    cat = await request.json()
    bus.emit("cat.created", cat)  # validated here, handled after the response
    return JSONResponse(cat, status_code=201)


def audit(request: Request) -> None:  # deeper code that has the request, not the bus
    request_bus(request).emit("cat.audited", {"name": request.path_params["name"]})


class Cat(HTTPEndpoint):
    @with_bus
    async def delete(self, request: Request, bus: EventBus) -> JSONResponse:
        audit(request)
        return JSONResponse({"deleted": request.path_params["name"]})


app = Starlette(
    routes=[
        Route("/cats", create_cat, methods=["POST"]),
        Route("/cats/{name}", Cat),
    ]
)
bus.install(app)  # binds the bus and wraps the lifespan, as for FastAPI
# --8<-- [end:endpoints]
