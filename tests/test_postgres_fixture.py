"""The `postgres` and `postgres_url` fixtures: a real server, and a fresh database per test.

What the outbox tests rely on: the asyncpg URL works with SQLAlchemy's async engine, the
psycopg URL with its sync engine, and each database starts empty and stays apart from the
others, from the other tests' too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from tests._postgres import Postgres

pytestmark = pytest.mark.slow

metadata = MetaData()
notes = Table("notes", metadata, Column("id", Integer, primary_key=True), Column("text", String))


@asynccontextmanager
async def engine(url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        yield engine
    finally:
        await engine.dispose()


async def tables(url: str) -> list[str]:
    async with engine(url) as database, database.connect() as connection:
        return await connection.run_sync(lambda sync: inspect(sync).get_table_names())


@pytest.mark.anyio
async def test_a_table_lives_in_its_own_database_only(
    postgres: Postgres, postgres_url: str
) -> None:
    assert postgres_url.startswith(f"postgresql+asyncpg://postgres@127.0.0.1:{postgres.port}/")
    assert await tables(postgres_url) == []  # fresh
    async with engine(postgres_url) as database:
        async with database.begin() as connection:
            await connection.run_sync(metadata.create_all)
            await connection.execute(notes.insert(), [{"text": "one"}, {"text": "two"}])
        async with database.connect() as connection:
            rows = (await connection.execute(notes.select().order_by(notes.c.id))).all()
            current = (await connection.execute(text("SELECT current_database()"))).scalar()
    assert [row.text for row in rows] == ["one", "two"]
    assert postgres_url.endswith(f"/{current}")
    assert await tables(postgres_url) == ["notes"]
    # Created from inside the running event loop: another database, without the table.
    other = postgres.create_database()
    assert other != current
    assert await tables(postgres.url(database=other)) == []
    postgres.drop_database(other)


@pytest.mark.anyio
async def test_the_next_test_s_database_is_fresh(postgres_url: str) -> None:
    # After the test above, in the same server: not its database, and nothing in it.
    assert await tables(postgres_url) == []


def test_the_sync_psycopg_url_works(postgres: Postgres, postgres_url: str) -> None:
    database = postgres_url.rsplit("/", 1)[1]
    sync = create_engine(postgres.url("psycopg", database), poolclass=NullPool)
    assert str(sync.url) == f"postgresql+psycopg://postgres@127.0.0.1:{postgres.port}/{database}"
    try:
        with sync.begin() as connection:
            metadata.create_all(connection)
            connection.execute(notes.insert(), {"text": "sync"})
        with sync.connect() as connection:
            assert connection.execute(text("SELECT current_database()")).scalar() == database
            assert connection.execute(notes.select()).all() == [(1, "sync")]
            # The throwaway settings of tests/_postgres.py.
            assert connection.execute(text("SHOW fsync")).scalar() == "off"
            assert connection.execute(text("SHOW max_connections")).scalar() == "200"
    finally:
        sync.dispose()


def test_a_dropped_database_is_gone(postgres: Postgres) -> None:
    database = postgres.create_database()
    with postgres.connect(database) as connection:
        connection.execute("SELECT 1")
        postgres.drop_database(database)  # even with a connection still open
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        postgres.connect(database).close()
