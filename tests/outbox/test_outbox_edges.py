"""The outbox's edges: nothing a handler does holds the application's exit, a database that
stops answering does not stall the relay, and what its tables cannot hold is refused where
it is emitted or registered."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, insert
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool, QueuePool

from fastapi_eventbus import ConfigurationError, Event, EventBus, InvalidEventError
from fastapi_eventbus.outbox import SQLAlchemyInbox, SQLAlchemyOutbox
from fastapi_eventbus.testing import RecordingForwarder, capture
from tests._postgres import Postgres
from tests._proxy import Proxy
from tests.outbox.test_outbox import outbox_rows

pytestmark = pytest.mark.slow


def test_a_delivery_ignoring_its_cancellation_does_not_hold_the_shutdown(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: an event emitted with ``session=`` outside a request is delivered by a task of
    its own, which the shutdown cancelled and then awaited with no time limit: a handler
    with no time limit that ignores its cancellation kept ``bus.close()`` (and the app's
    exit) waiting forever, whatever ``shutdown_timeout`` said. Now it is left running after
    a grace second, an ERROR names its event, and the row stays in the outbox for the next
    process."""
    stop = asyncio.Event()  # the end of the test: the handler may return

    async def scenario() -> tuple[str, float]:
        engine = create_async_engine(db_url, poolclass=NullPool)
        outbox = SQLAlchemyOutbox(engine, poll_interval=60)
        await outbox.create_tables()
        bus = EventBus(
            outbox=outbox,
            shutdown_timeout=0.5,
            handler_timeout=None,
        )
        started = asyncio.Event()

        @bus.on("report.requested")
        async def stubborn(event: Event) -> None:
            started.set()
            while not stop.is_set():
                with contextlib.suppress(asyncio.CancelledError):  # ignored
                    await asyncio.sleep(0.05)

        async with async_sessionmaker(engine)() as db:
            event = bus.emit("report.requested", {"n": 1}, session=db)
            await db.commit()
        await asyncio.wait_for(started.wait(), 10)
        began = time.monotonic()
        closing = asyncio.ensure_future(bus.close())
        await asyncio.wait({closing}, timeout=15)  # not wait_for: it waits for the cancel
        took = time.monotonic() - began
        stop.set()  # the handler returns: else asyncio.run would wait for it at its exit
        await closing
        await engine.dispose()
        return event.id, took

    with caplog.at_level(logging.ERROR, "fastapi_eventbus"):
        event_id, took = asyncio.run(scenario())
    assert took < 5, took
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("left running" in e and event_id in e for e in errors), errors
    bus = EventBus(outbox=SQLAlchemyOutbox(create_async_engine(db_url, poolclass=NullPool)))
    assert [row.event_id for row in outbox_rows(db_url, bus)] == [event_id]  # relayed later


@pytest.fixture
def stalling_db(postgres: Postgres) -> Iterator[tuple[Proxy, str]]:
    """A fresh PostgreSQL database behind a `Proxy`; its name."""
    database = postgres.create_database()
    proxy = Proxy(postgres.port)
    try:
        yield proxy, database
    finally:
        proxy.close()
        postgres.drop_database(database)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_a_database_that_stops_answering_does_not_stall_the_relay(
    stalling_db: tuple[Proxy, str], driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: the relay's database calls had no time limit. When PostgreSQL stopped
    answering on an open connection (a network partition, a stalled proxy: here
    `Proxy.stall`), the relay's claim awaited forever: no row was relayed, nothing was
    logged, until the network came back. Now each call fails after ``database_timeout``
    with an ``ERROR`` naming the outbox and what it was doing, the asyncpg connection is
    dropped (not held by the stalled call; psycopg's thread runs on, no longer waited
    for), and the relay tries again at each round: once the network heals, every due row
    is relayed, each event handled once."""
    proxy, database = stalling_db
    url = f"postgresql+{{}}://postgres@127.0.0.1:{proxy.port}/{database}"
    handled: Counter[str] = Counter()

    def write(bus: EventBus, count: int) -> list[str]:
        """A script without an event loop emits *count* events: due at once, for a relay."""
        writer = create_engine(url.format("psycopg"), poolclass=NullPool)
        with Session(writer) as db:
            ids = [bus.emit("report.requested", {"n": n}, session=db).id for n in range(count)]
            db.commit()
        writer.dispose()
        return ids

    async def scenario() -> tuple[list[str], float | None, int]:
        engine: AsyncEngine | Engine
        if driver == "asyncpg":
            engine = create_async_engine(url.format(driver))
        else:
            engine = create_engine(url.format(driver))
        outbox = SQLAlchemyOutbox(engine, poll_interval=0.2, database_timeout=1, listen=False)
        await outbox.create_tables()  # the relay's pooled connection: open, then stalled
        bus = EventBus(outbox=outbox)
        everything = asyncio.Event()

        @bus.on("report.requested")
        async def handle(event: Event) -> None:
            handled[event.id] += 1
            if len(handled) == 5:
                everything.set()

        ids = await asyncio.to_thread(write, bus, 5)
        proxy.stall()
        began = time.monotonic()
        relay = asyncio.create_task(outbox.relay_forever())
        first_error = None
        while time.monotonic() - began < 8 and first_error is None:
            await asyncio.sleep(0.05)
            if any(r.levelno >= logging.ERROR for r in caplog.records):
                first_error = time.monotonic() - began
        await asyncio.sleep(2.5)  # more rounds, each bounded; the stalled call let go
        pool = engine.pool
        held = pool.checkedout() if isinstance(pool, QueuePool) and driver == "asyncpg" else 0
        proxy.heal()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(everything.wait(), 15)
        await asyncio.sleep(0.5)  # nothing handled twice meanwhile
        relay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay
        await bus.close()
        if isinstance(engine, AsyncEngine):
            await engine.dispose()
        else:
            engine.dispose()
        return ids, first_error, held

    with caplog.at_level(logging.ERROR, "fastapi_eventbus"):
        ids, first_error, held = asyncio.run(scenario())
    assert first_error is not None, "no ERROR while the database did not answer"
    assert first_error < 4, first_error  # 1 s, and a second for the call to stop
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert f"outbox postgresql+{driver}://postgres@127.0.0.1:{proxy.port}" in errors[0], errors
    assert "claiming due rows did not finish within 1s" in errors[0], errors
    assert held == 0  # asyncpg: the stalled connection was dropped, not kept checked out
    assert handled == Counter(ids)  # every event, once


def test_what_the_outbox_s_columns_cannot_hold_is_refused_at_the_call(db_url: str) -> None:
    """Found: `emit` takes names of up to 256 characters, the outbox's ``name`` column (and
    its ``destination``, a forwarder's name) 255: on PostgreSQL a 256-character name failed
    the application's commit, rolling back its own data, and the event was reported only
    as an ordinary rollback. Refused at ``emit(..., session=)`` now, the session untouched;
    as is, with an inbox, a handler whose name its column cannot hold (at ``@bus.on``)."""
    orders: list[str] = []

    async def scenario() -> None:
        engine = create_async_engine(db_url, poolclass=NullPool)
        outbox = SQLAlchemyOutbox(engine)
        await outbox.create_tables()
        bus = EventBus(outbox=outbox)
        bus.forward("order.*", RecordingForwarder(name="f" * 256))
        long_name = "o" * 256

        @bus.on("o*")
        async def handle(event: Event) -> None:
            orders.append(event.name)

        async with async_sessionmaker(engine)() as db:
            with capture(bus, raise_failures=False) as seen:
                with pytest.raises(InvalidEventError, match="255"):
                    bus.emit(long_name, {}, session=db)
                with pytest.raises(ConfigurationError, match=r"f{256}.*255"):
                    bus.emit("order.placed", {}, session=db)
                bus.emit("ok", {}, session=db)
                await db.commit()  # the rest of the transaction commits
        await bus.close()
        # Found too: `capture` listed the refused events as emitted.
        assert seen.names == ["ok"]
        await engine.dispose()

    asyncio.run(scenario())
    assert orders == ["ok"]


def test_a_handler_name_the_inbox_cannot_hold_is_refused_at_registration() -> None:
    engine = create_async_engine("sqlite+aiosqlite://")
    bus = EventBus(inbox=SQLAlchemyInbox(engine))

    async def handle(event: Event) -> None:
        pass

    handle.__qualname__ = "h" * 300
    with pytest.raises(ConfigurationError, match="255"):
        bus.on("x")(handle)


@pytest.mark.parametrize("flushed", [False, True], ids=["pending", "flushed"])
def test_a_transaction_longer_than_the_lease_is_delivered_once(db_url: str, flushed: bool) -> None:
    """Found: the committing process's lease on its rows started at ``emit``, not at the
    commit: a transaction open longer than ``lease`` committed rows already due, which a
    relay (this process's own, or another's) claimed while the process delivered them too:
    the handler ran twice, and nothing said so. The lease now starts at the commit."""
    calls: list[str] = []

    async def scenario() -> int:
        engine = create_async_engine(db_url, poolclass=NullPool)
        outbox = SQLAlchemyOutbox(engine, lease=1.0, poll_interval=60)
        await outbox.create_tables()
        bus = EventBus(outbox=outbox)

        @bus.on("report.*")
        async def handle(event: Event) -> None:
            calls.append(event.id)
            await asyncio.sleep(0.3)  # the relay's round comes meanwhile

        async with async_sessionmaker(engine)() as db:
            event = bus.emit("report.requested", {}, session=db)
            if flushed:  # the rows are written already: the commit updates them
                await db.flush()
            await asyncio.sleep(1.5)  # a long transaction: longer than the lease
            await db.commit()
        claimed = await outbox.relay_once()
        await bus.drain()
        assert calls == [event.id]
        await bus.close()
        await engine.dispose()
        return claimed

    assert asyncio.run(scenario()) == 0


def test_a_delivery_that_fails_unexpectedly_names_its_events(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: a delivery that raised where nothing should (a bug: here, an inbox of the
    application's own that raises) was logged with a row count and no event id."""

    class BrokenInbox:
        async def handled(self, event: Event) -> set[str]:
            return set()

        def calling(self, handler: str, event: Event) -> None:
            raise RuntimeError("a bug in the inbox")

        async def record(self, handler: str, event: Event) -> None:
            pass

    async def scenario() -> str:
        engine = create_async_engine(db_url, poolclass=NullPool)
        outbox = SQLAlchemyOutbox(engine, poll_interval=60)
        await outbox.create_tables()
        bus = EventBus(outbox=outbox, inbox=BrokenInbox())
        bus.on("report.*")(lambda event: None)
        async with async_sessionmaker(engine)() as db:
            event = bus.emit("report.requested", {}, session=db)
            await db.commit()
        await bus.drain()
        await bus.close()
        await engine.dispose()
        return event.id

    with caplog.at_level(logging.ERROR, "fastapi_eventbus"):
        event_id = asyncio.run(scenario())
    (line,) = [r.getMessage() for r in caplog.records if "a bug" in (r.exc_text or "")]
    assert event_id in line


def test_a_purge_names_any_number_of_events(db_url: str) -> None:
    """``outbox purge --dead``, confirmed at its prompt, names every event it asked about:
    past 32,767 (asyncpg's limit on a statement's parameters) it failed, purging nothing."""

    async def scenario() -> None:
        engine = create_async_engine(db_url, poolclass=NullPool)
        outbox = SQLAlchemyOutbox(engine)
        await outbox.create_tables()
        rows = [
            {"event_id": f"e-{n}", "destination": "", "name": "x", "body": "{}", "created": 0.0}
            | {"attempts": 3, "error": "gave up", "dead_at": 1.0}
            for n in range(3)
        ]
        async with engine.begin() as connection:
            await connection.execute(insert(outbox.tables.dead), rows)
        assert await outbox.purge([]) == 0
        assert await outbox.purge(["e-0", *(f"x-{n}" for n in range(40_000))]) == 1
        assert await outbox.purge() == 2
        await engine.dispose()

    asyncio.run(scenario())
