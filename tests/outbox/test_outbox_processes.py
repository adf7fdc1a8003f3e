"""The outbox across real processes: a crash and a restart, two relays on one table.

`tests.outbox.shop` runs in ``python -m uvicorn`` subprocesses (``SHOP_DB``: the database;
lease 1 s, or ``SHOP_LEASE``; relay poll 0.1 s). The tests read the shop's tables from this
process with a sync engine, as another process would, and count the handled events by id:
a missing id is a lost event, an id twice a row delivered twice (two relays claimed it, or
its lease ran out while it was being delivered: the two-relay test makes the lease long,
so that only the first can happen there).

Each process logs the library's INFO lines (``relaying N row(s)``, through a logging
config given to uvicorn) to its log file; the tests add up the rows each relay claimed
and print it (run with ``-s`` to see) and record it with ``record_property``. A failed
assertion shows the processes' logs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, func, insert, make_url, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from fastapi_eventbus import EventBus
from fastapi_eventbus.outbox import SQLAlchemyOutbox
from tests._pubsub import free_port
from tests._support import ROOT, ServerProcess
from tests.outbox.shop import handled, metadata, orders
from tests.worker._helpers import wait_for

pytestmark = pytest.mark.slow

APP = "tests.outbox.shop:app"
RELAY_LEASE = "30"
"""``SHOP_LEASE`` of the two-relay test: longer than a relay's batch of 100 rows takes on a
busy machine (3.4 s seen with two CPU burners), so that a row handled twice is a double
claim, never a lease that ran out mid-delivery (the shop's own lease is 1 s)."""
STARTUP = 60.0
"""Seconds a shop process may take to start (two at once, on a busy machine)."""
SETTLE = 45.0
"""Seconds the relays may take to handle every event (a few, normally)."""

LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s pid=%(process)d %(levelname)s %(name)s: %(message)s"}
    },
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "stream": "ext://sys.stderr",
        }
    },
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "uvicorn.access": {"level": "WARNING"},
        "fastapi_eventbus": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}
"""uvicorn's own lines, and the library's from INFO (plain uvicorn shows them from WARNING)."""

RELAYING = re.compile(r"outbox \S+: relaying (\d+) row\(s\)")


# -- the shop's database, read and written from this process ---------------------------------


@dataclass
class Database:
    """The shop's database: *url* for its processes, *engine* (sync) for the test."""

    url: str
    engine: Engine
    outbox: SQLAlchemyOutbox
    """An outbox on *engine*, never run: its tables, and `EventBus` for writing due rows."""

    def handled_rows(self) -> list[Any]:
        """Every row of the shop's ``handled`` table (event_id, order_id, saw_order)."""
        with self.engine.connect() as connection:
            return list(connection.execute(select(handled).order_by(handled.c.n)).all())

    def outbox_rows(self) -> list[Any]:
        """Every row of ``eventbus_outbox`` (one per event and destination)."""
        with self.engine.connect() as connection:
            return list(connection.execute(select(self.outbox.tables.events)).all())

    def counts(self) -> tuple[int, int]:
        """(handled rows, outbox rows)."""
        events = self.outbox.tables.events
        with self.engine.connect() as connection:
            done = connection.scalar(select(func.count()).select_from(handled))
            waiting = connection.scalar(select(func.count()).select_from(events))
        return done or 0, waiting or 0


@contextmanager
def database_at(url: str) -> Iterator[Database]:
    """`Database` on *url* (an async SQLAlchemy URL: asyncpg or aiosqlite)."""
    sync = make_url(url)
    sync = sync.set(
        drivername="postgresql+psycopg" if sync.get_backend_name() == "postgresql" else "sqlite"
    )
    # NullPool: no connection of the test's stays open (PostgreSQL's DROP DATABASE, SQLite's
    # locks) between two looks.
    engine = create_engine(sync, poolclass=NullPool)
    try:
        yield Database(url, engine, SQLAlchemyOutbox(engine, metadata=metadata))
    finally:
        engine.dispose()


@pytest.fixture
def pg_database(postgres_url: str) -> Iterator[Database]:
    with database_at(postgres_url) as database:
        yield database


@pytest.fixture
def any_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}"
    with database_at(url) as database:
        yield database


# -- the shop in a subprocess ----------------------------------------------------------------


@dataclass
class Shop(ServerProcess):
    """``python -m uvicorn tests.outbox.shop:app`` running in a subprocess."""

    name: str = ""

    def relayed(self) -> list[int]:
        """The sizes of the claims its relay logged (``relaying N row(s)``)."""
        return [int(count) for count in RELAYING.findall(self.output())]


def start_shop(name: str, database: Database, directory: Path, **env: str) -> Shop:
    """Start the shop on *database* with *env* added (``SHOP_SLOW``); its log in *directory*."""
    config = directory / "logging.json"
    if not config.exists():
        config.write_text(json.dumps(LOG_CONFIG))
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", APP, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--no-access-log", "--log-config", str(config)]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SHOP_")}
    log = directory / f"shop-{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**base, "SHOP_DB": database.url, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Shop(process, log, f"http://127.0.0.1:{port}", name=name)


@contextmanager
def running_shops(
    database: Database, directory: Path, names: list[str], env: Mapping[str, str] | None = None
) -> Iterator[list[Shop]]:
    """Start a shop per name, all at once, and wait until each has started; kill those
    still running when the block ends."""
    shops: list[Shop] = []
    try:
        for name in names:
            shops.append(start_shop(name, database, directory, **(env or {})))
        for shop in shops:
            wait_for(shop.started, STARTUP, f"shop {shop.name} to start")
        yield shops
    finally:
        for shop in shops:
            if shop.process.poll() is None:
                shop.process.kill()
            shop.process.wait()


def logs(*shops: Shop) -> str:
    """The shops' logs, for an assertion's message."""
    return "".join(
        f"\n--- shop {shop.name} (pid {shop.process.pid}) ---\n{shop.output()}" for shop in shops
    )


def settled(database: Database, expected: int, *shops: Shop) -> bool:
    """Whether the outbox is empty and every claim the relays logged has been handled (no
    delivery still running: a row claimed twice would be handled twice by now)."""
    done, left = database.counts()
    return left == 0 and done >= expected and done == sum(sum(s.relayed()) for s in shops)


def wait_until(probe: Callable[[], bool], timeout: float, what: str, *shops: Shop) -> float:
    """`wait_for` *probe*, failing with the shops' logs; the seconds it took."""
    begin = time.monotonic()
    try:
        wait_for(probe, timeout, what)
    except AssertionError as error:
        raise AssertionError(f"{error}{logs(*shops)}") from None
    return time.monotonic() - begin


def stop(shop: Shop, within: float = 30.0) -> int:
    """SIGTERM *shop* and wait for its exit status; fail if it is still running *within* s."""
    shop.process.send_signal(signal.SIGTERM)
    try:
        return shop.process.wait(timeout=within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"shop {shop.name} still running {within}s after SIGTERM:{logs(shop)}")


def assert_stopped_cleanly(shop: Shop, code: int) -> None:
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -15).
    assert code in (0, -signal.SIGTERM), f"exit status {code}{logs(shop)}"
    output = shop.output()
    assert "Application shutdown complete" in output, logs(shop)
    assert "Traceback" not in output, logs(shop)
    assert " ERROR " not in output, logs(shop)


def report(record: Callable[[str, object], None], **figures: object) -> None:
    print("\n" + ", ".join(f"{name}={value}" for name, value in figures.items()))
    for name, value in figures.items():
        record(name, value)


def check_each_once(rows: list[Any], expected: set[str], *shops: Shop) -> None:
    """*rows* of ``handled``: every expected event id, none missing, none twice, each having
    seen its order."""
    seen = Counter(row.event_id for row in rows)
    missing = expected - set(seen)
    assert not missing, f"{len(missing)} event(s) never handled: {sorted(missing)}{logs(*shops)}"
    assert set(seen) == expected, f"unknown ids: {sorted(set(seen) - expected)}{logs(*shops)}"
    twice = {event_id: n for event_id, n in seen.items() if n > 1}
    assert not twice, f"{len(twice)} event(s) handled more than once: {twice}{logs(*shops)}"
    assert all(row.saw_order for row in rows), logs(*shops)


# -- a crash, then a restart -----------------------------------------------------------------

CRASH_ORDERS = 20


def test_events_committed_before_a_crash_are_handled_after_restart(
    pg_database: Database, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """Process A commits 20 orders and their events, then dies (SIGKILL) while their handlers
    hang; process B, started on the same database, relays each of them once."""
    database = pg_database
    with running_shops(database, tmp_path, ["A"], {"SHOP_SLOW": "60"}) as (a,):
        with httpx.Client(base_url=a.url, timeout=30) as client:
            ids = []
            for n in range(1, CRASH_ORDERS + 1):
                response = client.post(f"/orders/{n}")
                assert response.status_code == 200, f"{response.text}{logs(a)}"
                ids.append(response.json()["event_id"])
        time.sleep(0.3)  # the handlers are running (asleep), after their responses
        os.kill(a.process.pid, signal.SIGKILL)
        assert a.process.wait(timeout=30) == -signal.SIGKILL
    expected = set(ids)
    assert len(expected) == CRASH_ORDERS
    assert database.handled_rows() == [], logs(a)
    left = database.outbox_rows()
    assert sorted(row.event_id for row in left) == sorted(ids), logs(a)  # one row each: ""
    assert {row.destination for row in left} == {""}

    begin = time.monotonic()
    with running_shops(database, tmp_path, ["B"]) as (b,):
        started = time.monotonic() - begin

        def all_handled() -> bool:
            return settled(database, CRASH_ORDERS, b)

        relayed_in = wait_until(all_handled, SETTLE, "B to handle the 20 events", a, b)
        check_each_once(database.handled_rows(), expected, a, b)
        assert database.outbox_rows() == [], logs(a, b)
        code = stop(b)
    assert_stopped_cleanly(b, code)
    assert sum(b.relayed()) == CRASH_ORDERS, logs(b)  # each row claimed once
    report(
        record_property,
        b_startup_s=round(started, 2),
        b_relayed_all_in_s=round(relayed_in, 2),
        a_relayed=a.relayed(),
        b_relayed=b.relayed(),
        b_exit=code,
    )


# -- two relays, one table -------------------------------------------------------------------

RELAYED_ORDERS = 200


def write_due_events(
    database: Database, bus: EventBus, numbers: range, per_transaction: int
) -> list[str]:
    """Orders *numbers*, each with its ``order.created`` event, written by a sync script (no
    event loop: no process delivers them; they are due at once, for a relay). Their ids."""
    ids: list[str] = []
    for first in range(numbers.start, numbers.stop, per_transaction):
        with Session(database.engine) as db:
            for n in range(first, min(first + per_transaction, numbers.stop)):
                db.execute(insert(orders).values(id=n, item="x"))
                ids.append(bus.emit("order.created", {"id": n, "item": "x"}, session=db).id)
            db.commit()
    return ids


@pytest.mark.parametrize("any_database", ["postgresql", "sqlite"], indirect=True)
def test_two_processes_relay_one_table_without_double_claiming(
    any_database: Database, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """200 due rows, two shop processes started together; then 200 more, committed at once
    while both relays poll: each row is claimed by one relay (``FOR UPDATE SKIP LOCKED`` on
    PostgreSQL, compare-and-set on SQLite), each event handled once."""
    database = any_database
    metadata.create_all(database.engine)
    bus = EventBus(outbox=database.outbox)
    first = write_due_events(database, bus, range(1, RELAYED_ORDERS + 1), per_transaction=50)
    assert len(set(first)) == RELAYED_ORDERS
    waiting = database.outbox_rows()
    assert len(waiting) == RELAYED_ORDERS
    assert all(row.owner is None and row.due <= time.time() for row in waiting)  # due, no one's
    assert database.handled_rows() == []

    begin = time.monotonic()
    with running_shops(database, tmp_path, ["A", "B"], {"SHOP_LEASE": RELAY_LEASE}) as shops:
        started = time.monotonic() - begin

        def first_handled() -> bool:
            return settled(database, RELAYED_ORDERS, *shops)

        first_in = wait_until(first_handled, SETTLE, "the relays to handle 200 events", *shops)
        check_each_once(database.handled_rows(), set(first), *shops)
        before = {shop.name: len(shop.relayed()) for shop in shops}

        # Both relays are idle, polling every 0.1 s: 200 rows become due in one commit.
        numbers = range(RELAYED_ORDERS + 1, 2 * RELAYED_ORDERS + 1)
        second = write_due_events(database, bus, numbers, per_transaction=RELAYED_ORDERS)
        begin = time.monotonic()

        def all_handled() -> bool:
            return settled(database, 2 * RELAYED_ORDERS, *shops)

        second_in = wait_until(all_handled, SETTLE, "the relays to handle 200 more", *shops)
        check_each_once(database.handled_rows(), {*first, *second}, *shops)
        assert database.outbox_rows() == [], logs(*shops)
        codes = [stop(shop) for shop in shops]
    for shop, code in zip(shops, codes, strict=True):
        assert_stopped_cleanly(shop, code)
    claims = {shop.name: shop.relayed() for shop in shops}
    assert sum(sum(sizes) for sizes in claims.values()) == 2 * RELAYED_ORDERS, logs(*shops)
    report(
        record_property,
        startup_s=round(started, 2),
        first_200_in_s=round(first_in, 2),
        second_200_in_s=round(second_in, 2),
        first_claims={name: sizes[: before[name]] for name, sizes in claims.items()},
        second_claims={name: sizes[before[name] :] for name, sizes in claims.items()},
    )
