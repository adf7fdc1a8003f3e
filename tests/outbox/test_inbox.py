"""The inbox: a redelivered event runs only the handlers that have not succeeded for it."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ClassVar

import pytest
from fastapi import Depends
from pydantic import BaseModel
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool

from fastapi_eventbus import ConfigurationError, Event, EventBus, HandlerFailure
from fastapi_eventbus.outbox import SQLAlchemyInbox, SQLAlchemyOutbox

pytestmark = pytest.mark.slow

metadata = MetaData()
effects = Table(
    "effects",
    metadata,
    Column("n", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False),
)


async def _setup(
    url: str, inbox: bool, outbox: bool = False
) -> tuple[EventBus, async_sessionmaker[AsyncSession]]:
    engine = create_async_engine(url, poolclass=NullPool)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    box = SQLAlchemyInbox(engine) if inbox else None
    if box is not None:
        await box.create_tables()
    out = SQLAlchemyOutbox(engine, lease=0.2, poll_interval=0.05) if outbox else None
    if out is not None:
        await out.create_tables()
    return EventBus(inbox=box, outbox=out), async_sessionmaker(engine)


class PaidV1(BaseModel):
    __event_name__: ClassVar[str] = "paid"
    order: int


class PaidV2(BaseModel):
    __event_name__: ClassVar[str] = "paid"
    order: int
    customer: str


def test_a_handler_refused_at_registration_can_be_registered_once_fixed(db_url: str) -> None:
    """Found: a handler refused by `bus.on` (its model conflicts with the event's schema)
    kept its name, so the corrected handler was refused as "registered already"."""

    async def scenario() -> list[int]:
        bus, _ = await _setup(db_url, inbox=True)
        bus.register(PaidV1)
        got: list[int] = []

        async def receipt(event: PaidV2) -> None:
            got.append(-1)

        with pytest.raises(ConfigurationError, match="already has the schema PaidV1"):
            bus.on()(receipt)

        async def receipt(event: PaidV1) -> None:  # type: ignore[no-redef]  # the fix
            got.append(event.order)

        bus.on()(receipt)
        await bus.publish(PaidV1(order=7))
        return got

    assert asyncio.run(scenario()) == [7]


@pytest.mark.parametrize("inbox", [True, False], ids=["inbox", "no-inbox"])
def test_a_redelivery_runs_only_the_handlers_that_failed(db_url: str, inbox: bool) -> None:
    """Found: a redelivered event re-ran every handler because one of them had failed."""

    async def scenario() -> Counter[str]:
        bus, _ = await _setup(db_url, inbox)
        calls: Counter[str] = Counter()

        @bus.on("paid")
        async def send_receipt(event: Event) -> None:
            calls["send_receipt"] += 1

        @bus.on("paid")
        async def ship(event: Event) -> None:
            calls["ship"] += 1
            if calls["ship"] == 1:
                raise RuntimeError("warehouse down")

        delivered = Event(name="paid", payload={"order": 1})  # as a worker decodes it
        first = await bus.handle(delivered)  # the first delivery: ship fails
        assert [f.handler.rsplit(".", 1)[-1] for f in first] == ["ship"]
        assert await bus.handle(delivered) == []  # the redelivery
        assert await bus.handle(delivered) == []  # and one more: nothing left to run
        return calls

    calls = asyncio.run(scenario())
    assert calls["ship"] == (2 if inbox else 3)
    assert calls["send_receipt"] == (1 if inbox else 3)


def test_two_producers_events_with_one_id_are_both_handled(db_url: str) -> None:
    """Found: a CloudEvents id is unique only with its source, and the inbox recorded the id
    alone. The second shop's order was skipped as "already handled", and acknowledged."""

    async def scenario() -> list[tuple[str | None, str]]:
        bus, _ = await _setup(db_url, inbox=True)
        seen: list[tuple[str | None, str]] = []

        @bus.on("order.placed")
        async def ship(event: Event) -> None:
            seen.append((event.source, event.payload["order"]))

        eu = Event(name="order.placed", id="1001", source="//shop-eu", payload={"order": "EU-1"})
        us = Event(name="order.placed", id="1001", source="//shop-us", payload={"order": "US-7"})
        # An id longer than the table's column (PostgreSQL refused to record it: every
        # redelivery ran the handler again).
        long = Event(name="order.placed", id="x" * 100, source="//shop-eu", payload={"order": "L"})
        for event in (eu, us, long, eu, us, long):  # each delivered twice
            assert await bus.handle(event) == []
        return seen

    seen = asyncio.run(scenario())
    assert seen == [("//shop-eu", "EU-1"), ("//shop-us", "US-7"), ("//shop-eu", "L")]


@pytest.mark.parametrize("inbox", [True, False], ids=["inbox", "no-inbox"])
def test_a_handler_s_own_commit_records_it_so_its_effects_happen_once(
    db_url: str, inbox: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler commits its work, then fails (or its process dies) before returning: with
    the inbox, its row committed with the work, so the redelivery does not do it again.
    Found: nothing said that what such a handler had left to do after its commit would not
    be retried (the redelivery skipped it, its message acknowledged, without a word); the
    failure's ERROR says so now."""

    async def scenario() -> int:
        bus, sessions = await _setup(db_url, inbox)

        async def get_db() -> AsyncIterator[AsyncSession]:
            async with sessions() as db:
                yield db

        @bus.on("paid")
        async def charge(event: Event, db: AsyncSession = Depends(get_db)) -> None:
            await db.execute(insert(effects).values(event_id=event.id))
            await db.commit()
            if event.payload["crash_after_commit"]:
                event.payload["crash_after_commit"] = False
                raise RuntimeError("lost after the commit")

        delivered = Event(name="paid", payload={"crash_after_commit": True})
        await bus.handle(delivered)
        await bus.handle(delivered)
        async with sessions() as db:
            count = await db.scalar(select(func.count()).select_from(effects))
        return int(count or 0)

    with caplog.at_level(logging.ERROR, "fastapi_eventbus"):
        assert asyncio.run(scenario()) == (1 if inbox else 2)
    (failure,) = [r.getMessage() for r in caplog.records if "failed for event" in r.getMessage()]
    recorded = "after a commit recorded it in the inbox: a redelivery will not run it again"
    assert (recorded in failure) is inbox


class Charged(DeclarativeBase):
    pass


class Charge(Charged):
    __tablename__ = "charges"
    id: Mapped[int] = mapped_column(primary_key=True)


@pytest.mark.parametrize("autocommit", [False, True], ids=["transactional", "autocommit"])
def test_a_commit_that_fails_records_nothing(
    db_url: str, caplog: pytest.LogCaptureFixture, autocommit: bool
) -> None:
    """Found: the inbox took its row for recorded when the commit *started*: a commit that
    then failed (a constraint, in its flush) recorded nothing, yet the failure's ERROR said
    a redelivery would not run the handler again; and a handler that caught that failure
    and returned was not recorded at all. Only a commit that succeeded records it.
    Found too: a handler's session on an AUTOCOMMIT engine committed the inbox's row as it
    was written, before the handler's failed flush: the redelivery skipped the handler."""

    async def scenario() -> list[int]:
        bus, sessions = await _setup(db_url, inbox=True)
        if autocommit:
            engine = sessions.kw["bind"].execution_options(isolation_level="AUTOCOMMIT")
            sessions = async_sessionmaker(engine)
        async with sessions() as db:
            await db.run_sync(lambda s: Charged.metadata.create_all(s.connection()))
            await db.commit()
        runs: list[int] = []

        async def get_db() -> AsyncIterator[AsyncSession]:
            async with sessions() as db:
                yield db

        @bus.on("paid")
        async def charge(event: Event, db: AsyncSession = Depends(get_db)) -> None:
            runs.append(len(runs))
            db.add(Charge(id=1))
            db.add(Charge(id=1 if len(runs) == 1 else 2))  # the same key: the commit fails
            await db.commit()

        delivered = Event(name="paid", payload={})
        await bus.handle(delivered)
        await bus.handle(delivered)  # runs again: nothing was recorded
        await bus.handle(delivered)  # recorded by the second's commit: skipped
        return runs

    with caplog.at_level(logging.ERROR, "fastapi_eventbus"):
        runs = asyncio.run(scenario())
    failures = [r.getMessage() for r in caplog.records if "failed for event" in r.getMessage()]
    if autocommit:  # the first try's rows may have stayed (SQLite writes them one by one),
        assert runs[:2] == [0, 1]  # failing the second try too: what matters is that it ran
    else:
        assert runs == [0, 1]
        assert len(failures) == 1
    assert not [f for f in failures if "a redelivery will not run it again" in f]


@pytest.mark.parametrize("how", ["lower case", "its own connection"])
def test_a_handler_s_session_in_autocommit_however_set_records_nothing(
    db_url: str, how: str
) -> None:
    """Found: a handler's session in AUTOCOMMIT set in lower case
    (``isolation_level="autocommit"``, which SQLAlchemy accepts) or on its own connection
    (``session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})``) was taken
    for transactional: the inbox's row was committed before the handler's flush failed, and
    the redelivery skipped the handler, recorded as succeeded."""

    async def scenario() -> list[int]:
        bus, sessions = await _setup(db_url, inbox=True)
        async with sessions() as db:
            await db.run_sync(lambda s: Charged.metadata.create_all(s.connection()))
            await db.commit()
        if how == "lower case":
            engine = create_async_engine(db_url, poolclass=NullPool, isolation_level="autocommit")
            sessions = async_sessionmaker(engine)
        runs: list[int] = []

        async def get_db() -> AsyncIterator[AsyncSession]:
            async with sessions() as db:
                if how == "its own connection":
                    await db.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
                yield db

        @bus.on("paid")
        async def charge(event: Event, db: AsyncSession = Depends(get_db)) -> None:
            runs.append(len(runs))
            db.add(Charge(id=10 + len(runs)))
            db.add(Charge(id=10 + len(runs)))  # the same key: every commit fails
            await db.commit()

        delivered = Event(name="paid", payload={})
        await bus.handle(delivered)
        await bus.handle(delivered)  # runs again: nothing was recorded
        return runs

    assert asyncio.run(scenario()) == [0, 1]


def test_two_sessions_committing_at_once_write_one_inbox_row(postgres_url: str) -> None:
    """Found: a handler committing two sessions at once (``asyncio.gather``) had both write
    its inbox row: one commit failed on the row's key, its work lost, and the redelivery
    skipped the handler, recorded by the other. One of them writes it now. (PostgreSQL:
    SQLite takes one writer at a time.)"""

    async def scenario() -> tuple[list[BaseException | None], int]:
        bus, sessions = await _setup(postgres_url, inbox=True)
        results: list[BaseException | None] = []

        @bus.on("paid")
        async def two_stores(event: Event) -> None:
            async with sessions() as first, sessions() as second:
                await first.execute(insert(effects).values(event_id="first"))
                await second.execute(insert(effects).values(event_id="second"))
                await asyncio.gather(first.commit(), second.commit())

        delivered = Event(name="paid", payload={})
        results += [f.exception for f in await bus.handle(delivered)]
        results += [f.exception for f in await bus.handle(delivered)]  # skipped: recorded
        async with sessions() as db:
            count = await db.scalar(select(func.count()).select_from(effects))
        return results, int(count or 0)

    assert asyncio.run(scenario()) == ([], 2)


def test_the_outbox_relay_with_an_inbox_reruns_only_the_failed_handler(db_url: str) -> None:
    async def scenario() -> Counter[str]:
        bus, sessions = await _setup(db_url, inbox=True, outbox=True)
        calls: Counter[str] = Counter()

        @bus.on("paid")
        async def send_receipt(event: Event) -> None:
            calls["send_receipt"] += 1

        @bus.on("paid")
        async def ship(event: Event) -> None:
            calls["ship"] += 1
            if calls["ship"] == 1:
                raise RuntimeError("warehouse down")

        outbox = bus.outbox
        assert isinstance(outbox, SQLAlchemyOutbox)
        async with sessions() as db:
            bus.emit("paid", {"order": 1}, session=db)
            await db.commit()
        await bus.drain()  # the committed delivery: ship fails, its row is retried
        for _ in range(200):
            if calls["ship"] == 2 and not await outbox.pending():
                break
            await outbox.relay_once()
            await asyncio.sleep(0.02)
        return calls

    calls = asyncio.run(scenario())
    assert calls == {"send_receipt": 1, "ship": 2}


def _notifier(channel: str, sent: list[str]) -> Callable[[Event], Awaitable[None]]:
    """A handler factory: every handler it makes has the same qualified name."""

    async def notify(event: Event) -> None:
        sent.append(channel)

    return notify


@pytest.mark.parametrize("inbox", [True, False], ids=["inbox", "no-inbox"])
def test_handlers_sharing_a_name_are_refused_on_a_bus_with_an_inbox(
    db_url: str, inbox: bool
) -> None:
    """The inbox records successes by handler name: of two handlers named alike (a factory's,
    a callable class's instances), one success skipped both on a redelivery, and a worker
    acknowledged a message whose other handler never succeeded. Refused where it is made."""

    async def scenario() -> list[str]:
        bus, _ = await _setup(db_url, inbox)
        sent: list[str] = []
        bus.on("paid")(_notifier("email", sent))
        if inbox:
            with pytest.raises(ConfigurationError, match=r"_notifier.<locals>.notify.*inbox"):
                bus.on("paid")(_notifier("sms", sent))
        else:
            bus.on("paid")(_notifier("sms", sent))
        await bus.publish("paid")
        return sent

    sent = asyncio.run(scenario())
    assert sent == (["email"] if inbox else ["email", "sms"])


@pytest.mark.parametrize("committer", ["a task it started", "the on_error hook"])
def test_a_commit_after_a_handler_call_ended_does_not_record_it(
    db_url: str, committer: str
) -> None:
    """Found: the inbox recorded a handler's success in any commit made in the handler's
    context until a success ended it. A commit made after the handler raised (by a task
    it started, which copies the context, or by an ``on_error`` hook writing the failure
    down) recorded the failed handler as succeeded: the redelivery skipped it and its work
    was never done. Only commits made during the call record it now."""

    async def scenario() -> tuple[int, int]:
        engine = create_async_engine(db_url, poolclass=NullPool)
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
        inbox = SQLAlchemyInbox(engine)
        await inbox.create_tables()
        sessions = async_sessionmaker(engine)
        started: list[asyncio.Task[None]] = []

        async def write_down(event_id: str) -> None:
            async with sessions() as db:
                await db.execute(insert(effects).values(event_id=f"audit {event_id}"))
                await db.commit()

        async def on_error(failure: HandlerFailure) -> None:
            if committer == "the on_error hook":
                await write_down(failure.event.id)

        bus = EventBus(inbox=inbox, on_error=on_error)
        calls: list[str] = []

        @bus.on("paid")
        async def charge(event: Event) -> None:
            calls.append(event.id)
            if committer == "a task it started":
                started.append(asyncio.create_task(write_down(event.id)))
                await asyncio.sleep(0)  # the task has started; it commits after the call
            if len(calls) == 1:
                raise RuntimeError("the card was declined")

        delivered = Event(name="paid", payload={})
        (failure,) = await bus.handle(delivered)
        assert str(failure.exception) == "the card was declined"
        await asyncio.gather(*started)
        assert await bus.handle(delivered) == []  # runs again, succeeds
        await asyncio.gather(*started)  # its task's commit after the success: no conflict
        assert await bus.handle(delivered) == []  # recorded: skipped
        async with sessions() as db:
            audits = await db.scalar(select(func.count()).select_from(effects))
        await engine.dispose()
        return len(calls), int(audits or 0)

    calls, audits = asyncio.run(scenario())
    assert calls == 2
    assert audits == (1 if committer == "the on_error hook" else 2)
