"""The outbox: an event exists exactly when the data written with it does.

Each test runs on SQLite (aiosqlite) and on a real PostgreSQL server, through the shop of
`tests.outbox.shop` as a user would write it, counting events by id in its tables.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sqlalchemy import Engine, create_engine, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from fastapi_eventbus import DiscardedEvents, Event, EventBus, Retry, get_bus
from fastapi_eventbus.exceptions import ConfigurationError, ForwarderError, InvalidEventError
from fastapi_eventbus.outbox import SQLAlchemyInbox, SQLAlchemyOutbox
from fastapi_eventbus.testing import RecordingForwarder
from tests.outbox.shop import handled, make_shop, metadata, orders

pytestmark = pytest.mark.slow


def rows(url: str, table: Any) -> list[Any]:
    """Every row of *table* (read with a fresh engine, as another process would)."""

    async def read() -> list[Any]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as connection:
                return list((await connection.execute(select(table))).all())
        finally:
            await engine.dispose()

    return asyncio.run(read())


def outbox_rows(url: str, bus: EventBus) -> list[Any]:
    outbox = bus.outbox
    assert isinstance(outbox, SQLAlchemyOutbox)
    return rows(url, outbox.tables.events)


@pytest.fixture
def discards() -> list[DiscardedEvents]:
    return []


def test_forwarders_sharing_a_name_are_refused_on_a_bus_with_an_outbox(tmp_path: Path) -> None:
    """Found: an outbox row names its forwarder, and the first with that name took the row:
    ``user.*`` events went to the orders queue and were settled as delivered (or, matched by
    both, the application's commit failed on the rows' primary key)."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    bus = EventBus(outbox=SQLAlchemyOutbox(engine))
    bus.forward("order.*", RecordingForwarder())
    with pytest.raises(ConfigurationError, match="two forwarders are named 'RecordingForwarder'"):
        bus.forward("user.*", RecordingForwarder())
    bus.forward("user.*", RecordingForwarder(name="users"))  # named: fine


def test_a_handler_retrying_past_its_time_limit_is_waited_for_not_run_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: the delivery waited only for the handler's time limit, not its `Retry`: at 5.5 s
    an ERROR said its handlers "still ran (left running)", the row was tried again, and a
    second run overlapped the first, still retrying."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", poolclass=NullPool)
    outbox = SQLAlchemyOutbox(engine, retry_initial=0.1, retry_max=0.1, poll_interval=0.05)
    bus = EventBus(outbox=outbox)
    running: list[int] = []
    overlapped: list[int] = []
    succeeded: list[float] = []
    started = time.monotonic()

    @bus.on("order.created", timeout=0.5, retry=Retry(initial_delay=0.5, max_delay=0.5))
    async def flaky(event: Event) -> None:  # a dependency that is down for 6 s
        running.append(1)
        overlapped.append(len(running))
        try:
            await asyncio.sleep(0.01)
            if time.monotonic() - started < 6:
                raise ConnectionError("down")
        finally:
            running.pop()
        succeeded.append(time.monotonic() - started)

    async def scenario() -> None:
        await outbox.create_tables()
        async with async_sessionmaker(engine)() as db:
            bus.emit("order.created", {"id": 1}, session=db)
            await db.commit()
        deadline = time.monotonic() + 20
        while await outbox.pending() and time.monotonic() < deadline:
            await outbox.relay_once()
            await asyncio.sleep(0.05)
        await bus.drain(10)

    asyncio.run(scenario())
    assert max(overlapped) == 1  # one run at a time
    assert len(succeeded) == 1  # it kept trying until the dependency came back, once
    assert succeeded[0] >= 6
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_committed_events_are_handled_after_commit_and_see_the_data(
    db_url: str, discards: list[DiscardedEvents]
) -> None:
    """Found: a handler ran before the request's session committed (on SQLite it blocked
    5 s on "database is locked" and did not see the row)."""
    app, bus, _ = make_shop(db_url, bus_options={"on_discard": discards.append})
    with TestClient(app) as client:
        ids = [client.post(f"/orders/{n}").json()["event_id"] for n in range(1, 21)]
    seen = rows(db_url, handled)
    assert sorted(row.event_id for row in seen) == sorted(ids)  # each once
    assert all(row.saw_order for row in seen)
    assert outbox_rows(db_url, bus) == []  # delivered rows leave the outbox
    assert discards == []


def test_a_rolled_back_event_never_runs_and_on_discard_is_told(
    db_url: str, discards: list[DiscardedEvents], caplog: pytest.LogCaptureFixture
) -> None:
    """Found: an event was handled although the transaction later rolled back."""
    app, bus, _ = make_shop(db_url, bus_options={"on_discard": discards.append})
    with caplog.at_level(logging.INFO, "fastapi_eventbus"), TestClient(app) as client:
        kept = client.post("/orders/1").json()["event_id"]
        assert client.post("/orders/2", params={"fail": True}).status_code == 409
    assert [row.event_id for row in rows(db_url, handled)] == [kept]
    assert [row.id for row in rows(db_url, orders)] == [1]
    assert outbox_rows(db_url, bus) == []
    assert len(discards) == 1
    assert "rolled back" in discards[0].reason
    (lost,) = discards[0].events
    assert lost.name == "order.created"
    assert lost.payload == {"id": 2, "item": "book"}
    assert lost.id in caplog.text


def test_a_session_closed_without_commit_discards_its_events(
    db_url: str, discards: list[DiscardedEvents]
) -> None:
    app, _, engine = make_shop(db_url, bus_options={"on_discard": discards.append})
    sessions = async_sessionmaker(engine)

    @app.post("/forgot")
    async def forgot(bus: EventBus = Depends(get_bus)) -> str:
        async with sessions() as db:
            return bus.emit("order.created", {"id": 9, "item": "x"}, session=db).id

    with TestClient(app) as client:
        event_id = client.post("/forgot").json()
    assert rows(db_url, handled) == []
    assert [e.id for d in discards for e in d.events] == [event_id]


def test_a_session_dropped_without_commit_or_close_reports_its_events(
    tmp_path: Path, discards: list[DiscardedEvents], caplog: pytest.LogCaptureFixture
) -> None:
    """Found: a session garbage-collected with no commit, rollback or close (its database
    rolls the transaction back) fired no session event: its events were gone unreported."""
    path = tmp_path / "shop.db"
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", poolclass=NullPool)
    outbox = SQLAlchemyOutbox(engine)
    bus = EventBus(outbox=outbox, on_discard=discards.append)
    asyncio.run(outbox.create_tables())
    sync_engine = create_engine(f"sqlite:///{path}")

    def forget() -> str:
        db = Session(sync_engine)
        return bus.emit("order.created", {"id": 1}, session=db).id  # neither commit nor close

    event_id = forget()
    gc.collect()
    sync_engine.dispose()
    assert [report.ids for report in discards] == [[event_id]]
    assert "garbage-collected" in discards[0].reason
    [line] = [r for r in caplog.records if event_id in r.getMessage()]
    assert line.levelno == logging.WARNING


def test_emit_with_a_session_outside_a_request_handles_it_after_commit(db_url: str) -> None:
    """The transaction is the batch: a script, a startup task or a handler."""
    app, bus, engine = make_shop(db_url)
    sessions = async_sessionmaker(engine)

    async def script() -> list[str]:
        async with app.router.lifespan_context(app):
            async with sessions() as db:
                await db.execute(insert(orders).values(id=7, item="pen"))
                event = bus.emit("order.created", {"id": 7, "item": "pen"}, session=db)
                await asyncio.sleep(0.05)
                async with engine.connect() as other:  # not before the commit
                    assert (await other.execute(select(handled))).all() == []
                await db.commit()
            await bus.drain()
            return [event.id]

    ids = asyncio.run(script())
    assert [(r.event_id, r.saw_order) for r in rows(db_url, handled)] == [(ids[0], True)]


def test_a_savepoint_rolled_back_drops_only_its_events(
    db_url: str, discards: list[DiscardedEvents]
) -> None:
    app, bus, engine = make_shop(db_url, bus_options={"on_discard": discards.append})
    sessions = async_sessionmaker(engine)

    async def script() -> tuple[str, str]:
        async with app.router.lifespan_context(app), sessions() as db:
            await db.execute(insert(orders).values(id=1, item="a"))
            kept = bus.emit("order.created", {"id": 1, "item": "a"}, session=db)
            savepoint = await db.begin_nested()
            dropped = bus.emit("order.created", {"id": 2, "item": "b"}, session=db)
            await db.flush()
            await savepoint.rollback()
            await db.commit()
            await bus.drain()
            return kept.id, dropped.id

    kept, dropped = asyncio.run(script())
    assert [r.event_id for r in rows(db_url, handled)] == [kept]
    assert [e.id for d in discards for e in d.events] == [dropped]


def test_a_failed_handler_is_retried_from_the_outbox_then_dead_lettered(
    db_url: str, discards: list[DiscardedEvents], caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_async_engine(db_url, poolclass=NullPool)  # used from several loops below
    outbox = SQLAlchemyOutbox(
        engine, lease=5.0, poll_interval=0.05, retry_initial=0.05, retry_max=0.05, max_attempts=3
    )
    bus = EventBus(outbox=outbox, on_discard=discards.append)
    calls: dict[str, int] = {}

    @bus.on("flaky")
    async def flaky(event: Event) -> None:
        calls[event.id] = calls.get(event.id, 0) + 1
        if event.payload["fails"] >= calls[event.id]:
            raise RuntimeError(f"failure {calls[event.id]}")

    app = FastAPI()
    bus.install(app)
    sessions = async_sessionmaker(engine)

    @app.post("/flaky/{fails}")
    async def emit(fails: int, bus: EventBus = Depends(get_bus)) -> str:
        async with sessions() as db:
            event = bus.emit("flaky", {"fails": fails}, session=db)
            await db.commit()
        return event.id

    asyncio.run(outbox.create_tables())
    with caplog.at_level(logging.INFO, "fastapi_eventbus"), TestClient(app) as client:
        recovers = client.post("/flaky/1").json()
        gives_up = client.post("/flaky/5").json()
        deadline = time.monotonic() + 10  # the relay retries on the app's loop meanwhile
        while time.monotonic() < deadline:
            if discards and not asyncio.run(outbox.pending()):  # all settled
                break
            time.sleep(0.02)
    assert calls[recovers] == 2  # failed once, relayed once: handled
    assert calls[gives_up] == 3  # max_attempts
    dead = asyncio.run(outbox.dead())
    assert [item.event.id for item in dead] == [gives_up]
    assert asyncio.run(outbox.pending()) == []
    assert [e.id for d in discards for e in d.events] == [gives_up]
    assert f"id={gives_up}) dead-lettered" in caplog.text
    assert asyncio.run(outbox.replay()) == 1
    assert [item.event.id for item in asyncio.run(outbox.pending())] == [gives_up]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_sync_session_and_engine_work_the_same(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'sync.db'}"
    else:
        postgres = request.getfixturevalue("postgres")
        url = postgres.url("psycopg", postgres.create_database())
    engine = create_engine(url)
    metadata.create_all(engine)
    bus = EventBus(outbox=SQLAlchemyOutbox(engine))
    seen: list[str] = []

    @bus.on("order.created")
    def on_created(event: Event) -> None:
        with Session(engine) as db:
            assert db.scalar(select(func.count()).select_from(orders)) == 1
        seen.append(event.id)

    app = FastAPI()
    bus.install(app)

    @app.post("/orders")
    def create(bus: EventBus = Depends(get_bus)) -> str:
        with Session(engine) as db:
            db.execute(insert(orders).values(id=1, item="sync"))
            event = bus.emit("order.created", {"id": 1}, session=db)
            db.commit()
        return event.id

    asyncio.run(bus.outbox.create_tables())  # type: ignore[union-attr]
    with TestClient(app) as client:
        event_id = client.post("/orders").json()
    assert seen == [event_id], url
    engine.dispose()


def test_bad_outbox_use_fails_at_the_call(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    other = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    bus = EventBus(outbox=SQLAlchemyOutbox(engine))
    plain = EventBus()
    with pytest.raises(ConfigurationError, match="needs a bus with an outbox"):
        plain.emit("x", {}, session=AsyncSession(engine))
    with pytest.raises(TypeError, match="takes a SQLAlchemy Session or AsyncSession"):
        bus.emit("x", {}, session="db")
    with pytest.raises(ConfigurationError, match="the database its relay reads"):
        bus.emit("x", {}, session=AsyncSession(other))
    with pytest.raises(ConfigurationError, match="Engine or AsyncEngine"):
        SQLAlchemyOutbox("sqlite://")  # type: ignore[arg-type]
    mysqldb = SimpleNamespace(paramstyle="format", version_info=(2, 1, 0), __version__="2.1.0")
    for url in ("mysql+mysqldb://shop@db/shop", "mariadb+mysqldb://shop@db/shop"):
        with pytest.raises(ConfigurationError, match="does not support"):  # and its times
            SQLAlchemyOutbox(create_engine(url, module=mysqldb))  # would be 4-byte floats
    with pytest.raises(ConfigurationError, match="lease"):
        SQLAlchemyOutbox(engine, lease=0)
    for timeout in (0, -1, None, "30"):
        with pytest.raises(ConfigurationError, match="database_timeout"):
            SQLAlchemyOutbox(engine, database_timeout=timeout)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="database_timeout"):
            SQLAlchemyInbox(engine, database_timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="another EventBus"):
        EventBus(outbox=bus.outbox)


@pytest.mark.parametrize("listen", [True, False], ids=["listen", "poll"])
def test_an_idle_relay_takes_rows_a_script_committed(postgres: Any, listen: bool) -> None:
    """A script without an event loop leaves its rows due at once; the relay of a running
    app takes them: at once with LISTEN/NOTIFY, at its next poll without."""
    database = postgres.create_database()
    async_url, sync_url = postgres.url("asyncpg", database), postgres.url("psycopg", database)
    app, _, _ = make_shop(async_url, poll_interval=3.0, listen=listen)
    script_bus = EventBus(outbox=SQLAlchemyOutbox(create_engine(sync_url), metadata=metadata))
    sync_engine = create_engine(sync_url)
    with TestClient(app):  # its lifespan creates the tables and starts the relay
        time.sleep(0.5)  # the relay's first round is over: it is idle
        latencies = []
        for n in range(1, 4):
            with Session(sync_engine) as db:
                db.execute(insert(orders).values(id=n, item="script"))
                script_bus.emit("order.created", {"id": n, "item": "script"}, session=db)
                db.commit()
            committed = time.monotonic()
            while len(rows(async_url, handled)) < n and time.monotonic() - committed < 10:
                time.sleep(0.01)
            latencies.append(time.monotonic() - committed)
    sync_engine.dispose()
    assert len(rows(async_url, handled)) == 3
    if listen:  # polling (every 3 s here) takes 1.5 s on average
        assert max(latencies) < 1.0, latencies


class _Outage(RecordingForwarder):
    """A broker that is down for its first *down* sends (a transient failure)."""

    def __init__(self, down: int) -> None:
        super().__init__(name="orders-queue")
        self.retry = Retry(attempts=1)
        self.down = down

    async def send(self, events: Sequence[Event]) -> None:
        if self.down > 0:
            self.down -= 1
            raise ForwarderError("broker unreachable", transient=True)
        await super().send(events)


def test_a_forwarder_gets_committed_events_and_an_outage_is_retried_from_the_outbox(
    db_url: str,
) -> None:
    """Each destination has its own row: the forwarder's outage retries the send only, the
    local handler (which succeeded) does not run again."""
    engine = create_async_engine(db_url, poolclass=NullPool)
    outbox = SQLAlchemyOutbox(engine, lease=5.0, poll_interval=0.05, retry_initial=0.05)
    bus = EventBus(outbox=outbox)
    queue = bus.forward("order.*", _Outage(down=2))
    handled_ids: list[str] = []

    @bus.on("order.created")
    async def on_created(event: Event) -> None:
        handled_ids.append(event.id)

    async def scenario() -> list[str]:
        await outbox.create_tables()
        sessions = async_sessionmaker(engine)
        ids = []
        async with sessions() as db:
            ids = [bus.emit("order.created", {"id": n}, session=db).id for n in range(3)]
            await db.commit()
        await bus.drain()  # the committed delivery: handled; the send failed (kept)
        assert sorted(handled_ids) == sorted(ids)
        assert queue.events == []
        pending = await outbox.pending()
        assert {(p.event.id, p.forwarder, p.attempts) for p in pending} == {
            (i, "orders-queue", 1) for i in ids
        }
        for _ in range(200):  # the relay's rounds: the second fails, the third sends
            await outbox.relay_once()
            if not await outbox.pending():
                break
            await asyncio.sleep(0.03)
        return ids

    ids = asyncio.run(scenario())
    assert sorted(e.id for e in queue.events) == sorted(ids)  # each once
    assert sorted(handled_ids) == sorted(ids)  # the handler did not run again


def test_an_event_a_handler_emits_in_its_transaction_is_handled_when_the_handler_returns(
    db_url: str,
) -> None:
    """Found: it waited for the relay (the lease, 60 s): the handler's batch flushed only
    events, not committed outbox work."""
    engine = create_async_engine(db_url, poolclass=NullPool)
    outbox = SQLAlchemyOutbox(engine)  # the default lease: a minute
    bus = EventBus(outbox=outbox)
    sessions = async_sessionmaker(engine)
    shipped: list[str] = []

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with sessions() as db:
            yield db

    @bus.on("order.paid")
    async def ship(
        event: Event, db: AsyncSession = Depends(get_db), bus: EventBus = Depends(get_bus)
    ) -> None:
        bus.emit("order.shipped", event.payload, session=db)
        await db.commit()

    @bus.on("order.shipped")
    async def notify(event: Event) -> None:
        shipped.append(event.payload["id"])

    async def scenario() -> None:
        await outbox.create_tables()
        await bus.publish("order.paid", {"id": "o-1"})
        assert shipped == ["o-1"]  # handled before publish returned
        assert await outbox.pending() == []

    asyncio.run(scenario())


def test_a_sync_script_shares_the_outbox_of_an_async_app(tmp_path: Path) -> None:
    """The same database through another driver is the same database: a script with a sync
    session emits through the app's bus; its rows are left due for the app's relay."""
    path = tmp_path / "shop.db"
    outbox = SQLAlchemyOutbox(
        create_async_engine(f"sqlite+aiosqlite:///{path}", poolclass=NullPool)
    )
    bus = EventBus(outbox=outbox)
    sync_engine = create_engine(f"sqlite:///{path}")
    asyncio.run(outbox.create_tables())
    with Session(sync_engine) as db:
        event = bus.emit("order.created", {"id": 1}, session=db)
        db.commit()
    sync_engine.dispose()
    pending = asyncio.run(outbox.pending())
    assert [(p.event.id, p.forwarder) for p in pending] == [(event.id, "")]


def test_a_row_for_local_handlers_this_release_lacks_waits_and_is_not_lost(
    tmp_path: Path, discards: list[DiscardedEvents], caplog: pytest.LogCaptureFixture
) -> None:
    """A row written for the local handlers (by a release that had one) and relayed by a
    release that only forwards that name: it was deleted as done, neither handled, sent nor
    reported. It stays due (another process may have the handler), then is dead-lettered
    with ``on_discard`` as a row of an unknown forwarder is."""
    path = tmp_path / "shop.db"

    def bus_on_the_shop_db() -> tuple[EventBus, SQLAlchemyOutbox]:
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}", poolclass=NullPool)
        outbox = SQLAlchemyOutbox(engine, retry_initial=0.001, retry_max=0.001, max_attempts=2)
        return EventBus(outbox=outbox, on_discard=discards.append), outbox

    before, outbox = bus_on_the_shop_db()

    @before.on("order.paid")
    async def ship(event: Event) -> None: ...

    asyncio.run(outbox.create_tables())
    sync_engine = create_engine(f"sqlite:///{path}")
    with Session(sync_engine) as db:  # a script of the earlier release
        event = before.emit("order.paid", {"id": 1}, session=db)
        db.commit()
    sync_engine.dispose()

    after, relay = bus_on_the_shop_db()  # this release forwards order.paid, handles nothing
    forwarder = RecordingForwarder()
    after.forward("order.paid", forwarder)

    async def relay_once() -> list[str]:
        await relay.relay_once()
        return [p.event.id for p in await relay.pending()]

    assert asyncio.run(relay_once()) == [event.id]  # still due
    assert forwarder.batches == []
    # Found: said at INFO only, round after round, until its attempts ran out (hours).
    assert any(
        r.levelno == logging.WARNING and event.id in r.message and "no handler" in r.message
        for r in caplog.records
    )
    for _ in range(3):
        time.sleep(0.01)
        asyncio.run(relay_once())
    assert [report.ids for report in discards] == [[event.id]]
    assert "no handler" in discards[0].reason


def test_a_row_for_a_forwarder_this_release_lacks_is_a_warning_each_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: rows for a forwarder renamed since were tried again at every round with an
    INFO line only, until their attempts ran out (hours with the default backoff)."""
    path = tmp_path / "shop.db"

    def bus_on_the_shop_db(name: str) -> tuple[EventBus, SQLAlchemyOutbox]:
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}", poolclass=NullPool)
        outbox = SQLAlchemyOutbox(engine, retry_initial=0.001, retry_max=0.001)
        bus = EventBus(outbox=outbox)
        bus.forward("order.*", RecordingForwarder(name=name))
        return bus, outbox

    before, outbox = bus_on_the_shop_db("old-sqs")
    asyncio.run(outbox.create_tables())
    sync_engine = create_engine(f"sqlite:///{path}")
    with Session(sync_engine) as db:
        event = before.emit("order.paid", {"id": 1}, session=db)
        db.commit()
    sync_engine.dispose()
    _, relay = bus_on_the_shop_db("orders-sqs")
    for _ in range(2):
        time.sleep(0.01)
        asyncio.run(relay.relay_once())
    warned = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and event.id in r.message and "old-sqs" in r.message
    ]
    assert len(warned) == 2


def sync_shop(
    tmp_path: Path, discards: list[DiscardedEvents] | None = None
) -> tuple[Engine, SQLAlchemyOutbox, EventBus, list[str]]:
    """A sync engine on a SQLite file, its outbox, a bus, and the ids its handler got."""
    engine = create_engine(f"sqlite:///{tmp_path / 'shop.db'}")
    outbox = SQLAlchemyOutbox(engine)
    on_discard = None if discards is None else discards.append
    bus = EventBus(outbox=outbox, on_discard=on_discard)
    handled: list[str] = []

    @bus.on("order.*")
    async def ship(event: Event) -> None:
        handled.append(event.id)

    return engine, outbox, bus, handled


def test_a_commit_in_another_thread_outside_a_request_hands_the_event_over(
    tmp_path: Path,
) -> None:
    """Found: ``await asyncio.to_thread(db.commit)`` (the usual way not to block the loop)
    found no event loop in that thread: ERROR "no event loop to run the job on", and the
    event waited for the relay until its lease ended (60 s)."""
    engine, outbox, bus, handled = sync_shop(tmp_path)

    async def scenario() -> str:
        await outbox.create_tables()
        with Session(engine) as db:
            event = bus.emit("order.placed", {"id": 1}, session=db)
            await asyncio.to_thread(db.commit)
        for _ in range(200):
            if handled:
                break
            await asyncio.sleep(0.01)
        return event.id

    assert handled == [asyncio.run(scenario())]
    engine.dispose()


@pytest.mark.parametrize("outer", ["commit", "rollback"])
def test_a_session_joined_to_an_outer_transaction_waits_for_it(
    tmp_path: Path, discards: list[DiscardedEvents], outer: str
) -> None:
    """Found: with ``Session(bind=connection)`` on a connection already in a transaction
    (SQLAlchemy's pattern for tests and units of work), ``session.commit()`` commits nothing,
    yet the event was handled; when the outer transaction rolled back, the handler had run
    for data that never existed, and ``on_discard`` heard nothing."""
    engine, outbox, bus, handled = sync_shop(tmp_path, discards)

    async def scenario() -> str:
        await outbox.create_tables()
        with engine.connect() as connection:
            transaction = connection.begin()
            db = Session(bind=connection)  # joins the connection's transaction
            event = bus.emit("order.placed", {"id": 1}, session=db)
            db.commit()  # nothing committed in the database yet
            await asyncio.sleep(0.1)
            assert handled == []
            getattr(transaction, outer)()
        for _ in range(100):
            if handled or discards:
                break
            await asyncio.sleep(0.01)
        return event.id

    event_id = asyncio.run(scenario())
    if outer == "commit":
        assert (handled, discards) == ([event_id], [])
    else:
        assert handled == []
        assert [report.ids for report in discards] == [[event_id]]
    engine.dispose()


@pytest.mark.parametrize(
    "case",
    ["closed first", "its savepoint rolls back", "a later savepoint rolls back"],
)
def test_a_joined_session_s_event_follows_what_the_outer_transaction_keeps(
    tmp_path: Path, discards: list[DiscardedEvents], case: str
) -> None:
    """Found: a session joined to a connection's transaction and closed before that
    transaction committed (``with Session(bind=connection) as db:``, the usual unit of work)
    had its committed event reported to ``on_discard`` as rolled back, and its row relayed
    later all the same. And a session written inside a savepoint of the connection
    (``connection.begin_nested()``) had its event handled when that savepoint rolled back:
    the data and the row were gone, and nothing was reported."""
    engine, outbox, bus, handled = sync_shop(tmp_path, discards)

    async def scenario() -> str:
        await outbox.create_tables()
        with engine.connect() as connection:
            transaction = connection.begin()
            savepoint = connection.begin_nested() if case != "closed first" else None
            with Session(bind=connection) as db:
                event = bus.emit("order.placed", {"id": 1}, session=db)
                db.commit()
            if case == "a later savepoint rolls back":
                connection.begin_nested().rollback()  # after the session's rows: they stay
            if savepoint is not None:
                savepoint.rollback() if case == "its savepoint rolls back" else savepoint.commit()
            transaction.commit()
        for _ in range(100):
            if handled or discards:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return event.id

    event_id = asyncio.run(scenario())
    left = [row.event_id for row in outbox_rows(f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}", bus)]
    if case == "its savepoint rolls back":
        assert (handled, left) == ([], [])
        assert [(report.ids, report.reason) for report in discards] == [
            ([event_id], "the savepoint of the outer transaction that wrote them rolled back")
        ]
    else:
        assert (handled, discards, left) == ([event_id], [], [])
    engine.dispose()


@pytest.mark.parametrize(
    "case",
    ["its savepoint rolls back while a later one is open", "flushed before a later savepoint"],
)
def test_a_joined_session_s_rows_go_with_the_savepoints_open_when_they_were_flushed(
    tmp_path: Path, discards: list[DiscardedEvents], case: str
) -> None:
    """Found: the outbox counted the connection's savepoints begun and ended after a joined
    session's commit. Rolling back the savepoint holding its rows while a later one was
    open (SQLAlchemy then tells one rollback, of the outer) was taken for the later one's:
    the event was handled for rows that were gone. And a savepoint begun after the rows
    were flushed, but before the session's commit, was taken to hold them: rolling it back
    reported the event discarded, yet its row stayed, for the relay to deliver."""
    engine, outbox, bus, handled = sync_shop(tmp_path, discards)

    async def scenario() -> str:
        await outbox.create_tables()
        with engine.connect() as connection:
            transaction = connection.begin()
            if case == "flushed before a later savepoint":
                with Session(bind=connection) as db:
                    event = bus.emit("order.placed", {"id": 1}, session=db)
                    db.flush()  # in the outer transaction
                    later = connection.begin_nested()
                    db.commit()
                later.rollback()  # holds none of the rows
            else:
                holding = connection.begin_nested()
                with Session(bind=connection) as db:
                    event = bus.emit("order.placed", {"id": 1}, session=db)
                    db.commit()
                connection.begin_nested()  # still open when the one before it rolls back
                with pytest.warns(Warning, match="deassociated"):
                    holding.rollback()
            transaction.commit()
        for _ in range(100):
            if handled or discards:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return event.id

    event_id = asyncio.run(scenario())
    left = [row.event_id for row in outbox_rows(f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}", bus)]
    if case == "flushed before a later savepoint":
        assert (handled, discards, left) == ([event_id], [], [])
    else:
        assert (handled, left) == ([], [])
        assert [report.ids for report in discards] == [[event_id]]
    engine.dispose()


@pytest.mark.parametrize(
    "mode", ["conditional_savepoint", "rollback_only", "create_savepoint", "not flushed"]
)
def test_a_joined_session_closed_without_commit_leaves_what_it_flushed_to_the_connection(
    tmp_path: Path, discards: list[DiscardedEvents], mode: str
) -> None:
    """Found: a session joined to a connection's transaction (the default
    ``join_transaction_mode``, or ``rollback_only``) that flushed its event's rows and was
    closed without a commit had its event reported discarded; the connection then
    committed the rows, which the relay delivered after the lease. Its rows follow the
    connection now; a session whose close rolls back its own savepoint, or that never
    flushed, still discards them."""
    engine, outbox, bus, handled = sync_shop(tmp_path, discards)

    async def scenario() -> str:
        await outbox.create_tables()
        with engine.connect() as connection:
            transaction = connection.begin()
            join = "conditional_savepoint" if mode == "not flushed" else mode
            with Session(bind=connection, join_transaction_mode=join) as db:  # type: ignore[arg-type]
                event = bus.emit("order.placed", {"id": 1}, session=db)
                if mode != "not flushed":
                    db.flush()  # an autoflush, say; no commit
            transaction.commit()
        for _ in range(100):
            if handled or discards:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return event.id

    event_id = asyncio.run(scenario())
    left = [row.event_id for row in outbox_rows(f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}", bus)]
    if mode in ("conditional_savepoint", "rollback_only"):
        assert (handled, discards, left) == ([event_id], [], [])
    else:
        assert (handled, left) == ([], [])
        assert [report.ids for report in discards] == [[event_id]]
    engine.dispose()


def test_a_long_lived_connection_keeps_one_set_of_outbox_listeners(tmp_path: Path) -> None:
    """Found: each joined session's commit added its listeners to the connection, never
    removed (five in a savepoint): a connection holding one transaction for many units of
    work (a test fixture) ran them all at each commit or savepoint, O(n²), holding every
    event and row."""
    engine, outbox, bus, handled = sync_shop(tmp_path)

    async def scenario() -> list[int]:
        await outbox.create_tables()
        with engine.connect() as connection:
            transaction = connection.begin()
            for n in range(5):
                savepoint = connection.begin_nested()
                with Session(bind=connection) as db:
                    bus.emit("order.placed", {"id": n}, session=db)
                    db.commit()
                savepoint.commit()
            dispatch: Any = connection.dispatch
            counts = [len(dispatch.commit), len(dispatch.rollback), len(dispatch.savepoint)]
            counts += [len(dispatch.release_savepoint), len(dispatch.rollback_savepoint)]
            transaction.commit()
        for _ in range(100):
            if len(handled) == 5:
                break
            await asyncio.sleep(0.01)
        return counts

    assert asyncio.run(scenario()) == [1, 1, 0, 0, 1]
    assert len(handled) == 5
    engine.dispose()


def test_a_row_deleted_before_the_commit_is_discarded_not_handled(
    tmp_path: Path, discards: list[DiscardedEvents]
) -> None:
    """Found: an event whose row was flushed, then deleted (``session.delete``), counted as
    committed (the row kept its identity): it was handled, though no row was committed."""
    engine, outbox, bus, handled = sync_shop(tmp_path, discards)

    async def scenario() -> str:
        await outbox.create_tables()
        with Session(engine) as db:
            event = bus.emit("order.placed", {"id": 1}, session=db)
            db.flush()
            for row in list(db.identity_map.values()):
                db.delete(row)
            db.commit()
        for _ in range(100):
            if handled or discards:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return event.id

    event_id = asyncio.run(scenario())
    assert handled == []
    assert [report.ids for report in discards] == [[event_id]]
    assert "deleted" in discards[0].reason
    engine.dispose()


def test_a_session_that_cannot_be_rolled_back_is_refused_at_emit(tmp_path: Path) -> None:
    """Found: a session on an AUTOCOMMIT engine commits each row as it is flushed; its
    rollback reported the event to ``on_discard`` as never written, and the relay then
    handled it. A session whose ``schema_translate_map`` puts the outbox's table in another
    schema wrote rows the relay never reads: a failed handler was never retried, nor
    reported. Both are refused at ``emit``."""
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    bus = EventBus(outbox=SQLAlchemyOutbox(create_engine(url)))
    autocommit = create_engine(url, isolation_level="AUTOCOMMIT")
    with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
        bus.emit("order.placed", {"id": 1}, session=Session(autocommit))
    with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
        bus.emit(
            "order.placed",
            {"id": 1},
            session=Session(create_engine(url).execution_options(isolation_level="AUTOCOMMIT")),
        )
    tenant = create_engine(url).execution_options(schema_translate_map={None: "tenant1"})
    with pytest.raises(ConfigurationError, match="schema_translate_map"):
        bus.emit("order.placed", {"id": 1}, session=Session(tenant))
    assert bus.emit("order.placed", {"id": 1}, session=Session(create_engine(url))).id


def test_a_session_autocommitting_however_set_is_refused_at_emit(tmp_path: Path) -> None:
    """Found: the AUTOCOMMIT check read the level in upper case only, and only the engine's:
    ``isolation_level="autocommit"`` (which SQLAlchemy accepts) and a session's own
    connection (``session.connection(execution_options={"isolation_level":
    "AUTOCOMMIT"})``, SQLAlchemy's per-session level) passed, and their rollback left the
    rows; so did a ``schema_translate_map`` given that way. An AUTOCOMMIT engine whose
    session's connection was set back to a transactional level was refused."""
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    bus = EventBus(outbox=SQLAlchemyOutbox(create_engine(url)))
    lower = Session(create_engine(url, isolation_level="autocommit"))
    own_level, own_schema = Session(create_engine(url)), Session(create_engine(url))
    own_level.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    own_schema.connection(execution_options={"schema_translate_map": {None: "tenant1"}})
    back = Session(create_engine(url, isolation_level="AUTOCOMMIT"))
    back.connection(execution_options={"isolation_level": "SERIALIZABLE"})
    with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
        bus.emit("a", {}, session=lower)
    with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
        bus.emit("a", {}, session=own_level)
    with pytest.raises(ConfigurationError, match="schema_translate_map"):
        bus.emit("a", {}, session=own_schema)
    assert bus.emit("a", {}, session=back).id
    for session in (lower, own_level, own_schema, back):
        session.close()

    async def held_by_an_async_session() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}")
        async with AsyncSession(engine) as db:
            await db.connection(execution_options={"isolation_level": "autocommit"})
            with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
                bus.emit("a", {}, session=db)
        async with AsyncSession(engine) as db:
            assert bus.emit("a", {}, session=db).id  # no connection yet: the engine's level
        await engine.dispose()

    asyncio.run(held_by_an_async_session())


def test_a_handler_raising_cancelled_error_fails_its_row_and_the_relay_goes_on(
    tmp_path: Path, discards: list[DiscardedEvents]
) -> None:
    """Found: a handler that raised `asyncio.CancelledError` without being cancelled stopped
    the relay's whole batch as if shutdown had cancelled it. `relay_once` raised, the other
    row of the batch was not delivered, and neither row counted an attempt: every round
    did the same, so the event was never dead-lettered nor reported."""
    path = tmp_path / "shop.db"
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", poolclass=NullPool)
    outbox = SQLAlchemyOutbox(engine, retry_initial=0.001, retry_max=0.001, max_attempts=2)
    bus = EventBus(outbox=outbox, on_discard=discards.append)
    handled: list[str] = []

    @bus.on("order.lost")
    async def lost(event: Event) -> None:
        raise asyncio.CancelledError  # e.g. it awaited a task something else cancelled

    bus.on("order.paid")(lambda event: handled.append(event.id))
    asyncio.run(outbox.create_tables())
    sync_engine = create_engine(f"sqlite:///{path}")
    with Session(sync_engine) as db:  # a script: the relay delivers its events
        bad = bus.emit("order.lost", {"id": 1}, session=db)
        good = bus.emit("order.paid", {"id": 2}, session=db)
        db.commit()
    sync_engine.dispose()

    async def relay() -> list[str]:
        for _ in range(3):
            await outbox.relay_once()
            await asyncio.sleep(0.01)
        return [p.event.id for p in await outbox.pending()]

    assert asyncio.run(relay()) == []
    assert handled == [good.id]
    assert [report.ids for report in discards] == [[bad.id]]
    assert "CancelledError" in discards[0].reason


class _Stubborn:
    """A handler that ignores the cancellation its time limit sends, and goes on until the
    test lets it stop (a bare ``except BaseException``, a library that swallows it)."""

    def __init__(self) -> None:
        self.stop = False
        self.started = 0

    async def __call__(self, event: Event) -> None:
        self.started += 1
        while not self.stop:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue  # ignored

    async def release(self) -> None:
        """Let it return, and let the event loop see it do so."""
        self.stop = True
        await asyncio.sleep(0.05)


def _stubborn_shop(path: Path) -> tuple[EventBus, SQLAlchemyOutbox, _Stubborn]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", poolclass=NullPool)
    outbox = SQLAlchemyOutbox(engine, lease=1.0, poll_interval=0.05)
    bus = EventBus(outbox=outbox, shutdown_timeout=0.3)
    stubborn = _Stubborn()

    @bus.on("order.stuck", timeout=0.1)
    async def stuck(event: Event) -> None:  # a function: FastAPI 0.121 cannot read the
        await stubborn(event)  # string annotations of a callable instance's __call__

    asyncio.run(outbox.create_tables())
    return bus, outbox, stubborn


def _commit_from_a_script(path: Path, bus: EventBus, *names: str) -> list[str]:
    """Emit *names* with a sync session, no event loop: the rows wait for the relay."""
    sync_engine = create_engine(f"sqlite:///{path}")
    with Session(sync_engine) as db:
        ids = [bus.emit(name, {}, session=db).id for name in names]
        db.commit()
    sync_engine.dispose()
    return ids


def test_a_handler_that_ignores_its_time_limit_does_not_stall_the_relay(tmp_path: Path) -> None:
    """Found: the relay ran a round's local handlers one after the other, then its sends: a
    handler ignoring its cancellation held every other row of the round (and their leases,
    renewed) for as long as it ran. It is left running past its time limit and an
    overtime, reported, and its row relayed again; the other rows go through."""
    path = tmp_path / "shop.db"
    bus, outbox, stubborn = _stubborn_shop(path)
    queue = RecordingForwarder()
    bus.forward("order.sent", queue)
    handled: list[str] = []

    @bus.on("order.paid")
    async def paid(event: Event) -> None:
        handled.append(event.id)

    stuck, sent, paid_id = _commit_from_a_script(
        path, bus, "order.stuck", "order.sent", "order.paid"
    )

    async def scenario() -> float:
        started = time.monotonic()
        relay = asyncio.ensure_future(outbox.relay_once())
        with anyio.move_on_after(15):
            await asyncio.shield(relay)
        took = time.monotonic() - started
        await stubborn.release()
        await relay
        return took

    took = asyncio.run(scenario())
    assert [e.id for batch in queue.batches for e in batch] == [sent]
    assert handled == [paid_id]
    assert took < 10  # the stuck handler's 0.1 s limit and an overtime, not until it stops
    pending = asyncio.run(outbox.pending())
    assert [(p.event.id, p.forwarder) for p in pending] == [(stuck, "")]  # relayed again


def test_shutdown_does_not_wait_for_a_handler_that_ignores_its_cancellation(
    tmp_path: Path,
) -> None:
    """Found: at shutdown the relay waited for its round to end after cancelling it, so a
    handler ignoring its cancellation held the lifespan's exit (and a worker's) forever.
    The exit takes ``shutdown_timeout`` and a bounded grace; the row stays in the outbox."""
    path = tmp_path / "shop.db"
    bus, outbox, stubborn = _stubborn_shop(path)
    app = FastAPI()
    bus.install(app)
    [stuck] = _commit_from_a_script(path, bus, "order.stuck")

    async def scenario() -> float:
        async with app.router.lifespan_context(app):
            while not stubborn.started:  # noqa: ASYNC110 - the relay took the row
                await asyncio.sleep(0.01)
            leaving = time.monotonic()
        took = time.monotonic() - leaving
        await stubborn.release()
        return took

    assert asyncio.run(scenario()) < 5
    assert [p.event.id for p in asyncio.run(outbox.pending())] == [stuck]


def test_an_outboxed_event_keeps_its_extensions(tmp_path: Path) -> None:
    """The row holds the whole event: what the relay delivers carries its extensions."""
    path = tmp_path / "shop.db"
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", poolclass=NullPool)
    outbox = SQLAlchemyOutbox(engine)
    bus = EventBus(outbox=outbox)
    asyncio.run(outbox.create_tables())
    sync_engine = create_engine(f"sqlite:///{path}")
    with Session(sync_engine) as db:
        event = bus.emit("order.created", {"id": 1}, session=db, extensions={"subject": "o/1"})
        db.commit()
    sync_engine.dispose()
    (row,) = asyncio.run(outbox.pending())
    assert row.event == event
    assert row.event.extensions == {"subject": "o/1"}


class OrderPaid(BaseModel):
    __event_name__ = "order.paid"

    id: int
    amount: float


def test_a_model_emitted_with_a_session_is_validated_in_the_caller_and_handled(
    db_url: str,
) -> None:
    engine = create_async_engine(db_url, poolclass=NullPool)
    outbox = SQLAlchemyOutbox(engine)
    bus = EventBus(outbox=outbox)
    bus.register(OrderPaid)
    got: list[OrderPaid] = []

    @bus.on("order.paid")
    async def on_paid(paid: OrderPaid) -> None:
        got.append(paid)

    async def scenario() -> None:
        await outbox.create_tables()
        async with async_sessionmaker(engine)() as db:
            with pytest.raises(InvalidEventError):  # in the caller, as without a session
                bus.emit("order.paid", {"id": "not a number"}, session=db)
            bus.emit(OrderPaid(id=1, amount=9.5), session=db)
            await db.commit()
        await bus.drain()
        assert await outbox.pending() == []

    asyncio.run(scenario())
    assert got == [OrderPaid(id=1, amount=9.5)]
