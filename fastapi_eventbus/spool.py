"""A durable spool for forwarded events: one SQLite file, from the standard library.

```python
from fastapi_eventbus import EventBus

bus = EventBus(spool="events.sqlite3")  # a path on a persistent volume
```

With a spool, every event that matches a forwarder is written to the spool
*when it is emitted* (before the response is sent), and removed once its broker
acknowledged it. What is still there after a crash, a broker outage or a
shutdown that ran out of time is sent again: at start-up, and every
``resend_interval`` seconds while the application runs, with backoff. After
``max_attempts`` failed rounds (or at once, if the broker refused the event for
good) an event moves to the dead-letter table, where `Spool.dead` lists it and
`Spool.replay` puts it back in line. Delivery becomes at-least-once: deduplicate
on ``event.id``.

Several processes of one host (uvicorn workers, worker processes, the
``fastapi-eventbus spool`` command, the containers of a pod) may share one file:
SQLite serialises writers, and each row says which process is sending it. A row
whose process died (on this host, in this PID namespace) is sent again at once;
otherwise when its lease runs out. Only on one host: SQLite's write-ahead log
needs memory shared by its processes, which a network file system (NFS, SMB,
EFS) does not give; give each host its own spool.

Events are stored as JSON (the `Event` model's own serialisation): no pickle.
The file, and SQLite's ``-wal`` and ``-shm`` files beside it, are created
readable by their owner only (mode 0600): they hold payloads in clear. SQLite's
write-ahead log is checkpointed often and kept small, so that a spool on a small
volume does not fill it, and emits work again once space returns.

A row that cannot be read back as an `Event` (damaged, or written by another
version) never holds up the others: it is moved to the dead-lettered events,
logged at ERROR with its id, and shown by `Spool.dead` with ``readable=False``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path

from ._events import Event, event_json
from ._hooks import logger
from ._retry import exponential
from ._settings import check_int, check_seconds
from ._spool_io import (
    create_private,
    disk_full,
    filtered_query,
    id_chunks,
    new_owner,
    owner_gone,
    spooled_or_stand_in,
    this_host,
    warn_if_public,
    where_clause,
)
from .exceptions import ConfigurationError, SpoolError
from .storage import Settled, SpooledEvent

__all__ = ["Spool", "SpoolCounts", "SpooledEvent"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    forwarder   TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    event       TEXT NOT NULL,
    created     REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    owner       TEXT NOT NULL,
    lease_until REAL NOT NULL,
    last_error  TEXT,
    PRIMARY KEY (forwarder, event_id)
);
CREATE INDEX IF NOT EXISTS pending_lease ON pending (lease_until);
CREATE TABLE IF NOT EXISTS dead (
    forwarder  TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    event      TEXT NOT NULL,
    created    REAL NOT NULL,
    attempts   INTEGER NOT NULL,
    reason     TEXT NOT NULL,
    failed_at  REAL NOT NULL,
    PRIMARY KEY (forwarder, event_id)
);
"""

_WAL_CHECKPOINT_PAGES = 100
"""Pages (4 KiB each) in the write-ahead log before SQLite copies them into the database
and starts the log over. SQLite's default, 1,000 pages (4 MB), filled a small volume
before the first checkpoint, and then every write failed for good."""
_WAL_SIZE_LIMIT = 512 * 1024
"""Bytes SQLite leaves the write-ahead log file at when it starts it over (it is never
shrunk otherwise: one large transaction would keep its size)."""


@dataclass(frozen=True, slots=True)
class SpoolCounts:
    """How many events a spool holds."""

    pending: int
    """Waiting to be sent (or being sent)."""
    dead: int
    """Dead-lettered: they wait for `Spool.replay` or `Spool.purge`."""


class Spool:
    """Forwarded events on disk until their broker has them (see the module docs).

    Args:
        path: The SQLite file, created if missing (readable by its owner only, 0600,
            like the ``-wal`` and ``-shm`` files SQLite makes beside it). Its
            directory must exist, on a file system of this host: processes of
            one host may share the file, never several hosts (see the module docs).
        lease: Seconds a process may keep rows it is sending before another
            process takes them over (when the owner's death cannot be seen:
            another PID namespace). Longer than a forwarder's longest send, its
            ``Retry.total_timeout`` plus ``send_timeout``: ``bus.forward``
            refuses a forwarder whose send may take longer.
        resend_interval: Seconds between looks for events to send again.
        retry_delay: Wait after a failed round, doubled per failed round, up to
            ``max_retry_delay``.
        max_retry_delay: The longest wait between rounds.
        max_attempts: Failed rounds before an event is dead-lettered.
        busy_timeout: Seconds to wait for another process's write lock before
            `SpoolError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease: float = 120.0,
        resend_interval: float = 1.0,
        retry_delay: float = 2.0,
        max_retry_delay: float = 300.0,
        max_attempts: int = 20,
        busy_timeout: float = 30.0,
    ) -> None:
        for name, value in (
            ("lease", lease),
            ("resend_interval", resend_interval),
            ("retry_delay", retry_delay),
            ("max_retry_delay", max_retry_delay),
        ):
            check_seconds(f"Spool {name}", value, positive=True)
        # SQLite counts it in milliseconds in a C int: past that, it would not wait at all.
        check_seconds("Spool busy_timeout", busy_timeout, positive=True, below=2_147_483)
        check_int("Spool max_attempts", max_attempts, 1)
        if not isinstance(path, str | os.PathLike) or not str(path):
            raise ConfigurationError(f"Spool path must be a file path, got {path!r}")
        self.path = Path(path)
        """The SQLite file."""
        self.lease = float(lease)
        """Seconds a process may keep rows it is sending before another takes them over."""
        self.resend_interval = float(resend_interval)
        """Seconds between looks for events to send again."""
        self.retry_delay = float(retry_delay)
        """The wait after a first failed round, doubled per failed round."""
        self.max_retry_delay = float(max_retry_delay)
        """The longest wait between rounds."""
        self.max_attempts = max_attempts
        """Failed rounds before an event is dead-lettered."""
        self.busy_timeout = float(busy_timeout)
        """Seconds to wait for another process's write lock."""
        self.owner = new_owner(os.getpid())
        """This process's mark on the rows it is sending."""
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._connect()  # fail here, in the constructor, on an unusable path

    def __repr__(self) -> str:
        return f"<Spool {str(self.path)!r}>"

    # -- connection ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        """This process's connection, opened (and the file created, 0600) on first use
        and again after a fork: a connection must not cross into a child process."""
        if self._db is not None and self._pid == os.getpid():
            return self._db
        if self._pid != os.getpid():  # forked (uvicorn --workers): a connection of our own
            self._pid = os.getpid()
            self.owner = new_owner(self._pid)
            self._lock = threading.Lock()
        create_private(self.path)
        try:
            db = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,  # explicit transactions below
                check_same_thread=False,  # guarded by self._lock
            )
            db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives the process being killed (SIGKILL, OOM);
            # only an OS crash or power loss may lose the last commits.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA wal_autocheckpoint={_WAL_CHECKPOINT_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open the spool {self.path}: {exc}") from exc
        warn_if_public(self.path)
        self._db = db
        return db

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), as `SpoolError` if it fails."""
        with self._lock:
            try:
                db = self._connect()
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise SpoolError(f"spool {self.path}: cannot {what}: {exc}") from exc
            try:
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:  # also after a failed COMMIT (disk full)
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    if disk_full(exc):
                        self._shrink_wal(db)
                    raise SpoolError(f"spool {self.path}: cannot {what}: {exc}") from exc
                raise

    def _shrink_wal(self, db: sqlite3.Connection) -> None:
        """After a write found the volume full, copy the write-ahead log into the database
        and truncate it, so that the space it held is free for the next write. Without
        waiting: if another process is using the log, the next failure tries again."""
        with suppress(sqlite3.Error):
            db.execute("PRAGMA busy_timeout = 0")
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        """The rows *sql* selects, outside a write transaction; as `SpoolError` if it fails."""
        with self._lock:
            try:
                return self._connect().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise SpoolError(f"spool {self.path}: cannot read: {exc}") from exc

    def close(self) -> None:
        """Close this process's connection (the file stays)."""
        with self._lock:
            db, self._db = self._db, None
            if db is not None and self._pid == os.getpid():
                db.close()

    # -- what the bus calls -------------------------------------------------------

    def add(self, entries: Iterable[tuple[str, Event]]) -> None:
        """Spool *entries* (forwarder name, event), leased to this process. One commit."""
        now = time.time()
        entries = list(entries)
        texts = {event.id: event_json(event) for _, event in entries}  # once per event
        rows = [
            (forwarder, event.id, texts[event.id], now, self.owner, now + self.lease)
            for forwarder, event in entries
        ]
        if not rows:
            return
        with self._transaction("spool events") as db:
            db.executemany(
                "INSERT OR IGNORE INTO pending"
                " (forwarder, event_id, event, created, owner, lease_until)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    def sent(self, forwarder: str, events: Iterable[Event]) -> None:
        """The broker has *events*: remove them."""
        ids = [(forwarder, event.id) for event in events]
        if ids:
            with self._transaction("remove sent events") as db:
                db.executemany("DELETE FROM pending WHERE forwarder = ? AND event_id = ?", ids)

    @staticmethod
    def check_file(path: str | os.PathLike[str]) -> None:
        """Check that the file at *path* is a spool, without changing it.

        `Spool` makes a spool of any SQLite file it opens (and switches it to
        WAL); tools that only read, such as ``fastapi-eventbus spool``, check first.

        Raises:
            ConfigurationError: The file cannot be opened, is not an SQLite
                database, or lacks the spool's tables.
            SpoolError: It cannot be read now (locked, unreadable).
        """
        location = Path(path)
        try:
            db = sqlite3.connect(f"{location.resolve().as_uri()}?mode=rw", uri=True)
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot open {location}: {exc}") from exc
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        except sqlite3.OperationalError as exc:
            raise SpoolError(f"cannot read {location}: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # "file is not a database"
            raise ConfigurationError(
                f"{location} is not a spool: not an SQLite database ({exc})"
            ) from exc
        finally:
            db.close()
        if not {"pending", "dead"} <= tables:
            raise ConfigurationError(
                f"{location} is not a spool: an SQLite database without the spool's tables"
            )

    @property
    def name(self) -> str:
        """The file's path, for log lines."""
        return str(self.path)

    def settle(
        self,
        forwarder: str,
        events: Sequence[Event],
        dead: Sequence[tuple[Event, str]] = (),
        unsent: Sequence[Event] = (),
        error: str = "",
    ) -> Settled:
        """Record how a send of *events* through *forwarder* went (see `Storage.settle`).

        *dead* leave for the dead-letter table with their reasons; *unsent* count
        a failed round, and those that used up ``max_attempts`` are moved to the
        dead-letter table too, and returned (the caller reports them); the rest
        were sent and leave the spool.
        """
        not_sent = {event.id for event, _ in dead} | {event.id for event in unsent}
        self.sent(forwarder, [event for event in events if event.id not in not_sent])
        by_reason: dict[str, list[Event]] = {}
        for event, reason in dead:
            by_reason.setdefault(reason, []).append(event)
        for reason, buried in by_reason.items():
            self.bury(forwarder, buried, reason)
        if not unsent:
            return Settled()
        spent = self.failed(forwarder, unsent, error)
        if not spent:
            return Settled()
        reason = f"gave up after {self.max_attempts} rounds: {error}"
        self.bury(forwarder, spent, reason)
        return Settled(tuple(spent), reason)

    def forget(self, events: Iterable[Event]) -> None:
        """Remove *events* for every forwarder: they were discarded, never to be sent."""
        ids = [(event.id,) for event in events]
        if ids:
            with self._transaction("remove discarded events") as db:
                db.executemany("DELETE FROM pending WHERE event_id = ?", ids)

    def failed(self, forwarder: str, events: Iterable[Event], error: str) -> list[Event]:
        """A round failed for *events*: count it, and wait before the next one.

        Returns the events that have now used up ``max_attempts`` (still pending:
        the caller dead-letters them with `bury`).
        """
        now = time.time()
        spent: list[Event] = []
        with self._transaction("record a failed round") as db:
            for event in events:
                row = db.execute(
                    "SELECT attempts FROM pending WHERE forwarder = ? AND event_id = ?",
                    (forwarder, event.id),
                ).fetchone()
                if row is None:
                    continue
                attempts = int(row[0]) + 1
                if attempts >= self.max_attempts:
                    spent.append(event)
                delay = exponential(attempts, self.retry_delay, self.max_retry_delay)
                db.execute(
                    "UPDATE pending SET attempts = ?, lease_until = ?, last_error = ?"
                    " WHERE forwarder = ? AND event_id = ?",
                    (attempts, now + delay, error[:2000], forwarder, event.id),
                )
        return spent

    def bury(self, forwarder: str, events: Iterable[Event], reason: str) -> None:
        """Move *events* to the dead-letter table."""
        now = time.time()
        with self._transaction("dead-letter events") as db:
            for event in events:
                db.execute(
                    "INSERT OR REPLACE INTO dead"
                    " (forwarder, event_id, event, created, attempts, reason, failed_at)"
                    " SELECT forwarder, event_id, event, created, attempts, ?, ?"
                    " FROM pending WHERE forwarder = ? AND event_id = ?",
                    (reason[:2000], now, forwarder, event.id),
                )
                db.execute(
                    "DELETE FROM pending WHERE forwarder = ? AND event_id = ?",
                    (forwarder, event.id),
                )

    def claim(
        self, limit: int = 500, *, unreadable: list[SpooledEvent] | None = None
    ) -> list[SpooledEvent]:
        """Lease up to *limit* events that are due to be sent again, oldest first.

        Due: their lease ran out (their round failed and its wait is over, or
        their process stopped answering), or their process died on this host.

        A due row that does not hold an `Event` (whatever fails in reading it,
        JSON nested too deep included) is never sendable: it is moved to the
        dead-lettered events in the same transaction, logged at ERROR with its
        id, and appended to *unreadable* (``readable=False``), so that the
        caller can report it too. The other rows are claimed as usual.
        """
        now = time.time()
        bad: list[SpooledEvent] = []
        with self._transaction("claim events") as db:
            self._free_dead_owners(db)
            rows = db.execute(
                "SELECT forwarder, event_id, event, created, attempts, last_error FROM pending"
                " WHERE lease_until <= ? ORDER BY created LIMIT ?",
                (now, limit),
            ).fetchall()
            claimed: list[SpooledEvent] = []
            for row in rows:
                item = spooled_or_stand_in(row)
                if item.readable:
                    claimed.append(item)
                    continue
                bad.append(item)  # never sendable: set aside, not retried forever
                db.execute(
                    "INSERT OR REPLACE INTO dead"
                    " (forwarder, event_id, event, created, attempts, reason, failed_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (row[0], row[1], row[2], row[3], row[4], item.error, now),
                )
                db.execute(
                    "DELETE FROM pending WHERE forwarder = ? AND event_id = ?", (row[0], row[1])
                )
            db.executemany(
                "UPDATE pending SET owner = ?, lease_until = ?"
                " WHERE forwarder = ? AND event_id = ?",
                [(self.owner, now + self.lease, c.forwarder, c.event.id) for c in claimed],
            )
        for item in bad:  # once committed: the row is in the dead-lettered events now
            logger.error(
                "spool %s: event %s for forwarder %s dead-lettered, it cannot be sent: %s",
                self.path,
                item.event.id,
                item.forwarder,
                item.error,
            )
        if unreadable is not None:
            unreadable.extend(bad)
        return claimed

    def release(self) -> int:
        """Make this process's unsent events due now (at shutdown). Returns how many."""
        with self._transaction("release events") as db:
            cursor = db.execute("UPDATE pending SET lease_until = 0 WHERE owner = ?", (self.owner,))
            return cursor.rowcount

    def _free_dead_owners(self, db: sqlite3.Connection) -> None:
        """Expire the leases of processes of this host (and PID namespace) that no longer run."""
        host = this_host()
        owners = db.execute(
            "SELECT DISTINCT owner FROM pending WHERE lease_until > 0 AND owner != ?",
            (self.owner,),
        ).fetchall()
        for (owner,) in owners:
            if owner_gone(str(owner), host):
                db.execute("UPDATE pending SET lease_until = 0 WHERE owner = ?", (owner,))

    # -- what people call ---------------------------------------------------------

    def count(self) -> SpoolCounts:
        """How many events are pending and dead-lettered."""
        ((pending, dead),) = self._read(
            "SELECT (SELECT COUNT(*) FROM pending), (SELECT COUNT(*) FROM dead)"
        )
        return SpoolCounts(int(str(pending)), int(str(dead)))

    def pending(
        self,
        forwarder: str | None = None,
        limit: int | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[SpooledEvent]:
        """The events waiting to be sent, oldest first (rows that cannot be read as
        events included, with ``readable=False``)."""
        sql = "SELECT forwarder, event_id, event, created, attempts, last_error FROM pending"
        rows = self._read(*filtered_query(sql, forwarder, ids, limit))
        return [spooled_or_stand_in(row) for row in rows]

    def dead(
        self,
        forwarder: str | None = None,
        limit: int | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[SpooledEvent]:
        """The dead-lettered events, oldest first (rows that cannot be read as events
        included, with ``readable=False``)."""
        sql = "SELECT forwarder, event_id, event, created, attempts, reason FROM dead"
        rows = self._read(*filtered_query(sql, forwarder, ids, limit))
        return [spooled_or_stand_in(row) for row in rows]

    def replay(
        self,
        forwarder: str | None = None,
        ids: Sequence[str] | None = None,
        *,
        left: list[SpooledEvent] | None = None,
    ) -> int:
        """Put dead-lettered events back in line (all, or those of *forwarder* / *ids*).

        A running application sends them within ``resend_interval``; otherwise the
        next one to start does. Returns how many were put back.

        Two stay dead-lettered, appended to *left* with why in ``error``: an event
        pending again for the same forwarder (the same id: a copy put back would
        be lost, the other one kept), and a row that cannot be read as an event
        (``readable=False``: it would be dead-lettered again at once).
        """
        moved = 0
        kept: list[SpooledEvent] = []
        sql = "SELECT forwarder, event_id, event, created, attempts, reason FROM dead"
        with self._transaction("replay events") as db:
            for where, params in (where_clause(forwarder, part) for part in id_chunks(ids)):
                for row in db.execute(sql + where, params).fetchall():
                    item = spooled_or_stand_in(row)
                    if item.readable and self._put_back(db, row):
                        moved += 1
                    elif item.readable:
                        why = f"not replayed: event {item.event.id} is pending for {item.forwarder}"
                        kept.append(replace(item, error=f"{why} already ({item.error})"))
                    else:
                        kept.append(item)
        if left is not None:
            left.extend(kept)
        return moved

    @staticmethod
    def _put_back(db: sqlite3.Connection, row: tuple[object, ...]) -> bool:
        """Move the dead-lettered *row* to the pending ones, due now; False (and left
        as it is) if the same forwarder has the same event pending."""
        forwarder, event_id, event, created = row[:4]
        if not db.execute(
            "INSERT OR IGNORE INTO pending"
            " (forwarder, event_id, event, created, attempts, owner, lease_until)"
            " VALUES (?, ?, ?, ?, 0, '', 0)",
            (forwarder, event_id, event, created),
        ).rowcount:
            return False
        db.execute("DELETE FROM dead WHERE forwarder = ? AND event_id = ?", (forwarder, event_id))
        return True

    def held(self, forwarder: str | None = None, ids: Sequence[str] | None = None) -> int:
        """How many pending events (all, or those of *forwarder* / *ids*) a running process
        holds now: it may be sending them (or waits out a failed round's backoff).

        Purging one does not stop a send under way: it may still be delivered."""
        host, now, total = this_host(), time.time(), 0
        for where, params in (where_clause(forwarder, part) for part in id_chunks(ids)):
            where += (" AND" if where else " WHERE") + " lease_until > ? AND owner != ''"
            sql = f"SELECT owner, COUNT(*) FROM pending{where} GROUP BY owner"
            for owner, count in self._read(sql, [*params, now]):
                total += 0 if owner_gone(str(owner), host) else int(str(count))
        return total

    def purge(
        self, *, dead: bool = True, forwarder: str | None = None, ids: Sequence[str] | None = None
    ) -> int:
        """Delete events for good: dead-lettered (default) or pending ones. Returns how many.

        A pending event a running process is sending (see `held`) is deleted too, and
        may still be delivered: that send is under way."""
        table = "dead" if dead else "pending"
        with self._transaction("purge events") as db:
            return sum(
                db.execute(f"DELETE FROM {table}{where}", params).rowcount
                for where, params in (where_clause(forwarder, part) for part in id_chunks(ids))
            )
