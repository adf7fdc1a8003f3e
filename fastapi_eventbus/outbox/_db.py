"""Running statements on an async or a sync SQLAlchemy engine, and the sessions `emit` joins."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from fastapi_eventbus.exceptions import ConfigurationError

T = TypeVar("T")

AnyEngine: TypeAlias = "AsyncEngine | Engine"
"""What `SQLAlchemyOutbox` and `SQLAlchemyInbox` take: SQLAlchemy 2.0's async or sync engine."""


def checked_engine(engine: object, owner: str) -> AsyncEngine | Engine:
    """*engine*, if it is an engine; a clear error at the constructor otherwise."""
    if isinstance(engine, AsyncEngine | Engine):
        return engine
    raise ConfigurationError(
        f"{owner} takes a SQLAlchemy Engine or AsyncEngine (create_engine, "
        f"create_async_engine), got {type(engine).__name__}"
    )


def sync_engine(engine: AsyncEngine | Engine) -> Engine:
    """The sync engine behind *engine* (itself, for a sync one)."""
    return engine.sync_engine if isinstance(engine, AsyncEngine) else engine


async def run(engine: AsyncEngine | Engine, work: Callable[[Connection], T]) -> T:
    """``work(connection)`` in a transaction of its own, committed if it returns.

    On an async engine it runs on the event loop (SQLAlchemy's greenlet bridge);
    on a sync engine in a worker thread, so that the loop is never blocked.
    """
    if isinstance(engine, AsyncEngine):
        async with engine.begin() as connection:
            return await connection.run_sync(work)
    return await asyncio.to_thread(_run_sync, engine, work)


def _run_sync(engine: Engine, work: Callable[[Connection], T]) -> T:
    with engine.begin() as connection:
        return work(connection)


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


def same_database(session: Session, mapper: Any, engine: Engine) -> bool:
    """Whether *session* writes rows of *mapper* to *engine*'s database, whatever the
    driver (a sync script's ``sqlite://`` file is an async app's ``sqlite+aiosqlite://``)."""
    return database_of(session.get_bind(mapper=mapper).engine) == database_of(engine)


def database_of(engine: Engine) -> tuple[object, ...]:
    """What tells *engine*'s database apart: its kind, host, port, name and user."""
    url = engine.url
    return (url.get_backend_name(), url.host, url.port, url.database, url.username)
