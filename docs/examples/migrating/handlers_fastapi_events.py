# mypy: disable-error-code="no-untyped-call, untyped-decorator"
# ruff: noqa: B008
"""fastapi-events: local handlers, with dependencies resolved by its own solver."""

from fastapi import Depends, FastAPI
from fastapi_events.dispatcher import dispatch
from fastapi_events.handlers.local import LocalHandler
from fastapi_events.middleware import EventHandlerASGIMiddleware
from fastapi_events.typing import Event

local_handler = LocalHandler()
app = FastAPI()
app.add_middleware(EventHandlerASGIMiddleware, handlers=[local_handler])

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
        SESSIONS.append(self)

    def add(self, row: str) -> None:
        self.rows.append(row)


SESSIONS: list[Session] = []


# --8<-- [start:handlers]
async def get_db_conn() -> Connection:
    return Connection("postgresql://shop")


async def get_db_session(db_conn: Connection = Depends(get_db_conn)) -> Session:
    return Session(db_conn)  # no `yield` here: fastapi-events does not support it


@local_handler.register(event_name="cat*")
async def record_cat_event(event: Event, db_session: Session = Depends(get_db_session)) -> None:
    event_name, payload = event
    db_session.add(f"{event_name} {payload['id']}")


@local_handler.register(event_name="*")
def log_every_event(event: Event) -> None:  # sync handlers run in a thread
    event_name, _ = event
    LOG.append(str(event_name))


@app.post("/cats", status_code=201)
async def create_cat() -> dict[str, int]:
    dispatch("cat.created", payload={"id": 1})
    return {"id": 1}
    # --8<-- [end:handlers]
