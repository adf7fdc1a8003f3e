"""Joining a SQLAlchemy session's transaction: the events each carries, and what its
commit, rollback or close does with them (the session's own events)."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import event as sa_event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, SessionTransaction

from fastapi_eventbus._events import Event
from fastapi_eventbus._hooks import logger

from ._db import held_connection, open_savepoints

if TYPE_CHECKING:
    from fastapi_eventbus._batch import Batch

    from ._outbox import SQLAlchemyOutbox

_JOINED = "fastapi_eventbus.outbox"
"""Key of a session's ``info`` holding the events it carries (`Joined`)."""


@dataclass(eq=False)
class Entry:
    """An event emitted with ``session=``: its rows, and where to hand it after commit."""

    outbox: SQLAlchemyOutbox
    event: Event
    rows: list[Any]
    batch: Batch | None
    local: bool
    """Whether this process delivers it once committed (False: the relay does)."""
    loop: asyncio.AbstractEventLoop | None = None
    """The event loop it was emitted on: its delivery runs there, whatever thread commits."""
    savepoints: frozenset[str] | None = None
    """The connection's savepoints open when its rows were flushed (None: not flushed):
    rolling back any of them takes the rows back; one begun later does not."""
    lost: str | None = None
    """Why its rows are gone, if the connection of a joined session rolled them back."""
    kept: bool = False
    """Whether the connection of a joined session committed its rows."""
    handed: bool = False
    """Whether its session is done with it: the connection's outcome reports it."""


@dataclass(eq=False)
class Joined:
    """The events of one session's current transaction."""

    entries: list[Entry] = field(default_factory=list)
    checked: set[int] = field(default_factory=set)
    """The outboxes (their ids) that found this session writes to their database."""


def joined(session: Session) -> Joined:
    """The events of *session*'s transaction (made the first time)."""
    found: Joined | None = session.info.get(_JOINED)
    if found is None:
        found = session.info[_JOINED] = Joined()
        weakref.finalize(session, _collected, found)  # holds the events, not the session
    return found


def _collected(joined: Joined) -> None:
    """A session carrying events was garbage-collected with no commit, rollback or close
    (no session event fires then): its database rolls the transaction back."""
    reason = "the session that wrote them was garbage-collected without a commit or close"
    _discard(joined, reason, logging.WARNING)  # a bug, unlike a rollback


def _discard(joined: Joined, reason: str, level: int = logging.INFO) -> None:
    """*joined*'s events will never commit: each outbox reports its own, with *reason*."""
    entries, joined.entries = joined.entries, []
    for outbox, group in _by_outbox(entries):
        outbox.discarded(group, reason, level)


def listen_to_sessions() -> None:
    """Have every `Session` tell its commits, rollbacks and closes (once per process).

    On the class, not on each session: listening on an instance costs more than a
    request. A session that carries no events pays one dictionary lookup per event.
    """
    global _listening
    if _listening:
        return
    sa_event.listen(Session, "after_flush_postexec", _after_flush)
    sa_event.listen(Session, "before_commit", _before_commit)
    sa_event.listen(Session, "after_commit", _after_commit)
    sa_event.listen(Session, "after_transaction_end", _after_transaction_end)
    _listening = True


_listening = False

_LEASE_SLACK = 1.0
"""Seconds of its lease a row may have lost between ``emit`` and the commit before the
commit renews it (an ``UPDATE`` if the row was flushed already)."""


def _after_flush(session: Session, context: object) -> None:
    """Note where the rows just flushed are: the connection's savepoints open now (those
    that would take them back); a joined connection's outcome, from now on, is theirs."""
    joined = session.info.get(_JOINED)
    if joined is None:
        return
    for entry in joined.entries:
        if entry.savepoints is None and sa_inspect(entry.rows[0]).has_identity:
            mapper = sa_inspect(entry.rows[0]).mapper
            connection = held_connection(session, mapper)
            entry.savepoints = frozenset() if connection is None else open_savepoints(connection)
            if connection is not None and isinstance(session.get_bind(mapper), Connection):
                _pending_on(connection).entries.append(entry)


def _before_commit(session: Session) -> None:
    """Start this process's lease on the rows it delivers (at the commit, not at ``emit``:
    a transaction longer than the lease would commit them due, for a relay to deliver
    too); announce the rows no process holds (due at once) to the relays listening."""
    if session.in_nested_transaction():
        return
    joined = session.info.get(_JOINED)
    if joined is None:
        return
    now = time.time()
    for entry in joined.entries:
        if entry.local and (due := now + entry.outbox.lease) - entry.rows[0].due > _LEASE_SLACK:
            for row in entry.rows:
                row.due = due
    for outbox, group in _by_outbox([e for e in joined.entries if not e.local]):
        if outbox.notifies() and group:
            session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": outbox.channel})


def _after_commit(session: Session) -> None:
    """A session's transaction (or one of its savepoints) committed."""
    if session.in_nested_transaction():  # a savepoint: the transaction goes on
        return
    joined = session.info.get(_JOINED)
    if joined is None or not joined.entries:
        return
    entries, joined.entries = joined.entries, []
    bind = session.bind
    if isinstance(bind, Connection) and bind.in_transaction():  # Session(bind=connection)
        why = "the savepoint that wrote them rolled back"  # joined it: nothing committed yet
        _when_the_outer_transaction_ends(entries, why)
        return
    _hand_over(entries)


def _hand_over(entries: list[Entry]) -> None:
    """*entries* were committed: to their outboxes (those whose rows are gone: discarded)."""
    kept, rolled_back, deleted = [], [], []
    for entry in entries:  # a rolled-back savepoint's rows have no identity; a closed
        states = [sa_inspect(row) for row in entry.rows]  # session's are only detached
        if any(state.was_deleted for state in states):
            deleted.append(entry)
        elif all(state.has_identity for state in states):
            kept.append(entry)
        else:
            rolled_back.append(entry)
    for outbox, group in _by_outbox(kept):
        try:
            outbox.committed(group)
        except Exception:  # the rows are committed: the relay delivers them after the lease
            logger.exception("outbox %s: handing committed events to the bus failed", outbox.name)
    _discard(Joined(rolled_back), "the savepoint that wrote them rolled back")
    _discard(Joined(deleted), "their rows were deleted (session.delete) before the commit")


def _when_the_outer_transaction_ends(entries: list[Entry], unflushed: str) -> None:
    """A joined session is done with *entries* while its connection's transaction goes
    on: the rows it flushed follow that transaction (its commit hands them over; its
    rollback, or that of a savepoint open when they were flushed, discards them); those
    it never flushed are discarded (*unflushed* says why)."""
    for entry in entries:
        entry.handed = True
    _hand_over([e for e in entries if e.kept])
    never = [e for e in entries if e.savepoints is None and not e.kept and e.lost is None]
    _discard(Joined(never), unflushed)
    for why in {e.lost for e in entries if e.lost is not None}:
        _discard(Joined([e for e in entries if e.lost == why]), why)
    # the others wait, in `_pending_on(connection)`, for its commit or rollback


_PENDING = "fastapi_eventbus.outbox.pending"
"""Key of a connection's ``info`` holding the rows joined sessions flushed on it."""


@dataclass(eq=False)
class _Pending:
    """The events whose rows joined sessions flushed on one connection, waiting for its
    commit or rollback; one set of listeners on that connection, whatever their number."""

    connection: weakref.ref[Connection]
    entries: list[Entry] = field(default_factory=list)

    def settle(self, entries: list[Entry], lost: str | None) -> None:
        """*entries*' rows were committed (*lost* None) or rolled back (*lost* says why)."""
        if not entries:
            return
        self.entries = [e for e in self.entries if e not in entries]
        for entry in entries:
            entry.kept, entry.lost = lost is None, lost
        handed = [e for e in entries if e.handed]  # the others: their session reports them
        if lost is None:
            _hand_over(handed)
        else:
            _discard(Joined(handed), lost)

    def committed(self, connection: Connection) -> None:
        self.settle(self.entries, None)

    def rolled_back(self, connection: Connection) -> None:
        self.settle(self.entries, "the outer transaction that wrote them rolled back")

    def rolled_back_to(self, connection: Connection, name: str, context: object) -> None:
        held = [e for e in self.entries if e.savepoints is not None and name in e.savepoints]
        self.settle(held, "the savepoint of the outer transaction that wrote them rolled back")


def _pending_on(connection: Connection) -> _Pending:
    """The events pending on *connection* (its listeners are added the first time)."""
    found: _Pending | None = connection.info.get(_PENDING)
    if found is None or found.connection() is not connection:  # the DBAPI connection's
        found = connection.info[_PENDING] = _Pending(weakref.ref(connection))  # info: a
        sa_event.listen(connection, "commit", found.committed)  # new Connection of it
        sa_event.listen(connection, "rollback", found.rolled_back)  # listens anew
        sa_event.listen(connection, "rollback_savepoint", found.rolled_back_to)
    return found


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    """A transaction ended: if it is the outermost and did not commit, it rolled back,
    unless the session joined a connection's transaction that goes on (closed without a
    commit, in ``rollback_only`` mode): what it flushed then follows that transaction."""
    if transaction.parent is not None:
        return
    joined = session.info.get(_JOINED)
    if joined is None or not joined.entries:
        return
    why = "the transaction that wrote them rolled back"
    bind = session.bind
    if isinstance(bind, Connection) and bind.in_transaction():
        entries, joined.entries = joined.entries, []
        _when_the_outer_transaction_ends(entries, why)
        return
    _discard(joined, why)


def _by_outbox(entries: list[Entry]) -> list[tuple[SQLAlchemyOutbox, list[Entry]]]:
    groups: dict[int, tuple[SQLAlchemyOutbox, list[Entry]]] = {}
    for entry in entries:
        groups.setdefault(id(entry.outbox), (entry.outbox, []))[1].append(entry)
    return list(groups.values())
