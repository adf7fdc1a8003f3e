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
    sa_event.listen(Session, "before_commit", _before_commit)
    sa_event.listen(Session, "after_commit", _after_commit)
    sa_event.listen(Session, "after_transaction_end", _after_transaction_end)
    _listening = True


_listening = False

_LEASE_SLACK = 1.0
"""Seconds of its lease a row may have lost between ``emit`` and the commit before the
commit renews it (an ``UPDATE`` if the row was flushed already)."""


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
        _when_the_outer_transaction_ends(bind, entries)  # joined it: nothing committed yet
        return
    _hand_over(entries)


def _hand_over(entries: list[Entry]) -> None:
    """*entries* were committed: to their outboxes (those whose savepoint rolled back: gone)."""
    kept = [e for e in entries if all(sa_inspect(row).has_identity for row in e.rows)]
    # a rolled-back savepoint's rows have no identity; a closed session's are only detached
    gone = [e for e in entries if e not in kept]
    for outbox, group in _by_outbox(kept):
        try:
            outbox.committed(group)
        except Exception:  # the rows are committed: the relay delivers them after the lease
            logger.exception("outbox %s: handing committed events to the bus failed", outbox.name)
    for outbox, group in _by_outbox(gone):
        outbox.discarded(group, "the savepoint that wrote them rolled back")


def _when_the_outer_transaction_ends(connection: Connection, entries: list[Entry]) -> None:
    """The session committed into a transaction it did not begin: *connection*'s own
    commit hands *entries* over; its rollback discards them, and so does rolling back a
    savepoint of it that was open at the session's commit (it holds their rows)."""
    over = False
    later = 0  # savepoints begun after the session's commit and still open (they nest)

    def begun(conn: Connection, name: str | None) -> None:
        nonlocal later
        later += 1

    def released(conn: Connection, name: str, context: object) -> None:
        nonlocal later
        later = max(later - 1, 0)

    def rolled_back_to(conn: Connection, name: str, context: object) -> None:
        nonlocal over, later
        if later:
            later -= 1
        elif not over:  # one that was open at the session's commit: it held the rows
            over = True
            why = "the savepoint of the outer transaction that wrote them rolled back"
            _discard(Joined(entries), why)

    def committed(conn: Connection) -> None:
        nonlocal over
        if not over:
            over = True
            _hand_over(entries)

    def rolled_back(conn: Connection) -> None:
        nonlocal over
        if not over:
            over = True
            _discard(Joined(entries), "the outer transaction that wrote them rolled back")

    sa_event.listen(connection, "commit", committed)
    sa_event.listen(connection, "rollback", rolled_back)
    if connection.in_nested_transaction():
        sa_event.listen(connection, "savepoint", begun)
        sa_event.listen(connection, "release_savepoint", released)
        sa_event.listen(connection, "rollback_savepoint", rolled_back_to)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    """A transaction ended: if it is the outermost and did not commit, it rolled back."""
    if transaction.parent is not None:
        return
    joined = session.info.get(_JOINED)
    if joined is None or not joined.entries:
        return
    _discard(joined, "the transaction that wrote them rolled back")


def _by_outbox(entries: list[Entry]) -> list[tuple[SQLAlchemyOutbox, list[Entry]]]:
    groups: dict[int, tuple[SQLAlchemyOutbox, list[Entry]]] = {}
    for entry in entries:
        groups.setdefault(id(entry.outbox), (entry.outbox, []))[1].append(entry)
    return list(groups.values())
