"""`SQLAlchemyInbox`: which handlers already succeeded for an event, so that a redelivery
(a worker's, the outbox relay's, ``handle()``) runs only the others."""

from __future__ import annotations

import contextvars
import hashlib
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, delete, insert, select
from sqlalchemy import event as sa_event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from fastapi_eventbus._di import CURRENT_EVENT
from fastapi_eventbus._events import Event
from fastapi_eventbus._settings import check_seconds
from fastapi_eventbus.wire import DEFAULT_SOURCE_PREFIX

from ._db import autocommits, checked_engine, database_of, run, sync_engine
from ._tables import ID_LENGTH, TEXT_LENGTH, inbox_table


@dataclass(eq=False)
class _Call:
    """The handler call running in this context, whose session's commit records it."""

    inbox: SQLAlchemyInbox
    handler: str
    key: str
    """The event's `event_key`."""
    recorded: bool = False
    """Whether a commit of the handler's session wrote its row (once that commit succeeded)."""
    committing: object = None
    """The session whose commit is writing the row now (`_before_commit`)."""
    running: bool = True
    """False once the call is over: a later commit in its context (a task the handler
    started, an ``on_error`` hook) does not record it."""

    def end(self) -> bool:
        """The call is over: whether a commit in it recorded the handler as succeeded."""
        self.running = False
        return self.recorded


def event_key(event: Event) -> str:
    """What the inbox records *event* by: its id; with its source too (64 hex digits of
    both) when another producer's (an id is unique only with its source, CloudEvents'
    rule), or when the id is longer than the column."""
    source = event.source
    if (source is None or source.startswith(DEFAULT_SOURCE_PREFIX)) and len(event.id) <= ID_LENGTH:
        return event.id  # this library's: one per event, whichever host sends it
    digest = hashlib.sha256(f"{source}\n{event.id}".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "fastapi_eventbus_inbox_call", default=None
)


class SQLAlchemyInbox:
    """Records each (handler, event id) that succeeded, in the application's database.

    Pass it as ``EventBus(inbox=SQLAlchemyInbox(engine))``. When an event is
    delivered again (by a worker after a failure or a lost acknowledgement, by the
    outbox relay after a crash, or to ``bus.handle()``), the handlers that
    already succeeded for it are skipped: only those that failed, or never ran,
    run again.

    When a handler commits a SQLAlchemy session on the inbox's database (one it
    gets from a dependency, say), its inbox row is written in that same
    transaction: its database effects and the record of its success commit
    together, so they happen exactly once. Otherwise the row is written right
    after the handler returns, in a transaction of its own: a crash between the
    two runs the handler again (at-least-once). Events emitted in-process
    without an outbox are never redelivered, so the inbox is not consulted for
    them.

    Handlers are told apart by their qualified name (``module.function``):
    renaming one makes it a new handler.

    Args:
        engine: The application's SQLAlchemy 2.0 engine, async or sync.
        metadata: The `MetaData` to define the table in (for Alembic); a new one
            by default.
        table_prefix: The start of the table's name (``eventbus_inbox``).
        database_timeout: Seconds reading and writing a delivery's records may take:
            past it, the event's handlers all run (reading) or a redelivery runs the
            handler again (writing), with a ``WARNING``, rather than the delivery
            waiting forever for a database that stopped answering.
    """

    handler_name_length = TEXT_LENGTH
    """The longest handler name the inbox's table holds: a bus with it refuses longer ones
    at ``@bus.on``."""

    def __init__(
        self,
        engine: AsyncEngine | Engine,
        *,
        metadata: MetaData | None = None,
        table_prefix: str = "eventbus_",
        database_timeout: float = 30.0,
    ) -> None:
        self.engine = checked_engine(engine, "SQLAlchemyInbox")
        self.database_timeout = (
            check_seconds("database_timeout", database_timeout, positive=True) or 0.0
        )
        self.metadata = metadata if metadata is not None else MetaData()
        """The `MetaData` holding the inbox's table (give it to Alembic)."""
        name = f"{table_prefix}inbox"
        existing = self.metadata.tables.get(name)
        self.table = existing if existing is not None else inbox_table(self.metadata, table_prefix)
        self._sync_engine = sync_engine(self.engine)
        _listen_once()

    def __repr__(self) -> str:
        return f"<SQLAlchemyInbox {self._sync_engine.url.render_as_string(hide_password=True)}>"

    async def create_tables(self) -> None:
        """Create the inbox's table if it does not exist (or use `metadata` with Alembic)."""
        await run(self.engine, lambda c: self.metadata.create_all(c, tables=[self.table]))

    async def handled(self, event: Event) -> Collection[str]:
        """The names of the handlers that already succeeded for *event*."""
        query = select(self.table.c.handler).where(self.table.c.event_id == event_key(event))
        rows = await run(
            self.engine,
            lambda c: c.execute(query).scalars().all(),
            self.database_timeout,
            "reading the inbox",
        )
        return set(rows)

    def calling(self, handler: str, event: Event) -> Callable[[], bool]:
        """*handler* is about to run for *event*: a commit of its session records it, until
        the call is over (the function returned, which says whether one did)."""
        call = _Call(self, handler, event_key(event))
        _CALL.set(call)
        return call.end

    async def record(self, handler: str, event: Event) -> None:
        """*handler* succeeded for *event*: record it, unless its own commit did."""
        call = _CALL.get()
        _CALL.set(None)
        if call is not None and call.recorded and call.handler == handler:
            return
        values = {"handler": handler, "event_id": event_key(event), "handled_at": time.time()}

        def work(connection: Connection) -> None:
            try:
                with connection.begin_nested():
                    connection.execute(insert(self.table).values(**values))
            except IntegrityError:  # another delivery of the event recorded it first
                pass

        await run(self.engine, work, self.database_timeout, "recording a handler's success")

    async def forget(self, older_than: float) -> int:
        """Delete the records of successes more than *older_than* seconds old; how many.

        An event redelivered after its record is gone runs all its handlers again.
        """
        cutoff = time.time() - older_than
        statement = delete(self.table).where(self.table.c.handled_at < cutoff)
        return await run(self.engine, lambda c: int(c.execute(statement).rowcount))

    def record_in(self, session: Session, call: _Call) -> None:
        """Write *call*'s row in *session*'s transaction, if it is on this database."""
        try:
            bind: Any = session.get_bind()
        except Exception:  # no single bind to tell: recorded after the handler returns
            return
        if database_of(bind.engine) != database_of(self._sync_engine):
            return
        connection = session.connection()  # its own isolation level, if it was given one
        if autocommits(connection):
            return  # AUTOCOMMIT: the row would stay if the handler then failed
        call.committing = session  # recorded once that commit succeeds (`_after_commit`);
        try:  # meanwhile, another session's commit (at the same time) writes no second row
            connection.execute(
                insert(self.table).values(
                    handler=call.handler, event_id=call.key, handled_at=time.time()
                )
            )
        except BaseException:
            call.committing = None
            raise


def _before_commit(session: Session) -> None:
    """Any session commits: inside an inboxed handler call, its success commits with it."""
    call = _CALL.get()
    if call is None or call.recorded or call.committing is not None or not call.running:
        return
    if session.in_nested_transaction():
        return
    handling = CURRENT_EVENT.get(None)
    if handling is None or event_key(handling[0]) != call.key:  # that dispatch is over
        return
    call.inbox.record_in(session, call)


def _after_commit(session: Session) -> None:
    """A commit succeeded: if it wrote a handler call's row, the call is recorded."""
    if (call := _CALL.get()) is not None and call.committing is session:
        call.recorded, call.committing = True, None


def _after_rollback(session: Session) -> None:
    """A commit failed (or the session rolled back): the row it was writing is gone."""
    if (call := _CALL.get()) is not None and call.committing is session:
        call.committing = None


_listening = False


def _listen_once() -> None:
    global _listening
    if not _listening:
        sa_event.listen(Session, "before_commit", _before_commit)
        sa_event.listen(Session, "after_commit", _after_commit)
        sa_event.listen(Session, "after_rollback", _after_rollback)
        _listening = True
