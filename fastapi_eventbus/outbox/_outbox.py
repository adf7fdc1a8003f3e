"""`SQLAlchemyOutbox`: events written in the application's own transaction, handled and
forwarded once it commits, relayed from the table after a crash."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import suppress
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    MetaData,
    Table,
    bindparam,
    delete,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, registry

from fastapi_eventbus._deadline import finish_within, running_loop
from fastapi_eventbus._events import Event, event_json
from fastapi_eventbus._hooks import DiscardedEvents, call_hook, logger
from fastapi_eventbus._retry import exponential, jittered
from fastapi_eventbus._settings import check_int, check_seconds
from fastapi_eventbus._spool_io import describe_error, id_chunks, spooled_or_stand_in
from fastapi_eventbus.exceptions import ConfigurationError
from fastapi_eventbus.storage import SpooledEvent

from ._db import check_writer, checked_engine, listen, run, sync_engine, sync_session
from ._session import Entry, joined, listen_to_sessions
from ._tables import OutboxTables, check_fits, outbox_tables

if TYPE_CHECKING:
    from fastapi_eventbus._batch import Batch
    from fastapi_eventbus._core import Core


class SQLAlchemyOutbox:
    """Events stored in the application's database, in the transaction of its data.

    Pass it as ``EventBus(outbox=SQLAlchemyOutbox(engine))`` and emit with
    ``bus.emit(name, payload, session=db)``: the event's rows are added to *db*'s
    transaction. When it commits, the event's handlers run and its forwarders
    send (after the response, in a request), and its rows are removed. When it
    rolls back, the event never existed (``on_discard`` is told). When the
    process dies in between, the relay of any process sharing the database (the
    installed lifespan runs one) handles and forwards it: at-least-once.

    Args:
        engine: The application's SQLAlchemy 2.0 engine, async or sync.
        metadata: The `MetaData` to define the tables in (your models', for
            Alembic); a new one by default. Either way `metadata` holds them.
        table_prefix: The start of the tables' names.
        lease: Seconds a row stays with the process that committed (or claimed) it
            before another relay may take it over, if that process dies. A delivery
            that takes longer extends it every half lease.
        poll_interval: Seconds between two looks for due rows by an idle relay.
        max_attempts: Failed deliveries of a row before it is dead-lettered
            (moved to the ``outbox_dead`` table, logged and reported).
        retry_initial: Seconds before the first retry of a failed row; doubled
            per failure up to *retry_max*.
        retry_max: The longest wait between two retries of a row.
        batch_size: Rows the relay claims at a time.
        listen: On PostgreSQL with an asyncpg engine, have the relay ``LISTEN``
            for the rows committed due at once (by a script without an event
            loop): it takes them at once instead of at its next poll.
        database_timeout: Seconds each database call of the relay and of a delivery
            (claiming, settling, extending a lease) may take: past it, the call fails
            with an ``ERROR``, its rows come back when their lease ends. Keep it
            below *lease*.
    """

    def __init__(
        self,
        engine: AsyncEngine | Engine,
        *,
        metadata: MetaData | None = None,
        table_prefix: str = "eventbus_",
        lease: float = 60.0,
        poll_interval: float = 1.0,
        max_attempts: int = 20,
        retry_initial: float = 1.0,
        retry_max: float = 300.0,
        batch_size: int = 100,
        listen: bool = True,
        database_timeout: float = 30.0,
    ) -> None:
        self.engine = checked_engine(engine, "SQLAlchemyOutbox", claims=True)
        self.lease = check_seconds("lease", lease, positive=True) or 0.0
        self.poll_interval = check_seconds("poll_interval", poll_interval, positive=True) or 0.0
        self.retry_initial = check_seconds("retry_initial", retry_initial, positive=True) or 0.0
        self.retry_max = check_seconds("retry_max", retry_max, positive=True) or 0.0
        self.max_attempts = check_int("max_attempts", max_attempts, 1) or 1
        self.batch_size = check_int("batch_size", batch_size, 1) or 1
        self.database_timeout = (
            check_seconds("database_timeout", database_timeout, positive=True) or 0.0
        )
        self.metadata = metadata if metadata is not None else MetaData()
        """The `MetaData` holding the outbox's tables (give it to Alembic)."""
        self.tables: OutboxTables = outbox_tables(self.metadata, table_prefix)
        self.owner = uuid.uuid4().hex
        """This process's mark on the rows it holds."""
        self._row = _row_class(self.tables.events)
        self.channel = f"{table_prefix}outbox"
        """The PostgreSQL channel new rows due at once are announced on (``listen``)."""
        self.listen = listen
        self._sync_engine = sync_engine(self.engine)
        self._attached: Core | None = None
        listen_to_sessions()  # the sessions' commits and rollbacks
        events = self.tables.events
        keys = tuple_(events.c.event_id, events.c.destination).in_(
            bindparam("keys", expanding=True)
        )
        self._delete_keys = delete(events).where(keys)

    def __repr__(self) -> str:
        return f"<SQLAlchemyOutbox {self.name}>"

    @property
    def name(self) -> str:
        """The database's URL, without its password (what log lines call the outbox)."""
        return self._sync_engine.url.render_as_string(hide_password=True)

    async def create_tables(self) -> None:
        """Create the outbox's tables if they do not exist (or use `metadata` with Alembic)."""
        tables = [self.tables.events, self.tables.dead]
        await run(self.engine, lambda c: self.metadata.create_all(c, tables=tables))

    # -- the bus ----------------------------------------------------------------

    def attach(self, core: Core) -> None:
        """Become the outbox of the bus behind *core* (`EventBus` calls this)."""
        if self._attached is not None and self._attached is not core:
            raise ConfigurationError("this SQLAlchemyOutbox already belongs to another EventBus")
        self._attached = core

    @property
    def core(self) -> Core:
        """The bus this outbox belongs to (`attach`); a clear error before it has one."""
        if self._attached is None:
            raise ConfigurationError("this SQLAlchemyOutbox is not given to an EventBus(outbox=)")
        return self._attached

    def join(self, session: object, event: Event, batch: Batch | None) -> None:
        """Add *event*'s rows to *session*'s transaction (``emit(..., session=)``); once it
        commits, the event goes to `Core.after_response` (*batch*'s request, or at once, on
        the loop found here); if it rolls back, it is discarded."""
        sync = sync_session(session)
        core = self.core
        carried = joined(sync)
        if id(self) not in carried.checked:
            self._check_bind(sync)
            carried.checked.add(id(self))
        loop = batch.loop if batch is not None else running_loop()  # None: a sync script,
        # whose event the relay delivers
        check_fits(event.name, destinations := core.destinations(event.name))
        local = loop is not None
        now = time.time()
        due = now + self.lease if local else now
        body = event_json(event)
        rows = [
            self._row(
                event_id=event.id,
                destination=destination,
                name=event.name,
                body=body,
                created=now,
                attempts=0,
                due=due,
                owner=self.owner if local else None,
            )
            for destination in destinations
        ]
        sync.add_all(rows)
        carried.entries.append(Entry(self, event, rows, batch, local, loop))

    def _check_bind(self, session: Session) -> None:
        check_writer(session, sa_inspect(self._row), self._sync_engine, self.tables.events.schema)

    def committed(self, entries: list[Entry]) -> None:
        """*entries*' transaction committed: deliver those this process holds."""
        mine = [entry for entry in entries if entry.local]
        if not mine:
            return
        by_batch: dict[int, list[Entry]] = {}
        for entry in mine:
            by_batch.setdefault(id(entry.batch), []).append(entry)
        for group in by_batch.values():
            events = [entry.event for entry in group]
            deliver = partial(self.deliver, events)
            what = f"outbox {self.name}: delivering {', '.join(e.id for e in events)}"
            if (first := group[0]).batch is None:  # committed in any thread: on its loop
                self.core.spawn(deliver, first.loop, what)
            else:
                self.core.after_response(first.batch, deliver, what)

    def discarded(self, entries: list[Entry], reason: str, level: int = logging.INFO) -> None:
        """*entries*' rows were rolled back: log it (at *level*), and tell ``on_discard``."""
        events = tuple(entry.event for entry in entries)
        logger.log(
            level,
            "discarded %d event(s) because %s: %s",
            len(events),
            reason,
            ", ".join(event.id for event in events),
        )
        hook = self.core.settings.on_discard
        if hook is None:
            return
        loop = next((e.loop for e in entries if e.loop is not None), None)

        async def report() -> None:
            await call_hook(hook, DiscardedEvents(events, reason))

        try:
            self.core.spawn(report, loop)
        except RuntimeError:  # no event loop (a sync script): the hook runs here
            asyncio.run(report())

    # -- delivering -------------------------------------------------------------

    async def deliver(self, events: Sequence[Event]) -> None:
        """Handle and forward *events*, committed or claimed, and settle their rows. Never
        raises: a failure is retried later from the table, and a cancellation (shutdown)
        leaves the rows to the relay, with a log line."""
        await self._deliver([(e, d) for e in events for d in self.core.destinations(e.name)])

    async def _deliver(self, keys: list[tuple[Event, str]]) -> None:
        core = self.core
        groups: dict[str, list[Event]] = {}
        for event, destination in keys:
            groups.setdefault(destination, []).append(event)
        failed: list[tuple[Event, str, str]] = []
        renewing = asyncio.ensure_future(self._renew(keys))
        try:
            results = await asyncio.gather(  # the local handlers beside the forwarders
                *(core.deliver_to(name, chosen) for name, chosen in groups.items())
            )
            for name, outcome in zip(groups, results, strict=True):
                failed += [(e, name, why) for e, why in outcome]
        except (Exception, asyncio.CancelledError) as exc:
            stopped = isinstance(exc, asyncio.CancelledError)
            logger.log(
                logging.WARNING if stopped else logging.ERROR,
                "outbox %s: delivery %s; its events stay in the outbox and are relayed again "
                "once their lease ends: %s",
                self.name,
                "stopped before it finished" if stopped else "failed unexpectedly",
                ", ".join(sorted({event.id for event, _ in keys})),
                exc_info=None if stopped else exc,
            )
            if stopped:
                raise
            return
        finally:
            renewing.cancel()
        await self._settle(keys, failed)

    async def _renew(self, keys: list[tuple[Event, str]]) -> None:
        """While *keys* are being delivered, extend their lease every half lease: a slow
        batch keeps its rows, instead of another relay taking them over meanwhile."""
        await asyncio.sleep(self.lease / 2)  # most deliveries are over by then
        events = self.tables.events
        key = tuple_(events.c.event_id, events.c.destination)
        chosen = [(event.id, destination) for event, destination in keys]
        mine = key.in_(chosen) & (events.c.owner == self.owner)

        def extend(connection: Connection) -> None:
            connection.execute(update(events).where(mine).values(due=time.time() + self.lease))

        while True:
            try:
                await run(self.engine, extend, self.database_timeout, "extending a lease")
            except Exception as exc:
                logger.warning(
                    "outbox %s: could not extend the lease of %d row(s) being delivered "
                    "(%s); another relay may deliver them too",
                    self.name,
                    len(chosen),
                    describe_error(exc),
                )
            await asyncio.sleep(self.lease / 2)

    async def _settle(
        self, keys: list[tuple[Event, str]], failed: list[tuple[Event, str, str]]
    ) -> None:
        failed_keys = {(event.id, destination) for event, destination, _ in failed}
        done = [(e.id, d) for e, d in keys if (e.id, d) not in failed_keys]
        retry = [(e.id, d, why) for e, d, why in failed]
        try:
            spent = await run(
                self.engine,
                lambda c: self._settle_rows(c, done, retry),
                self.database_timeout,
                "settling delivered rows",
            )
        except Exception as exc:  # the rows stay: delivered again later, duplicates at worst
            logger.error(
                "outbox %s: could not record the outcome of %d row(s) (%s); they are "
                "delivered again once their lease ends",
                self.name,
                len(keys),
                describe_error(exc),
            )
            return
        if spent:
            by_id = {event.id: event for event, _ in keys}
            await self._report_dead([(by_id[i], d, why) for i, d, why in spent if i in by_id])

    def _settle_rows(
        self,
        connection: Connection,
        done: list[tuple[str, str]],
        failed: list[tuple[str, str, str]],
    ) -> list[tuple[str, str, str]]:
        """Remove *done* rows; count a round for *failed* ones, dead-lettering those that
        used up their attempts (returned)."""
        events = self.tables.events
        key = tuple_(events.c.event_id, events.c.destination)
        if done:  # built once: making the expression costs more than running it
            connection.execute(self._delete_keys, {"keys": done})
        spent: list[tuple[str, str, str]] = []
        if not failed:
            return spent
        why = {(i, d): reason for i, d, reason in failed}
        rows = connection.execute(  # not those another relay took over meanwhile
            select(events.c.event_id, events.c.destination, events.c.attempts).where(
                key.in_(list(why)) & (events.c.owner == self.owner)
            )
        ).all()
        now = time.time()
        for event_id, destination, attempts in rows:
            attempts += 1
            reason = why[(event_id, destination)]
            where = (events.c.event_id == event_id) & (events.c.destination == destination)
            if attempts >= self.max_attempts:
                self._move_to_dead(connection, where, f"{reason} ({attempts} attempts)", now)
                spent.append((event_id, destination, f"{reason} ({attempts} attempts)"))
                continue
            wait = jittered(exponential(attempts, self.retry_initial, self.retry_max))
            connection.execute(
                update(events)
                .where(where)
                .values(attempts=attempts, due=now + wait, owner=None, error=reason)
            )
        return spent

    def _move_to_dead(self, connection: Connection, where: Any, reason: str, now: float) -> None:
        events, dead = self.tables.events, self.tables.dead
        columns = ["event_id", "destination", "name", "body", "created"]
        for row in connection.execute(select(events).where(where)).mappings():
            values = {c: row[c] for c in columns}
            values["attempts"] = row["attempts"] + 1
            connection.execute(insert(dead).values(**values, error=reason, dead_at=now))
        connection.execute(delete(events).where(where))

    async def _report_dead(self, spent: list[tuple[Event, str, str]]) -> None:
        for event, destination, reason in spent:
            where = "its local handlers" if destination == "" else f"forwarder {destination}"
            logger.error(
                "outbox %s: event %r (id=%s) dead-lettered for %s: %s",
                self.name,
                event.name,
                event.id,
                where,
                reason,
            )
            why = f"the outbox gave up on it for {where}: {reason}"
            await call_hook(self.core.settings.on_discard, DiscardedEvents((event,), why))

    # -- the relay --------------------------------------------------------------

    async def relay_once(self) -> int:
        """Claim the rows that are due (up to ``batch_size``), deliver and settle them.

        Due: never delivered by the process that committed them (it died, or
        had no event loop), or failed before and waited its backoff. Returns how
        many rows were claimed (0: nothing was due).
        """
        unreadable: list[SpooledEvent] = []
        claim = partial(self._claim, unreadable=unreadable)
        claimed = await run(self.engine, claim, self.database_timeout, "claiming due rows")
        for item in unreadable:
            logger.error("outbox %s: %s; moved to the dead table", self.name, item.error)
            reason = item.error or "unreadable"
            await call_hook(self.core.settings.on_discard, DiscardedEvents((item.event,), reason))
        if claimed:
            logger.info("outbox %s: relaying %d row(s)", self.name, len(claimed))
            await self._deliver([(item.event, item.forwarder) for item in claimed])
        return len(claimed) + len(unreadable)

    def _claim(self, connection: Connection, unreadable: list[SpooledEvent]) -> list[SpooledEvent]:
        """Lease up to ``batch_size`` due rows to this process, in one statement.

        PostgreSQL skips the rows another relay is claiming (``FOR UPDATE SKIP
        LOCKED``) instead of waiting for them; SQLite runs one writer at a time, so
        the rows its ``UPDATE`` takes were due when it ran. Either way no two relays
        get the same row.
        """
        events = self.tables.events
        now = time.time()
        key = tuple_(events.c.event_id, events.c.destination)
        due = (
            select(events.c.event_id, events.c.destination)
            .where(events.c.due <= now)
            .order_by(events.c.due)
            .limit(self.batch_size)
        )
        if connection.dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        taken = connection.execute(
            update(events)
            .where(key.in_(due))
            .values(due=now + self.lease, owner=self.owner)
            .returning(
                events.c.destination,
                events.c.event_id,
                events.c.body,
                events.c.created,
                events.c.attempts,
                events.c.error,
            )
        ).all()
        claimed: list[SpooledEvent] = []
        for row in sorted(taken, key=lambda row: row[3]):  # oldest first
            item = spooled_or_stand_in(tuple(row))
            if item.readable:
                claimed.append(item)
                continue
            unreadable.append(item)
            where = (events.c.event_id == row[1]) & (events.c.destination == row[0])
            self._move_to_dead(connection, where, item.error or "unreadable", now)
        return claimed

    async def relay_forever(self) -> None:
        """`relay_once` until nothing is due, then wait ``poll_interval`` (or, with
        ``listen``, until a commit announces new rows); forever."""
        wake = asyncio.Event()
        stop_listening = await self._listen(wake)
        try:
            while True:
                wake.clear()
                # Shutdown waits for the round (bounded by shutdown_timeout) rather than
                # cutting a delivery, or a database call, in the middle.
                round_ = asyncio.ensure_future(self._relay_round())
                try:
                    await asyncio.shield(round_)
                except asyncio.CancelledError:  # bounded: a handler may ignore cancellation
                    if not await finish_within(round_, self.core.settings.shutdown_timeout):
                        logger.error(
                            "outbox %s: a delivery did not stop at shutdown; left running, its "
                            "rows are relayed again once their lease ends",
                            self.name,
                        )
                    raise
                with suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.poll_interval)
        finally:
            if stop_listening is not None:
                await stop_listening()

    async def _relay_round(self) -> None:
        """`relay_once` until nothing is due; a failure is logged, never raised."""
        try:
            while await self.relay_once() > 0:
                pass
        except Exception as exc:  # claimed rows come back when their lease ends
            logger.error(
                "outbox %s: relaying failed, tried again at the next round: %s",
                self.name,
                describe_error(exc),
            )

    def notifies(self) -> bool:
        """Whether commits announce rows due at once to relays (PostgreSQL, ``listen``)."""
        return self.listen and self._sync_engine.dialect.name == "postgresql"

    async def _listen(self, wake: asyncio.Event) -> Callable[[], Awaitable[None]] | None:
        """``LISTEN`` on `channel`, setting *wake* at each notification; how to stop.

        None when the engine cannot (not PostgreSQL through asyncpg): the relay polls.
        """
        engine = self.engine
        if not self.listen or not isinstance(engine, AsyncEngine):
            return None
        if engine.dialect.name != "postgresql" or engine.dialect.driver != "asyncpg":
            return None
        try:
            return await listen(engine, self.channel, wake, self.database_timeout)
        except Exception as exc:
            logger.warning(
                "outbox %s: cannot LISTEN for new rows (%s); polling every %gs",
                self.name,
                describe_error(exc),
                self.poll_interval,
            )
            return None

    async def release(self) -> int:
        """Make the rows this process holds due at once (shutdown); how many."""
        events = self.tables.events

        def work(connection: Connection) -> int:
            result = connection.execute(
                update(events)
                .where(events.c.owner == self.owner)
                .values(owner=None, due=time.time())
            )
            return int(result.rowcount)

        return await run(self.engine, work, self.database_timeout, "releasing its rows")

    # -- inspecting and repairing -----------------------------------------------

    async def pending(self) -> list[SpooledEvent]:
        """The rows waiting (not yet delivered), oldest first."""
        return await self._rows(self.tables.events)

    async def dead(self) -> list[SpooledEvent]:
        """The dead-lettered rows, oldest first."""
        return await self._rows(self.tables.dead)

    async def _rows(self, table: Table) -> list[SpooledEvent]:
        query = select(
            table.c.destination,
            table.c.event_id,
            table.c.body,
            table.c.created,
            table.c.attempts,
            table.c.error,
        ).order_by(table.c.created)
        rows = await run(self.engine, lambda c: c.execute(query).all())
        return [spooled_or_stand_in(tuple(row)) for row in rows]

    async def replay(self, ids: Iterable[str] | None = None) -> int:
        """Move dead-lettered rows (all, or those of events *ids*) back, due now; how many."""
        events, dead = self.tables.events, self.tables.dead
        chosen = None if ids is None else list(ids)

        def work(connection: Connection) -> int:
            query = select(dead)
            if chosen is not None:
                query = query.where(dead.c.event_id.in_(chosen))
            rows = connection.execute(query).mappings().all()
            now = time.time()
            for row in rows:
                values = {c: row[c] for c in ("event_id", "destination", "name", "body")}
                connection.execute(
                    insert(events).values(
                        **values, created=row["created"], attempts=0, due=now, error=None
                    )
                )
                key = (dead.c.event_id == row["event_id"]) & (
                    dead.c.destination == row["destination"]
                )
                connection.execute(delete(dead).where(key))
            return len(rows)

        return await run(self.engine, work)

    async def purge(self, ids: Iterable[str] | None = None) -> int:
        """Delete dead-lettered rows (all, or those of events *ids*); how many."""
        dead, parts = self.tables.dead, id_chunks(None if ids is None else list(ids))
        statements = [
            delete(dead) if p is None else delete(dead).where(dead.c.event_id.in_(p)) for p in parts
        ]
        return await run(self.engine, lambda c: sum(int(c.execute(s).rowcount) for s in statements))


def _row_class(table: Table) -> type:
    """A class mapped to *table* (on a registry of its own): `join` adds its instances to
    the application's session, so that they are written in its unit of work."""

    def __init__(self: Any, **values: Any) -> None:
        for key, value in values.items():
            setattr(self, key, value)

    cls = type("OutboxRow", (), {"__init__": __init__, "__module__": __name__})
    registry().map_imperatively(cls, table)
    return cls
