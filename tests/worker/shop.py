"""The app the worker tests run: a web side that forwards orders, a worker side that handles them.

The worker side is what ``fastapi-eventbus worker tests.worker.shop:worker_app --factory``
runs in another process. Its handler writes to the SQLite file named by ``WORKER_TEST_DB``
through a ``yield`` dependency, which finds the file through the lifespan's state; the test
reads the file. The payload steers the handler: ``fail_times`` fails the first deliveries,
``sleep`` makes it slow. ``WORKER_TEST_OVERRIDE=1`` overrides the ``label`` dependency
through ``app.dependency_overrides``.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Request

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.forwarders import Forwarder

DB_ENV = "WORKER_TEST_DB"
OVERRIDE_ENV = "WORKER_TEST_OVERRIDE"
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS attempts (event_id TEXT, pid INTEGER)",
    "CREATE TABLE IF NOT EXISTS handled (event_id TEXT, payload TEXT, label TEXT, pid INTEGER)",
    "CREATE TABLE IF NOT EXISTS lifecycle (what TEXT, pid INTEGER)",
)


def web_app(forwarder: Forwarder) -> FastAPI:
    """The web side: ``POST /orders`` emits ``order.placed``, which goes to *forwarder*."""
    bus = EventBus(source="//tests/shop")
    app = FastAPI()
    bus.install(app)
    bus.forward("order.*", forwarder)

    @app.post("/orders")
    async def place(
        order: Annotated[dict[str, Any], Body()], bus: Annotated[EventBus, Depends(get_bus)]
    ) -> dict[str, str]:
        return {"id": bus.emit("order.placed", order).id}

    return app


def execute(db_path: str | Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """Run one statement on its own connection, committed at once."""
    with sqlite3.connect(db_path, timeout=10) as db:
        rows = db.execute(sql, args).fetchall()
    db.close()
    return rows


def get_db(request: Request) -> Iterator[sqlite3.Connection]:
    """A connection to the lifespan's database; committed after the handler, else rolled back."""
    db = sqlite3.connect(request.state.db_path, timeout=10, check_same_thread=False)
    try:
        yield db
        db.commit()
    finally:
        db.close()


def label() -> str:
    """Overridden through ``app.dependency_overrides`` when the test asks for it."""
    return "real"


def worker_app() -> FastAPI:
    """The worker side: the ``order.*`` handler, and the database its lifespan sets up."""
    db_path = os.environ[DB_ENV]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        for statement in SCHEMA:
            execute(db_path, statement)
        execute(db_path, "INSERT INTO lifecycle VALUES ('startup', ?)", os.getpid())
        yield {"db_path": db_path}
        execute(db_path, "INSERT INTO lifecycle VALUES ('shutdown', ?)", os.getpid())

    bus = EventBus()
    app = FastAPI(lifespan=lifespan)
    bus.install(app)
    if os.environ.get(OVERRIDE_ENV) == "1":
        app.dependency_overrides[label] = lambda: "overridden"

    @bus.on("order.*")
    def record(  # sync, in the threadpool: SQLite waits for locks by blocking its thread
        event: Event,
        db: Annotated[sqlite3.Connection, Depends(get_db)],
        tag: Annotated[str, Depends(label)],
    ) -> None:
        execute(db_path, "INSERT INTO attempts VALUES (?, ?)", event.id, os.getpid())
        count = "SELECT COUNT(*) FROM attempts WHERE event_id = ?"
        ((attempt,),) = execute(db_path, count, event.id)
        time.sleep(float(event.payload.get("sleep", 0)))
        if attempt <= int(event.payload.get("fail_times", 0)):
            raise RuntimeError(f"injected failure, attempt {attempt}")
        db.execute(
            "INSERT INTO handled VALUES (?, ?, ?, ?)",
            (event.id, repr(event.payload), tag, os.getpid()),
        )

    return app
