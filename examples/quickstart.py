"""Quickstart: an orders API whose events are handled after each response.

Two handlers listen for ``order.*`` events:

* ``write_audit`` records every order event in an ``audit`` table, through a
  ``yield`` database-session dependency (SQLite from the standard library),
  exactly as an endpoint would;
* ``send_receipt`` takes the typed ``OrderPlaced`` event.

The endpoint commits its own write *before* the response (``scope="function"``),
so the handlers, which run after the response, see the new row. See
"The request-scoped commit pitfall" in the docs.

Run it: ``python examples/quickstart.py``
"""

import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, ClassVar

from fastapi import Depends, FastAPI
from pydantic import BaseModel

from fastapi_eventbus import Event, EventBus, get_bus


class OrderPlaced(BaseModel):
    """Emitted when an order is placed."""

    __event_name__: ClassVar[str] = "order.placed"

    order_id: int
    item: str
    email: str


class NewOrder(BaseModel):
    """The request body of ``POST /orders``."""

    item: str
    email: str


def create_app(db_path: Path) -> FastAPI:
    """Build the app, its bus and its handlers around the SQLite file *db_path*."""
    bus = EventBus()
    app = FastAPI(title="quickstart")
    bus.install(app)
    receipts: list[str] = []
    app.state.receipts = receipts

    with sqlite3.connect(db_path) as setup:
        setup.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item TEXT)")
        setup.execute("CREATE TABLE IF NOT EXISTS audit (order_id INTEGER, event TEXT)")

    def get_db() -> Iterator[sqlite3.Connection]:
        """One connection per use; commits if the caller succeeded, rolls back if not."""
        db = sqlite3.connect(db_path, check_same_thread=False)
        try:
            yield db
            db.commit()
        except Exception:
            db.rollback()
            raise
        finally:
            db.close()

    # scope="function": the session commits before the response, so before handlers run.
    Db = Annotated[sqlite3.Connection, Depends(get_db, scope="function")]
    Bus = Annotated[EventBus, Depends(get_bus)]

    @bus.on("order.*")
    def write_audit(event: Event, db: Annotated[sqlite3.Connection, Depends(get_db)]) -> None:
        order_id = event.payload["order_id"]
        (exists,) = db.execute("SELECT COUNT(*) FROM orders WHERE id = ?", (order_id,)).fetchone()
        db.execute("INSERT INTO audit VALUES (?, ?)", (order_id, f"{event.name} seen={exists}"))

    @bus.on(OrderPlaced)
    async def send_receipt(event: OrderPlaced) -> None:
        receipts.append(f"receipt for order {event.order_id} ({event.item}) to {event.email}")

    @app.post("/orders", status_code=201)
    def place_order(order: NewOrder, db: Db, bus: Bus) -> dict[str, int]:
        cursor = db.execute("INSERT INTO orders (item) VALUES (?)", (order.item,))
        order_id = cursor.lastrowid
        assert order_id is not None
        bus.emit(OrderPlaced(order_id=order_id, item=order.item, email=order.email))
        return {"id": order_id}

    @app.get("/audit")
    def audit(db: Db) -> list[list[object]]:
        return [list(row) for row in db.execute("SELECT order_id, event FROM audit")]

    @app.get("/receipts")
    async def list_receipts() -> list[str]:
        return receipts

    return app


def main() -> None:
    """Serve the app with uvicorn, place a few orders over HTTP, print what the handlers did."""
    import httpx
    import uvicorn

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Path(tmp) / "quickstart.sqlite3")
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for item in ("book", "lamp", "kettle"):
                response = client.post("/orders", json={"item": item, "email": "ada@example.com"})
                print(f"POST /orders {item!r} -> {response.status_code} {response.json()}")
            deadline = time.monotonic() + 5
            while len(client.get("/receipts").json()) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            print("audit rows written by write_audit:", client.get("/audit").json())
            print("receipts sent by send_receipt:", *client.get("/receipts").json(), sep="\n  ")
        server.should_exit = True
        thread.join(timeout=10)


if __name__ == "__main__":
    main()
