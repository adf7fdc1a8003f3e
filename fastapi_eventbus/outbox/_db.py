"""Running statements on an async or a sync SQLAlchemy engine, within a time limit; the
relay's `LISTEN`; and the sessions `emit` joins."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any, TypeAlias, TypeVar, cast

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from fastapi_eventbus._deadline import within
from fastapi_eventbus.exceptions import ConfigurationError

T = TypeVar("T")

AnyEngine: TypeAlias = "AsyncEngine | Engine"
"""What `SQLAlchemyOutbox` and `SQLAlchemyInbox` take: SQLAlchemy 2.0's async or sync engine."""


def checked_engine(engine: object, owner: str, claims: bool = False) -> AsyncEngine | Engine:
    """*engine*, if it is an engine (whose database can return the rows an ``UPDATE``
    *claims*); a clear error at the constructor otherwise."""
    if not isinstance(engine, AsyncEngine | Engine):
        raise ConfigurationError(
            f"{owner} takes a SQLAlchemy Engine or AsyncEngine (create_engine, "
            f"create_async_engine), got {type(engine).__name__}"
        )
    if claims and not engine.dialect.update_returning:  # MySQL, MariaDB, SQLite < 3.35
        raise ConfigurationError(
            f"{owner} claims its rows with UPDATE ... RETURNING, which {engine.dialect.name} "
            "does not support: use PostgreSQL, or SQLite 3.35 or later"
        )
    return engine


def sync_engine(engine: AsyncEngine | Engine) -> Engine:
    """The sync engine behind *engine* (itself, for a sync one)."""
    return engine.sync_engine if isinstance(engine, AsyncEngine) else engine


async def run(
    engine: AsyncEngine | Engine,
    work: Callable[[Connection], T],
    seconds: float | None = None,
    doing: str = "a database call",
) -> T:
    """``work(connection)`` in a transaction of its own, committed if it returns.

    On an async engine it runs on the event loop (SQLAlchemy's greenlet bridge);
    on a sync engine in a worker thread, so that the loop is never blocked.

    With *seconds*, a call still running then raises `TimeoutError`, naming what it was
    *doing*: a database that stopped answering (a network partition, a stalled proxy)
    would hold the caller forever. An async call is cancelled, and SQLAlchemy invalidates
    its connection (the pool opens a new one). A sync engine's thread cannot be stopped:
    it is no longer waited for, and runs on until its driver returns.
    """
    if isinstance(engine, AsyncEngine):
        finished, result = await within(_run_async(engine, work), seconds)
    else:
        finished, result = await within(asyncio.to_thread(_run_sync, engine, work), seconds)
    if not finished:
        thread = "" if isinstance(engine, AsyncEngine) else " (its thread runs on)"
        raise TimeoutError(f"{doing} did not finish within {seconds:g}s{thread}")
    return cast(T, result)


async def _run_async(engine: AsyncEngine, work: Callable[[Connection], T]) -> T:
    async with engine.begin() as connection:
        return await connection.run_sync(work)


def _run_sync(engine: Engine, work: Callable[[Connection], T]) -> T:
    with engine.begin() as connection:
        return work(connection)


async def listen(
    engine: AsyncEngine, channel: str, wake: asyncio.Event, seconds: float
) -> Callable[[], Awaitable[None]]:
    """``LISTEN`` on *channel* (asyncpg), setting *wake* at each notification, on a
    connection of its own; how to stop. Raises if it cannot, or not within *seconds*."""
    finished, stop = await within(_listen(engine, channel, wake), seconds)
    if not finished or stop is None:
        raise TimeoutError(f"LISTEN did not finish within {seconds:g}s")
    return stop


async def _listen(
    engine: AsyncEngine, channel: str, wake: asyncio.Event
) -> Callable[[], Awaitable[None]]:
    connection = await engine.connect()

    def notified(*_: object) -> None:
        wake.set()

    try:
        raw = await connection.get_raw_connection()
        driver: Any = raw.driver_connection
        await driver.add_listener(channel, notified)
    except BaseException:  # cancelled too: the connection is dropped, not given back
        await _invalidate(connection)
        raise

    async def stop() -> None:
        with suppress(Exception):
            await driver.remove_listener(channel, notified)
        with suppress(Exception):
            await connection.close()

    return stop


async def _invalidate(connection: AsyncConnection) -> None:
    with suppress(Exception):
        await connection.invalidate()
    with suppress(Exception):
        await connection.close()


def sync_session(session: object) -> Session:
    """The ORM `Session` of *session* (an `AsyncSession`'s own), or a clear error."""
    if isinstance(session, AsyncSession):
        return session.sync_session
    if isinstance(session, Session):
        return session
    raise TypeError(
        "emit(..., session=) takes a SQLAlchemy Session or AsyncSession, "
        f"got {type(session).__name__}"
    )


def check_writer(session: Session, mapper: Any, engine: Engine, schema: str | None) -> None:
    """Refuse, at ``emit``, a *session* whose rows of *mapper* (a table of *schema*) the
    outbox on *engine* would not find, or that no rollback would take back."""
    bind = session.get_bind(mapper=mapper)
    if database_of(bind.engine) != database_of(engine):  # whatever the driver (a sync
        raise ConfigurationError(  # script's ``sqlite://`` file is an async app's aiosqlite)
            f"the session writes to {bind.engine.url.render_as_string(hide_password=True)}"
            f", the outbox's engine to {engine.url.render_as_string(hide_password=True)}: an "
            "event's rows must be written in the database its relay reads"
        )
    writer = held_connection(session, mapper) or bind  # its execution options win
    if autocommits(writer):
        raise ConfigurationError(
            "the session's engine or connection is in AUTOCOMMIT: it commits an event's "
            "rows as it flushes them, and a rollback could not take them back; emit with a "
            "session on a transactional engine"
        )
    if (theirs := schema_of(writer, schema)) != (ours := schema_of(engine, schema)):
        raise ConfigurationError(
            f"the session writes the outbox's table in schema {theirs!r} (its "
            f"schema_translate_map), the outbox reads it in {ours!r}: its rows would never "
            "be retried or relayed; give both the same schema_translate_map"
        )


def held_connection(session: Session, mapper: Any) -> Connection | None:
    """The connection *session* already holds for the rows of *mapper* (acquiring none:
    an `AsyncSession`'s would need the greenlet bridge), or None.

    ``session.connection(execution_options=...)`` sets a level or a schema on that
    connection alone, not on the engine.
    """
    bind = session.get_bind(mapper=mapper)
    if isinstance(bind, Connection):
        return bind
    transaction = session.get_transaction()
    if transaction is None:
        return None
    bound = getattr(transaction, "bound_connection", None)  # SQLAlchemy 2.1.7 and later
    if bound is not None:
        try:
            return cast(Connection, bound(mapper))
        except InvalidRequestError:  # none yet
            return None
    held = getattr(transaction, "_connections", {}).get(bind)  # before: (connection, ...)
    return cast(Connection, held[0]) if held else None


def open_savepoints(connection: Connection) -> frozenset[str]:
    """The names of *connection*'s savepoints in progress, the innermost and those it
    is nested in (rolling back any of them takes back what is written now).

    SQLAlchemy names the current one (`Connection.get_nested_transaction`) but has no
    public name or parent for it: read here only, with a fallback to what is found.
    """
    names: set[str] = set()
    nested: object = connection.get_nested_transaction()
    while nested is not None:
        name = getattr(nested, "_savepoint", None)
        if not isinstance(name, str):
            break
        names.add(name)
        nested = getattr(nested, "_previous_nested", None)
    return frozenset(names)


def database_of(engine: Engine) -> tuple[object, ...]:
    """What tells *engine*'s database apart: its kind, host, port, name and user."""
    url = engine.url
    return (url.get_backend_name(), url.host, url.port, url.database, url.username)


def autocommits(bind: Engine | Connection) -> bool:
    """Whether *bind* commits each statement as it runs (``isolation_level="AUTOCOMMIT"``,
    given to ``create_engine``, in the engine's or the connection's execution options,
    in any case): then no rollback takes back what a session flushed. A connection's own
    level wins over its engine's."""
    level = bind.get_execution_options().get("isolation_level")
    if level is None:  # create_engine(isolation_level=...): only its dialect keeps it
        level = getattr(bind.engine.dialect, "_on_connect_isolation_level", None)
    return isinstance(level, str) and level.replace("_", " ").upper() == "AUTOCOMMIT"


def schema_of(bind: Engine | Connection, schema: str | None) -> str | None:
    """The schema in which *bind* reads and writes a table of *schema* (its execution
    options' ``schema_translate_map``: one schema per tenant)."""
    translated = bind.get_execution_options().get("schema_translate_map") or {}
    return translated.get(schema, schema)
