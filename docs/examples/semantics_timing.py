"""When events are handled, for each kind of endpoint."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import BackgroundTasks, Depends, FastAPI, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from fastapi_eventbus import Event, EventBus, get_bus

TIMELINE: list[str] = []  # what happened, in order


# --8<-- [start:lifespan]
@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await bus.publish("app.started")  # no request here: publish handles it now and waits
    yield


bus = EventBus()
app = FastAPI(lifespan=lifespan)
bus.install(app)  # wraps the lifespan above: on shutdown, in-flight events are awaited
# --8<-- [end:lifespan]

Bus = Annotated[EventBus, Depends(get_bus)]


@bus.on("*")
async def record(event: Event) -> None:
    TIMELINE.append(f"handled {event.name}")


def note(what: str) -> None:
    TIMELINE.append(what)


# --8<-- [start:plain]
@app.post("/orders")
async def place_order(bus: Bus, tasks: BackgroundTasks) -> dict[str, bool]:
    bus.emit("order.placed")
    bus.emit("order.paid")
    tasks.add_task(note, "endpoint's background task")
    return {"ok": True}
    # --8<-- [end:plain]


# --8<-- [start:own-background]
@app.post("/reports")
async def build_report(bus: Bus) -> JSONResponse:
    bus.emit("report.requested")
    return JSONResponse({"ok": True}, background=BackgroundTask(note, "response's background"))
    # --8<-- [end:own-background]


# --8<-- [start:streaming]
@app.get("/export")
async def export(bus: Bus) -> StreamingResponse:
    bus.emit("export.started")

    async def rows() -> AsyncIterator[bytes]:
        for row in (b"a\n", b"b\n"):
            yield row
        bus.emit("export.finished")  # still part of this request's events

    return StreamingResponse(rows(), media_type="text/csv")
    # --8<-- [end:streaming]


# --8<-- [start:websocket]
@app.websocket("/chat")
async def chat(websocket: WebSocket, bus: Bus) -> None:
    await websocket.accept()
    async for text in websocket.iter_text():
        bus.emit("chat.message", {"text": text})  # handled now, in order, by a tracked task
        await websocket.send_text("ok")
    # --8<-- [end:websocket]


# --8<-- [start:spawned]
_imports: set[asyncio.Task[None]] = set()


async def run_import(bus: EventBus) -> None:
    await asyncio.sleep(0.01)  # the import's real work
    bus.emit("import.finished")  # after the response: handled by a task the bus tracks


@app.post("/imports", status_code=202)
async def start_import(bus: Bus) -> dict[str, str]:
    task = asyncio.create_task(run_import(bus))
    _imports.add(task)
    task.add_done_callback(_imports.discard)
    return {"status": "started"}
    # --8<-- [end:spawned]
