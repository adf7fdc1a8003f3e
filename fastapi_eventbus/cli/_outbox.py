"""``fastapi-eventbus outbox``: count, list, replay and purge the rows of an outbox.

The commands take the SQLAlchemy URL of the database holding a
`fastapi_eventbus.outbox.SQLAlchemyOutbox` (an async driver, like ``postgresql+asyncpg``
or ``sqlite+aiosqlite``, gets an async engine; any other a sync one) and its
``--table-prefix``, and work beside the running application: ``count``, ``list``
(``--json``: one JSON object per line), ``replay`` (dead-lettered rows back in line,
relayed by a running application within its ``poll_interval``) and ``purge``
(dead-lettered rows only; asks for confirmation unless ``--yes``). They never create
tables: a database without the outbox's tables is a usage error (exit code 2), and so is
an SQLite file that does not exist. The URL's password is never printed. SQLAlchemy is
imported when a command runs, so that the rest of the command line works without the
``sqlalchemy`` extra; the engine is disposed of when the command ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from fastapi_eventbus.exceptions import EventBusError, MissingExtraError

from ._spool import confirm_purge, json_line, text_line

if TYPE_CHECKING:
    from sqlalchemy import URL, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    from fastapi_eventbus.outbox import SQLAlchemyOutbox
    from fastapi_eventbus.storage import SpooledEvent

T = TypeVar("T")

LOCAL_HANDLERS = "(local handlers)"
"""How ``outbox list`` shows the destination ``""``: the bus's own handlers."""


@click.group(name="outbox", short_help="Count, list, replay and purge an outbox's rows.")
def outbox_group() -> None:
    """Count, list, replay and purge the rows of a transactional outbox
    (EventBus(outbox=SQLAlchemyOutbox(engine))) in the database at URL: pending ones,
    waiting for their delivery or the relay, and dead-lettered ones. A row is one
    event for one destination: the local handlers or a forwarder. URL is an SQLAlchemy
    database URL (postgresql+asyncpg://user:password@host/db, sqlite:///app.db); its
    password is never printed. The application may be running meanwhile. A database
    without the outbox's tables is an error (exit code 2): these commands never create
    them. Needs the sqlalchemy extra."""


@dataclass(frozen=True)
class _Opened:
    """An outbox a command opened, and the event loop its coroutines run on."""

    outbox: SQLAlchemyOutbox
    name: str
    """The URL without its password: what messages call the outbox."""
    runner: asyncio.Runner

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run *work* (one of the outbox's methods) on the command's event loop."""
        return self.runner.run(work)


@contextmanager
def _opened(url: str, table_prefix: str) -> Iterator[_Opened]:
    """The outbox at *url*, whose tables must exist; its errors as click errors, the
    password left out. Its engine is disposed of at the end."""
    outbox_class = _outbox_class()
    from sqlalchemy.exc import SQLAlchemyError

    parsed = _parsed(url)
    name = parsed.render_as_string(hide_password=True)
    _check_sqlite_file(parsed, name)
    with asyncio.Runner() as runner:
        try:
            engine = _engine(parsed)
        except (ImportError, SQLAlchemyError) as exc:  # the driver is missing, an option
            raise click.ClickException(_failure(name, parsed, exc)) from exc
        try:
            outbox = outbox_class(engine, table_prefix=table_prefix)
            runner.run(_check_tables(outbox, name, table_prefix))
            yield _Opened(outbox, name, runner)
        except (SQLAlchemyError, OSError, EventBusError) as exc:
            raise click.ClickException(_failure(name, parsed, exc)) from exc
        finally:
            runner.run(_dispose(engine))


def _outbox_class() -> type[SQLAlchemyOutbox]:
    """`SQLAlchemyOutbox`, or a click error naming the extra to install."""
    try:
        from fastapi_eventbus.outbox import SQLAlchemyOutbox
    except MissingExtraError as exc:
        raise click.ClickException(str(exc)) from exc
    return SQLAlchemyOutbox


def _parsed(url: str) -> URL:
    """*url* as SQLAlchemy's `URL`, with a dialect SQLAlchemy has; a usage error
    otherwise (which does not repeat *url*: it may hold a password)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise click.BadParameter(
            "not an SQLAlchemy database URL (dialect+driver://user:password@host/database)",
            param_hint="URL",
        ) from exc
    try:
        parsed.get_dialect()
    except NoSuchModuleError as exc:
        raise click.BadParameter(
            f"SQLAlchemy has no dialect {parsed.drivername!r}", param_hint="URL"
        ) from exc
    return parsed


def _check_sqlite_file(url: URL, name: str) -> None:
    """Raise a usage error if *url* is an SQLite file that does not exist: connecting
    would create it."""
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return
    if database.startswith("file:"):  # a URI (?uri=true): SQLite reads it
        return
    if not Path(database).exists():
        raise click.BadParameter(f"{name}: {database} does not exist", param_hint="URL")


def _engine(url: URL) -> AsyncEngine | Engine:
    """An async engine for an async driver (asyncpg, aiosqlite, ...), a sync one otherwise."""
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    if url.get_dialect().is_async:
        return create_async_engine(url)
    return create_engine(url)


async def _dispose(engine: AsyncEngine | Engine) -> None:
    from sqlalchemy.ext.asyncio import AsyncEngine

    if isinstance(engine, AsyncEngine):
        await engine.dispose()
    else:
        engine.dispose()


async def _check_tables(outbox: SQLAlchemyOutbox, name: str, table_prefix: str) -> None:
    """Raise a usage error unless the database has both of *outbox*'s tables."""
    from sqlalchemy import Connection, inspect
    from sqlalchemy.ext.asyncio import AsyncEngine

    tables = [outbox.tables.events.name, outbox.tables.dead.name]

    def missing(connection: Connection) -> list[str]:
        inspector = inspect(connection)
        return [table for table in tables if not inspector.has_table(table)]

    engine = outbox.engine
    if isinstance(engine, AsyncEngine):
        async with engine.connect() as connection:
            absent = await connection.run_sync(missing)
    else:
        with engine.connect() as sync_connection:
            absent = missing(sync_connection)
    if absent:
        raise click.BadParameter(
            f"{name} is not an outbox with --table-prefix {table_prefix!r}: it has no "
            f"table {', '.join(absent)} (SQLAlchemyOutbox.create_tables() or the "
            "application's migrations create them; these commands never do)",
            param_hint="URL",
        )


def _failure(name: str, url: URL, exc: BaseException) -> str:
    """The message of a click error for *exc*, on one line, without *url*'s password."""
    from sqlalchemy.exc import DBAPIError

    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = " ".join(str(cause).split())[:300]
    if url.password:  # a driver's message should not hold it; never print it if it does
        text = text.replace(str(url.password), "***")
    kind = type(cause).__name__
    return f"outbox {name}: {kind}: {text}" if text else f"outbox {name}: {kind}"


def _outbox_arguments(command: Callable[..., Any]) -> Callable[..., Any]:
    """The ``URL`` argument and the ``--table-prefix`` option every command takes."""
    command = click.option(
        "--table-prefix",
        default="eventbus_",
        show_default=True,
        metavar="PREFIX",
        help="The start of the outbox's table names: SQLAlchemyOutbox(table_prefix=...).",
    )(command)
    return click.argument("url", metavar="URL")(command)


def _ids_option(text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The repeatable ``--id EVENT_ID`` option, with the help *text* of its command."""
    return click.option("--id", "ids", metavar="EVENT_ID", multiple=True, help=text)


@outbox_group.command(name="count", short_help="Print how many rows are pending and dead-lettered.")
@_outbox_arguments
@click.option("--json", "as_json", is_flag=True, help='Print {"pending": N, "dead": N}.')
def outbox_count(url: str, table_prefix: str, as_json: bool) -> None:
    """Print how many rows of the outbox at URL are pending (waiting for their delivery
    or the relay, or being delivered) and dead-lettered. A row is one event for one
    destination."""
    with _opened(url, table_prefix) as opened:
        pending = len(opened.run(opened.outbox.pending()))
        dead = len(opened.run(opened.outbox.dead()))
    if as_json:
        click.echo(json.dumps({"pending": pending, "dead": dead}))
    else:
        click.echo(f"pending {pending}\ndead {dead}")


@outbox_group.command(name="list", short_help="List pending (or dead-lettered) rows.")
@_outbox_arguments
@click.option("--dead", is_flag=True, help="List the dead-lettered rows instead.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="At most N rows.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='One JSON object per line: event, forwarder (the destination, "" for the local '
    "handlers), attempts, created, error, readable.",
)
def outbox_list(url: str, table_prefix: str, dead: bool, limit: int | None, as_json: bool) -> None:
    """List the pending rows of the outbox at URL, or with --dead the dead-lettered ones,
    oldest first: one line per row with its event's id, its destination (a forwarder,
    or (local handlers)), the event's name, failed attempts, when it was written (UTC)
    and its last error (pending) or why it was dead-lettered (dead). Characters that
    are not printable (newlines, escape sequences) and backslashes are shown as Python
    escapes. A row that is not an event (damaged) is listed too, with what can be read
    of it and why."""
    with _opened(url, table_prefix) as opened:
        rows = opened.run(opened.outbox.dead() if dead else opened.outbox.pending())
    for row in rows[:limit]:
        click.echo(json_line(row) if as_json else text_line(_shown_destination(row)))


def _shown_destination(row: SpooledEvent) -> SpooledEvent:
    """*row* with the destination ``""`` (the local handlers) named for the text line."""
    return dataclasses.replace(row, forwarder=LOCAL_HANDLERS) if row.forwarder == "" else row


@outbox_group.command(name="replay", short_help="Put dead-lettered rows back in line.")
@_outbox_arguments
@_ids_option("Only this event's rows (repeat for several). Default: every dead-lettered row.")
def outbox_replay(url: str, table_prefix: str, ids: tuple[str, ...]) -> None:
    """Move the dead-lettered rows of the outbox at URL (all, or those of the events
    chosen with --id) back to the pending ones, due at once with their attempts reset,
    and print how many. The relay of a running application delivers them within its
    poll interval (SQLAlchemyOutbox(poll_interval=...), 1 s by default); otherwise the
    next one to start does."""
    with _opened(url, table_prefix) as opened:
        moved = opened.run(opened.outbox.replay(ids=ids or None))
    click.echo(f"replayed {moved} event(s)")


@outbox_group.command(name="purge", short_help="Delete dead-lettered rows for good.")
@_outbox_arguments
@click.option("--dead", is_flag=True, help="Delete dead-lettered rows (required).")
@_ids_option("Only this event's rows (repeat for several). Default: every dead-lettered row.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def outbox_purge(url: str, table_prefix: str, dead: bool, ids: tuple[str, ...], yes: bool) -> None:
    """Delete the dead-lettered rows of the outbox at URL for good (--dead), all or
    those of the events chosen with --id; print how many. Asks for confirmation
    unless --yes. Pending rows cannot be purged: the relay delivers them (or
    dead-letters them once their attempts run out)."""
    if not dead:
        raise click.UsageError("pass --dead: only dead-lettered rows can be purged from an outbox")
    with _opened(url, table_prefix) as opened:
        if not yes:
            rows = opened.run(opened.outbox.dead())
            asked = [row.event.id for row in rows if not ids or row.event.id in ids]
            prompt = f"Delete {len(asked)} dead-lettered event(s) from {opened.name} for good?"
            if (confirmed := confirm_purge(asked, prompt)) is None:
                return
            ids = confirmed
        deleted = opened.run(opened.outbox.purge(ids=ids or None))
    click.echo(f"purged {deleted} event(s)")
