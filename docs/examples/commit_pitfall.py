"""The request-scoped commit pitfall, and its two fixes.

FastAPI exits request-scoped ``yield`` dependencies after the response *and its
background tasks*. A session that commits after ``yield`` therefore commits
after the event handlers ran: they do not see the endpoint's write.
"""

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel

from fastapi_eventbus import Event, EventBus, get_bus

bus = EventBus()
app = FastAPI()
bus.install(app)
app.state.database = Path("users.sqlite3")

Bus = Annotated[EventBus, Depends(get_bus)]

WELCOMED: list[str] = []  # addresses the welcome mail went to
MISSING: list[int] = []  # user ids the handler could not find


def create_tables(database: Path) -> None:
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, email TEXT)")


# --8<-- [start:session]
def get_db(request: Request) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(request.app.state.database, check_same_thread=False)
    try:
        yield db
        db.commit()  # after the endpoint returned
    except Exception:
        db.rollback()
        raise
    finally:
        db.close()


@bus.on("user.created")
def send_welcome(event: Event, db: Annotated[sqlite3.Connection, Depends(get_db)]) -> None:
    user_id = event.payload["id"]
    row = db.execute("SELECT email FROM users WHERE id = ?", (user_id,)).fetchone()
    if row is None:
        MISSING.append(user_id)  # the endpoint's INSERT is not committed yet
    else:
        WELCOMED.append(row[0])
        # --8<-- [end:session]


class NewUser(BaseModel):
    email: str


# --8<-- [start:pitfall]
@app.post("/v1/users", status_code=201)
def create_user_v1(
    user: NewUser, db: Annotated[sqlite3.Connection, Depends(get_db)], bus: Bus
) -> dict[str, int]:
    cursor = db.execute("INSERT INTO users (email) VALUES (?)", (user.email,))
    assert cursor.lastrowid is not None
    bus.emit("user.created", {"id": cursor.lastrowid})
    return {"id": cursor.lastrowid}
    # Default scope="request": get_db commits after the handlers ran. They miss the user.
    # --8<-- [end:pitfall]


# --8<-- [start:scope-function]
@app.post("/v2/users", status_code=201)
def create_user_v2(
    user: NewUser,
    db: Annotated[sqlite3.Connection, Depends(get_db, scope="function")],
    bus: Bus,
) -> dict[str, int]:
    cursor = db.execute("INSERT INTO users (email) VALUES (?)", (user.email,))
    assert cursor.lastrowid is not None
    bus.emit("user.created", {"id": cursor.lastrowid})
    return {"id": cursor.lastrowid}
    # scope="function": get_db commits when this function returns, before the response.
    # --8<-- [end:scope-function]


# --8<-- [start:commit-in-endpoint]
@app.post("/v3/users", status_code=201)
def create_user_v3(
    user: NewUser, db: Annotated[sqlite3.Connection, Depends(get_db)], bus: Bus
) -> dict[str, int]:
    cursor = db.execute("INSERT INTO users (email) VALUES (?)", (user.email,))
    assert cursor.lastrowid is not None
    db.commit()  # committed before the event exists, so before any handler runs
    bus.emit("user.created", {"id": cursor.lastrowid})
    return {"id": cursor.lastrowid}
    # --8<-- [end:commit-in-endpoint]
