"""fastapi-eventbus: handlers take dependencies exactly like endpoints, FastAPI resolves them."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_eventbus import Event, EventBus, get_bus

bus = EventBus()
app = FastAPI()
bus.install(app)

LOG: list[str] = []  # event names log_every_event saw


class Connection:
    """Stands in for a database connection."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn


class Session:
    """Stands in for a database session; every instance is kept in SESSIONS."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.rows: list[str] = []
        self.committed = self.closed = False
        SESSIONS.append(self)

    def add(self, row: str) -> None:
        self.rows.append(row)

    def commit(self) -> None:
        self.committed = True

    def close(self) -> None:
        self.closed = True


SESSIONS: list[Session] = []


# --8<-- [start:handlers]
async def get_db_conn() -> Connection:
    return Connection("postgresql://shop")


async def get_db_session(
    db_conn: Annotated[Connection, Depends(get_db_conn)],
) -> AsyncIterator[Session]:
    session = Session(db_conn)
    try:
        yield session  # the handler runs here
        session.commit()
    finally:
        session.close()


@bus.on("cat*")
async def record_cat_event(
    event: Event, db_session: Annotated[Session, Depends(get_db_session)]
) -> None:
    db_session.add(f"{event.name} {event.payload['id']}")


@bus.on("*")
def log_every_event(event: Event) -> None:  # sync handlers run in the threadpool
    LOG.append(event.name)


@app.post("/cats", status_code=201)
async def create_cat(bus: Annotated[EventBus, Depends(get_bus)]) -> dict[str, int]:
    bus.emit("cat.created", {"id": 1})
    return {"id": 1}
    # --8<-- [end:handlers]


# --8<-- [start:override]
def test_cat_events_go_to_the_test_session() -> None:
    session = Session(Connection("sqlite://"))
    app.dependency_overrides[get_db_session] = lambda: session  # handlers see it too
    try:
        with TestClient(app) as client:
            client.post("/cats")
    finally:
        app.dependency_overrides.clear()

    assert session.rows == ["cat.created 1"]
    # --8<-- [end:override]
