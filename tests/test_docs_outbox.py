"""docs/examples/outbox.py and docs/examples/outbox_alembic.py do what docs/database.md says.

The example's app runs for real, on an SQLite file (aiosqlite) in the test's directory, which
it reads from ``DATABASE_URL``.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect

from fastapi_eventbus.testing import capture
from tests._support import ROOT, load_module, wait_for

OUTBOX_TABLES = {"eventbus_outbox", "eventbus_outbox_dead"}


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "shop.db"


@pytest.fixture
def shop(monkeypatch: pytest.MonkeyPatch, database: Path) -> ModuleType:
    """The example, on *database*; imported as ``outbox``, the name env.py imports."""
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{database}")
    return load_module(ROOT / "docs/examples/outbox.py", monkeypatch)


def query(database: Path, sql: str) -> list[Any]:
    with closing(sqlite3.connect(database)) as db:
        return db.execute(sql).fetchall()


def run(shop: ModuleType, work: Callable[[], Any]) -> Any:
    """``await work()`` on a loop of its own, then let go of that loop's connections."""

    async def main() -> Any:
        try:
            return await work()
        finally:
            await shop.engine.dispose()

    return asyncio.run(main())


def relayed(shop: ModuleType, database: Path, mails: int) -> Callable[[], bool]:
    """Whether the relay handled *mails* events and removed their rows (stopping the app
    before it removed them would leave them for the next start: at-least-once)."""
    return lambda: len(shop.MAILS) == mails and not query(database, "SELECT * FROM eventbus_outbox")


def create_tables(shop: ModuleType) -> None:
    """What the app's lifespan does, without starting the app."""
    with TestClient(shop.app):
        pass


def test_the_handler_sees_the_order_the_endpoint_committed(
    shop: ModuleType, database: Path
) -> None:
    with TestClient(shop.app) as client:
        assert client.post("/orders", json={"item": "lamp"}).json() == {"id": 1}
        wait_for(lambda: bool(shop.MAILS))
    assert shop.MAILS == ["order 1 (lamp) is placed"]
    assert query(database, "SELECT id, item, status FROM orders") == [(1, "lamp", "placed")]
    assert query(database, "SELECT * FROM eventbus_outbox") == []  # delivered: removed
    assert query(database, "SELECT * FROM eventbus_outbox_dead") == []


def test_a_committed_cancel_is_handled_with_the_new_status(shop: ModuleType) -> None:
    with TestClient(shop.app) as client:
        client.post("/orders", json={"item": "lamp"})
        assert client.post("/orders/1/cancel").json() == {"status": "cancelled"}
    assert shop.MAILS == ["order 1 (lamp) is placed", "order 1 (lamp) is cancelled"]


def test_a_rolled_back_cancel_runs_nothing_and_is_logged(
    shop: ModuleType, database: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, "fastapi_eventbus"), TestClient(shop.app) as client:
        client.post("/orders", json={"item": "gift card"})
        with capture(shop.bus) as events:
            response = client.post("/orders/1/cancel")
    assert response.status_code == 409
    [cancelled] = events.emitted  # emit accepted it...
    assert events.handled == []  # ...and nothing ran
    assert shop.MAILS == ["order 1 (gift card) is placed"]
    assert query(database, "SELECT status FROM orders") == [("placed",)]  # rolled back
    assert query(database, "SELECT * FROM eventbus_outbox") == []
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("discarded")]
    assert line == (
        f"discarded 1 event(s) because the transaction that wrote them rolled back: {cancelled.id}"
    )


def test_the_script_s_events_are_handled_after_its_commit(shop: ModuleType, database: Path) -> None:
    with TestClient(shop.app) as client:
        client.post("/orders", json={"item": "lamp"})
        client.post("/orders", json={"item": "pen"})
    asyncio.run(shop.cancel_orders([2, 99]))  # 99 does not exist
    assert shop.MAILS[2:] == ["order 2 (pen) is cancelled"]
    assert query(database, "SELECT id, status FROM orders") == [(1, "placed"), (2, "cancelled")]
    assert query(database, "SELECT * FROM eventbus_outbox") == []


def test_a_sync_script_s_events_wait_for_a_running_app_s_relay(
    shop: ModuleType, database: Path
) -> None:
    create_tables(shop)
    shop.import_orders(f"sqlite:///{database}", ["pen", "ink"])
    assert shop.MAILS == []  # nothing ran in the script
    waiting = query(database, "SELECT name, destination, owner FROM eventbus_outbox")
    assert waiting == [("order.placed", "", None)] * 2  # no owner: due at once
    with TestClient(shop.app):  # its lifespan starts the relay
        wait_for(relayed(shop, database, 2))
    assert sorted(shop.MAILS) == ["order 1 (pen) is placed", "order 2 (ink) is placed"]
    assert query(database, "SELECT * FROM eventbus_outbox") == []


def test_dead_letters_are_listed_and_replayed(
    shop: ModuleType, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create_tables(shop)
    shop.import_orders(f"sqlite:///{database}", ["pen"])
    [(event_id,)] = query(database, "SELECT event_id FROM eventbus_outbox")
    with closing(sqlite3.connect(database)) as db, db:  # as if its attempts ran out
        db.execute(
            "INSERT INTO eventbus_outbox_dead SELECT event_id, destination, name, body, "
            "created, 20, 'LookupError(...) (20 attempts)', 0 FROM eventbus_outbox"
        )
        db.execute("DELETE FROM eventbus_outbox")
    assert run(shop, shop.review_dead_letters) == 1
    printed = capsys.readouterr().out
    assert printed.startswith(f"{event_id} order.placed local handlers 20 LookupError")
    assert query(database, "SELECT event_id, attempts FROM eventbus_outbox") == [(event_id, 0)]
    with TestClient(shop.app):
        wait_for(relayed(shop, database, 1))
    assert shop.MAILS == ["order 1 (pen) is placed"]
    assert query(database, "SELECT * FROM eventbus_outbox_dead") == []


def test_the_alembic_fragment_gives_autogenerate_the_outbox_tables(
    shop: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = load_module(ROOT / "docs/examples/outbox_alembic.py", monkeypatch)
    assert env.target_metadata is shop.Base.metadata
    assert set(env.target_metadata.tables) == {"orders", *OUTBOX_TABLES}
    # What a migration generated from it creates is what the outbox reads and writes.
    engine = create_engine(f"sqlite:///{tmp_path / 'migrated.db'}")
    env.target_metadata.create_all(engine)
    assert set(inspect(engine).get_table_names()) == {"orders", *OUTBOX_TABLES}
    assert [i["name"] for i in inspect(engine).get_indexes("eventbus_outbox")] == [
        "eventbus_outbox_due"
    ]
    engine.dispose()
    assert shop.outbox.metadata is shop.Base.metadata
