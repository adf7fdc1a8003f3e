"""What `fastapi_eventbus.spool.Spool` needs beside its tables and transactions: rows read
back as events, the spool file's mode, a full disk, and which process owns a row.

A row that cannot be read back as an `Event` becomes a `SpooledEvent` with a stand-in
event (``readable=False``) holding what can still be told of it, so that one bad row never
stops the others. A row's owner is a mark, ``host:pid:start:random``, written by
`new_owner` and read by `owner_gone`: a process of this host that no longer runs (told
apart from a later process with the same pid by its start time) gives its rows up at once.
The host is the host name and the PID namespace (`this_host`): two containers of one pod
share the name, not the pids, and one must never take the other's rows as a dead one's.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from ._events import Event
from ._hooks import logger
from .storage import SpooledEvent

T = TypeVar("T")

_DISK_FULL_CODES = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR})
"""Primary SQLite result codes of a write that found no room (``ENOSPC`` may surface as
an I/O error)."""
_UNREADABLE_NAME = "(unreadable)"
"""The name of the stand-in `Event` of a row whose own name cannot be read."""


def spooled_or_stand_in(row: tuple[object, ...]) -> SpooledEvent:
    """A row as a `SpooledEvent`; with a stand-in event (``readable=False``) if whatever
    reading it raises: a bad row must not stop the others (JSON nested deeper than
    Python's recursion limit raises `RecursionError`, not a `ValueError`)."""
    forwarder, event_id, event, created, attempts, error = row
    try:
        read = Event.model_validate(json.loads(str(event)))
        if read.id != str(event_id):  # settled by its id: it would never be, sent forever
            raise ValueError(f"its event's id {read.id!r} is not the row's")
        return SpooledEvent(
            forwarder=str(forwarder),
            event=read,
            created=float(str(created)),
            attempts=int(str(attempts)),
            error=None if error is None else str(error),
        )
    except MemoryError:  # this process's trouble, not the row's
        raise
    except Exception as exc:
        reason = f"spooled event {event_id} for {forwarder} is unreadable: {describe_error(exc)}"
    return SpooledEvent(
        forwarder=str(forwarder),
        event=stand_in(str(event_id), event, created),
        created=converted_or(float, created, 0.0),
        attempts=converted_or(int, attempts, 0),
        error=reason,
        readable=False,
    )


def describe_error(exc: Exception) -> str:
    """*exc* in a line: its type, and its message cut short (a row may be megabytes)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\\x00-\x1f]|\\.){0,1000}")')
"""The ``name`` of a JSON envelope, where the spool writes it: first."""


def stand_in(event_id: str, raw: object, created: object) -> Event:
    """What can be told of an unreadable row's event: its id, time, and name if found."""
    match = _NAME.match(raw) if isinstance(raw, str) else None
    try:
        name = json.loads(match[1]) if match else _UNREADABLE_NAME
    except ValueError:
        name = _UNREADABLE_NAME
    try:
        when = datetime.fromtimestamp(converted_or(float, created, 0.0), UTC)
    except (OverflowError, OSError, ValueError):
        when = datetime.fromtimestamp(0, UTC)
    return Event.model_construct(name=str(name), id=event_id, time=when)  # shown as it is


def converted_or(kind: Callable[[str], T], value: object, default: T) -> T:
    """*value* (a column of a row) converted by *kind*, or *default* if it cannot be."""
    try:
        return kind(str(value))
    except ValueError:
        return default


IDS_AT_ONCE = 10_000
"""The most event ids one statement names: databases bound a statement's parameters (SQLite
32,766 by default, asyncpg 32,767)."""


def id_chunks(ids: Sequence[str] | None) -> list[Sequence[str] | None]:
    """*ids* in parts of at most `IDS_AT_ONCE`, one statement each (None: every row, once)."""
    if not ids:
        return [ids]
    return [ids[start : start + IDS_AT_ONCE] for start in range(0, len(ids), IDS_AT_ONCE)]


def where_clause(forwarder: str | None, ids: Sequence[str] | None) -> tuple[str, list[object]]:
    """The ``WHERE`` clause (with its leading space, or "" for every row) and its
    parameters that select the rows of *forwarder* and of the events *ids*; both optional."""
    clauses: list[str] = []
    params: list[object] = []
    if forwarder is not None:
        clauses.append("forwarder = ?")
        params.append(forwarder)
    if ids is not None:
        clauses.append(f"event_id IN ({', '.join('?' * len(ids)) or 'NULL'})")
        params.extend(ids)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def filtered_query(
    sql: str, forwarder: str | None, ids: Sequence[str] | None, limit: int | None
) -> tuple[str, list[object]]:
    """*sql* (a ``SELECT``) narrowed by `where_clause`, oldest first, at most *limit* rows;
    with its parameters."""
    where, params = where_clause(forwarder, ids)
    sql += where + " ORDER BY created"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return sql, params


def create_private(path: Path) -> None:
    """Create the spool file empty (SQLite takes it as a new database), readable by its
    owner only: SQLite gives its ``-wal`` and ``-shm`` files the same mode. An existing
    file keeps its mode; a missing directory is left for SQLite to report."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return
    os.close(fd)


def warn_if_public(path: Path) -> None:
    """Log a WARNING if every user of the host may read or write the spool file."""
    with suppress(OSError):
        mode = path.stat().st_mode & 0o777
        if mode & 0o007:
            logger.warning(
                "spool %s can be read or written by every user (mode %s) and holds event "
                "payloads in clear: chmod 600 it (and its -wal and -shm files)",
                path,
                oct(mode),
            )


def disk_full(exc: sqlite3.Error) -> bool:
    """Whether *exc* says a write found no room on the volume."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in _DISK_FULL_CODES


def this_host() -> str:
    """This host as far as pids go: ``name/namespace``, its name and the inode of the PID
    namespace this process sees (the containers of a Kubernetes pod share the name, not
    the pids); the name alone where there is no ``/proc/self/ns/pid`` (not Linux)."""
    name = socket.gethostname()
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return name
    return f"{name}/{namespace.removeprefix('pid:').strip('[]')}"


def new_owner(pid: int) -> str:
    """``host:pid:start:random`` (host: `this_host`): a process, told apart from a later
    one with its pid."""
    return f"{this_host()}:{pid}:{process_start(pid)}:{uuid.uuid4().hex[:8]}"


def owner_gone(owner: str, host: str) -> bool:
    """Whether *owner* (a `new_owner` mark) is a process of *host* (`this_host`) that no
    longer runs. An owner on another host or in another PID namespace, whose pid means
    nothing here, or a mark of another form, is not known gone: its lease applies.

    A mark of an earlier release names the host alone (``host:pid:...``): it is read as
    it was then, a process of this host if the name is this host's."""
    parts = owner.rsplit(":", 3)
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    marked = parts[0]
    if marked != host and ("/" in marked or marked != host.rpartition("/")[0]):
        return False
    return not process_alive(int(parts[1]), parts[2])


def process_start(pid: int) -> str:
    """When process *pid* started (clock ticks since boot, Linux), or "" if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces
    return fields[19] if len(fields) > 19 else ""


def process_alive(pid: int, started: str) -> bool:
    """Whether *pid* runs and is the process that started at *started* (not a reuse)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not started or process_start(pid) in ("", started)
