"""``fastapi-eventbus outbox``: count, list, replay and purge the rows of a SQLAlchemyOutbox.

Each test runs on an SQLite file through an async URL (``sqlite+aiosqlite``, an async
engine) and a sync one (``sqlite``); the rows are written as a user's sync script
would, and read back with a sync engine.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, create_engine, insert, inspect
from sqlalchemy.orm import Session

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.cli import main
from fastapi_eventbus.outbox import SQLAlchemyOutbox
from fastapi_eventbus.testing import RecordingForwarder
from tests._postgres import Postgres

ISO_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z"
LOCAL = "(local handlers)"


@dataclass
class Outboxed:
    """An outbox with rows: 2 events emitted for the local handlers and forwarder
    ``orders`` (4 pending rows), and 2 dead rows written by hand."""

    url: str
    """What the commands get: async or sync."""
    path: Path
    outbox: SQLAlchemyOutbox
    """The same outbox on a sync engine, to read the rows back."""
    pending: list[tuple[str, Event]]
    dead: list[tuple[str, Event]]
    """Oldest first: ``orders``'s, then the local handlers'."""


def engine_of(outbox: SQLAlchemyOutbox) -> Engine:
    """*outbox*'s engine: the tests build theirs sync."""
    assert isinstance(outbox.engine, Engine)
    return outbox.engine


def emit_pending(outbox: SQLAlchemyOutbox, count: int) -> list[Event]:
    """*count* events emitted from a sync script (no event loop), for the local handlers and
    forwarder ``orders``: their rows are due for the relay."""
    bus = EventBus(outbox=outbox)
    bus.on("order.created")(lambda: None)
    bus.forward("order.*", RecordingForwarder(name="orders"))
    emitted: list[Event] = []
    with Session(engine_of(outbox)) as db:
        for number in range(count):
            emitted.append(bus.emit("order.created", {"id": number}, session=db))
        db.commit()
    return emitted


def bury(
    outbox: SQLAlchemyOutbox, destination: str, event: Event, created: float, **row: object
) -> None:
    """Write a dead row for *event* and *destination*, as the relay would have."""
    values = {"attempts": 20, "error": "gave up", "dead_at": created + 1, **row}
    with engine_of(outbox).begin() as connection:
        connection.execute(
            insert(outbox.tables.dead).values(
                event_id=event.id,
                destination=destination,
                name=event.name,
                body=event.model_dump_json(),
                created=created,
                **values,
            )
        )


@pytest.fixture(params=["sqlite+aiosqlite", "sqlite"])
def outboxed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outboxed]:
    path = tmp_path / "shop.db"
    engine = create_engine(f"sqlite:///{path}")
    outbox = SQLAlchemyOutbox(engine)
    asyncio.run(outbox.create_tables())
    emitted = emit_pending(outbox, 2)
    gone = [Event(name="order.paid", payload={"order": n}) for n in range(2)]
    bury(outbox, "orders", gone[0], 1_000.0, error="refused for good: 400\nbad message")
    bury(outbox, "", gone[1], 2_000.0, attempts=3, error="handler failed")
    engine.dispose()
    yield Outboxed(
        url=f"{request.param}:///{path}",
        path=path,
        outbox=outbox,
        pending=[(destination, e) for e in emitted for destination in ("", "orders")],
        dead=[("orders", gone[0]), ("", gone[1])],
    )
    engine.dispose()


def invoke(*args: str | Path, answer: str | None = None) -> Result:
    """Run the command; an exception escaping it (a traceback) fails the test."""
    return CliRunner().invoke(
        main, [str(arg) for arg in args], input=answer, catch_exceptions=False
    )


def rows_in(outboxed: Outboxed, *, dead: bool) -> set[tuple[str, str]]:
    outbox = outboxed.outbox
    try:
        rows = asyncio.run(outbox.dead() if dead else outbox.pending())
    finally:
        engine_of(outbox).dispose()
    return {(row.forwarder, row.event.id) for row in rows}


def keys(entries: list[tuple[str, Event]]) -> set[tuple[str, str]]:
    return {(destination, event.id) for destination, event in entries}


# -- count ---------------------------------------------------------------------------------


def test_count(outboxed: Outboxed) -> None:
    result = invoke("outbox", "count", outboxed.url)
    assert (result.exit_code, result.output) == (0, "pending 4\ndead 2\n")


def test_count_as_json(outboxed: Outboxed) -> None:
    result = invoke("outbox", "count", outboxed.url, "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == {"pending": 4, "dead": 2}


def test_count_of_an_empty_outbox_with_another_prefix(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    asyncio.run(SQLAlchemyOutbox(engine, table_prefix="shop_").create_tables())
    engine.dispose()
    url = f"sqlite:///{tmp_path / 'app.db'}"
    result = invoke("outbox", "count", url, "--table-prefix", "shop_")
    assert (result.exit_code, result.output) == (0, "pending 0\ndead 0\n")
    result = invoke("outbox", "count", url)  # eventbus_, the default: not there
    assert result.exit_code == 2
    assert "is not an outbox with --table-prefix 'eventbus_'" in result.output


def test_python_m_runs_the_outbox_commands(outboxed: Outboxed) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastapi_eventbus", "outbox", "count", outboxed.url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "pending 4\ndead 2\n"


# -- list ----------------------------------------------------------------------------------


def test_list_prints_one_line_per_pending_row(outboxed: Outboxed) -> None:
    result = invoke("outbox", "list", outboxed.url)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert len(lines) == 4
    for line in lines:
        assert re.fullmatch(
            rf"\S+  ({re.escape(LOCAL)}|orders)  order\.created  attempts=0  {ISO_UTC}", line
        ), line
    seen = {(line.split("  ")[1], line.split("  ")[0]) for line in lines}
    assert seen == {(d or LOCAL, event.id) for d, event in outboxed.pending}
    first, second = (event.id for _, event in outboxed.pending[::2])
    assert [line.split("  ")[0] for line in lines] == [first, first, second, second]


def test_list_dead_gives_the_reasons(outboxed: Outboxed) -> None:
    result = invoke("outbox", "list", outboxed.url, "--dead")
    assert result.exit_code == 0
    (_, refused), (_, failed) = outboxed.dead
    assert re.fullmatch(
        rf"{refused.id}  orders  order\.paid  attempts=20  1970-01-01T00:16:40Z  "
        r"refused for good: 400 bad message\n"  # the error on the row's line
        rf"{failed.id}  \(local handlers\)  order\.paid  attempts=3  1970-01-01T00:33:20Z  "
        r"handler failed\n",
        result.output,
    )


def test_list_limit(outboxed: Outboxed) -> None:
    result = invoke("outbox", "list", outboxed.url, "--dead", "--limit", "1")
    assert result.exit_code == 0
    (line,) = result.output.splitlines()
    assert line.startswith(f"{outboxed.dead[0][1].id}  orders  ")
    assert len(invoke("outbox", "list", outboxed.url, "--limit", "3").output.splitlines()) == 3
    assert invoke("outbox", "list", outboxed.url, "--limit", "0").exit_code == 2


@pytest.mark.parametrize("dead", [False, True], ids=["pending", "dead"])
def test_list_as_json_lines(outboxed: Outboxed, dead: bool) -> None:
    result = invoke("outbox", "list", outboxed.url, "--json", *(["--dead"] if dead else []))
    assert result.exit_code == 0
    records = [json.loads(line) for line in result.output.splitlines()]
    assert {tuple(record) for record in records} == {
        ("event", "forwarder", "attempts", "created", "error", "readable")
    }
    assert {record["readable"] for record in records} == {True}
    for record in records:
        assert re.fullmatch(ISO_UTC, record["created"])
    listed = [(r["forwarder"], Event.model_validate(r["event"])) for r in records]
    if dead:
        assert listed == outboxed.dead  # the destination "" as it is, in order
        assert [r["attempts"] for r in records] == [20, 3]
        assert records[0]["error"] == "refused for good: 400\nbad message"  # as it was
    else:
        assert sorted(listed, key=repr) == sorted(outboxed.pending, key=repr)
        assert {(r["attempts"], r["error"]) for r in records} == {(0, None)}


def test_list_escapes_what_it_prints(outboxed: Outboxed) -> None:
    forged = Event.model_construct(  # a row written by hand: Event() refuses such a name
        name="order.paid  attempts=0\nfake-id  orders  \x1b[31mred", id="forged", payload=None
    )
    bury(outboxed.outbox, "orders", forged, 3_000.0, error="refused:\x1b]8;;http://evil\x07")
    result = invoke("outbox", "list", outboxed.url, "--dead")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert len(lines) == 3  # one per row: no forged row
    assert lines[2].startswith(  # unreadable (a name emit refuses), and shown escaped
        "forged  orders  order.paid  attempts=0\\nfake-id  orders  \\x1b[31mred  attempts=20  "
        "1970-01-01T00:50:00Z  "
    )
    assert "\x1b" not in result.output


def test_list_shows_an_unreadable_row(outboxed: Outboxed) -> None:
    with sqlite3.connect(outboxed.path) as db:  # damaged by hand, or by another version
        db.execute(
            "UPDATE eventbus_outbox_dead SET body = ? WHERE destination = ''",
            ('{"name": "order.paid", "from_the_future": 1}',),
        )
    result = invoke("outbox", "list", outboxed.url, "--dead")
    assert result.exit_code == 0
    line = result.output.splitlines()[1]
    assert line.startswith(f"{outboxed.dead[1][1].id}  {LOCAL}  order.paid  attempts=3")
    assert "is unreadable: ValidationError" in line


# -- replay --------------------------------------------------------------------------------


def test_replay_moves_exactly_the_chosen_ids(outboxed: Outboxed) -> None:
    chosen = outboxed.dead[1]
    result = invoke("outbox", "replay", outboxed.url, "--id", chosen[1].id)
    assert (result.exit_code, result.output) == (0, "replayed 1 event(s)\n")
    assert rows_in(outboxed, dead=True) == keys(outboxed.dead[:1])
    assert rows_in(outboxed, dead=False) == keys([*outboxed.pending, chosen])
    replayed = [r for r in asyncio.run(outboxed.outbox.pending()) if r.event.id == chosen[1].id]
    assert [(r.attempts, r.error) for r in replayed] == [(0, None)]  # a fresh start


def test_replay_everything(outboxed: Outboxed) -> None:
    assert invoke("outbox", "replay", outboxed.url).output == "replayed 2 event(s)\n"
    assert invoke("outbox", "count", outboxed.url).output == "pending 6\ndead 0\n"
    assert invoke("outbox", "replay", outboxed.url).output == "replayed 0 event(s)\n"


def test_a_relay_delivers_what_was_replayed(outboxed: Outboxed) -> None:
    engine = create_engine(f"sqlite:///{outboxed.path}")
    outbox = SQLAlchemyOutbox(engine)  # another process's, with its relay
    bus = EventBus(outbox=outbox)
    broker = RecordingForwarder(name="orders")
    bus.forward("order.*", broker)
    replayed = outboxed.dead[0][1]
    assert invoke("outbox", "replay", outboxed.url, "--id", replayed.id).exit_code == 0

    async def relay() -> None:
        try:
            await outbox.relay_once()  # one round of the relay: the row is due at once
        finally:
            await bus.close()
            engine.dispose()

    asyncio.run(relay())
    assert replayed.id in [event.id for event in broker.events]
    assert ("orders", replayed.id) not in rows_in(outboxed, dead=False)


# -- purge ---------------------------------------------------------------------------------


def test_purge_deletes_only_the_chosen(outboxed: Outboxed) -> None:
    chosen = outboxed.dead[0][1].id
    result = invoke("outbox", "purge", outboxed.url, "--dead", "--id", chosen, "--yes")
    assert (result.exit_code, result.output) == (0, "purged 1 event(s)\n")
    assert rows_in(outboxed, dead=True) == keys(outboxed.dead[1:])
    assert rows_in(outboxed, dead=False) == keys(outboxed.pending)


def test_purge_all_dead(outboxed: Outboxed) -> None:
    result = invoke("outbox", "purge", outboxed.url, "--dead", "-y")
    assert (result.exit_code, result.output) == (0, "purged 2 event(s)\n")
    assert invoke("outbox", "count", outboxed.url).output == "pending 4\ndead 0\n"


def test_purge_asks_and_a_no_aborts(outboxed: Outboxed) -> None:
    result = invoke("outbox", "purge", outboxed.url, "--dead", answer="n\n")
    assert result.exit_code == 1
    assert f"Delete 2 dead-lettered event(s) from {outboxed.url} for good?" in result.output
    assert "Aborted!" in result.output
    assert rows_in(outboxed, dead=True) == keys(outboxed.dead)
    assert rows_in(outboxed, dead=False) == keys(outboxed.pending)


def test_purge_asks_about_the_chosen_and_a_yes_deletes(outboxed: Outboxed) -> None:
    chosen = outboxed.dead[1][1].id
    result = invoke("outbox", "purge", outboxed.url, "--dead", "--id", chosen, answer="y\n")
    assert result.exit_code == 0
    assert "Delete 1 dead-lettered event(s) from" in result.output
    assert result.output.endswith("purged 1 event(s)\n")
    assert rows_in(outboxed, dead=True) == keys(outboxed.dead[:1])


def test_purge_does_not_ask_when_nothing_matches(outboxed: Outboxed) -> None:
    result = invoke("outbox", "purge", outboxed.url, "--dead", "--id", "nobody")
    assert (result.exit_code, result.output) == (0, "purged 0 event(s)\n")


def test_purge_needs_dead_and_never_deletes_pending_rows(outboxed: Outboxed) -> None:
    result = invoke("outbox", "purge", outboxed.url, "--yes")
    assert result.exit_code == 2
    assert "pass --dead: only dead-lettered rows can be purged from an outbox" in result.output
    result = invoke("outbox", "purge", outboxed.url, "--pending", "--yes")
    assert result.exit_code == 2
    assert "No such option" in result.output  # pending rows are the relay's
    assert invoke("outbox", "count", outboxed.url).output == "pending 4\ndead 2\n"


# -- bad URLs ------------------------------------------------------------------------------

COMMANDS = [
    ["count"],
    ["list"],
    ["list", "--dead"],
    ["replay"],
    ["purge", "--dead", "--yes"],
]
DRIVERS = ["sqlite+aiosqlite", "sqlite"]


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_database_without_the_tables_is_a_usage_error_left_alone(
    tmp_path: Path, command: list[str], driver: str
) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    db.close()
    before = path.read_bytes()
    result = invoke("outbox", *command, f"{driver}:///{path}")
    assert result.exit_code == 2
    assert (
        f"Invalid value for URL: {driver}:///{path} is not an outbox with --table-prefix "
        "'eventbus_': it has no table eventbus_outbox, eventbus_outbox_dead" in result.output
    )
    assert "these commands never do" in result.output
    assert path.read_bytes() == before  # no table created
    assert sorted(tmp_path.iterdir()) == [path]


def test_a_missing_dead_table_is_named(outboxed: Outboxed) -> None:
    with sqlite3.connect(outboxed.path) as db:
        db.execute("DROP TABLE eventbus_outbox_dead")
    db.close()
    result = invoke("outbox", "count", outboxed.url)
    assert result.exit_code == 2
    assert "it has no table eventbus_outbox_dead (" in result.output
    engine = create_engine(f"sqlite:///{outboxed.path}")
    assert not inspect(engine).has_table("eventbus_outbox_dead")  # not created either
    engine.dispose()


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_missing_sqlite_file_is_a_usage_error_and_is_not_created(
    tmp_path: Path, command: list[str], driver: str
) -> None:
    result = invoke("outbox", *command, f"{driver}:///{tmp_path / 'nope.db'}")
    assert result.exit_code == 2
    assert "Invalid value for URL" in result.output
    assert f"{tmp_path / 'nope.db'} does not exist" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "not an SQLAlchemy database URL"),
        ("nosuchdb://app:s3cret@host/db", "SQLAlchemy has no dialect 'nosuchdb'"),
    ],
)
def test_a_bad_url_is_a_usage_error_that_does_not_repeat_it(url: str, message: str) -> None:
    result = invoke("outbox", "count", url)
    assert result.exit_code == 2
    assert f"Invalid value for URL: {message}" in result.output
    assert "s3cret" not in result.output


def test_an_unreachable_database_is_an_error_without_the_password() -> None:
    url = "postgresql+asyncpg://app:s3cret-pw@127.0.0.1:1/shop"  # port 1: refused
    result = subprocess.run(
        [sys.executable, "-m", "fastapi_eventbus", "outbox", "count", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    shown = "postgresql+asyncpg://app:***@127.0.0.1:1/shop"
    assert result.stderr.startswith(f"Error: outbox {shown}: ")
    assert "Traceback" not in result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr


@pytest.mark.slow
def test_postgresql_and_a_password_never_printed(postgres: Postgres) -> None:
    """On a real server (trust authentication: the password is accepted and ignored)."""
    database = postgres.create_database()
    try:
        url = postgres.url(database=database).replace("postgres@", "postgres:s3cret-pw@")
        shown = url.replace("s3cret-pw", "***")
        result = invoke("outbox", "count", url)
        assert result.exit_code == 2
        assert f"{shown} is not an outbox" in result.output
        assert "s3cret-pw" not in result.output

        engine = create_engine(postgres.url("psycopg", database))
        outbox = SQLAlchemyOutbox(engine)
        asyncio.run(outbox.create_tables())
        (event,) = emit_pending(outbox, 1)
        bury(outbox, "orders", Event(name="order.paid", id="gone"), 1_000.0)
        engine.dispose()
        for sync in (False, True):  # asyncpg, then psycopg's sync engine
            chosen = url.replace("+asyncpg", "+psycopg") if sync else url
            assert invoke("outbox", "count", chosen).output == "pending 2\ndead 1\n"
        result = invoke("outbox", "purge", url, "--dead", answer="n\n")
        assert f"Delete 1 dead-lettered event(s) from {shown} for good?" in result.output
        assert "s3cret-pw" not in result.output
        assert invoke("outbox", "replay", url).output == "replayed 1 event(s)\n"
        lines = invoke("outbox", "list", url).output.splitlines()
        assert sorted(line.split("  ")[:2] for line in lines) == [
            [event.id, LOCAL],
            [event.id, "orders"],
            ["gone", "orders"],
        ]
    finally:
        postgres.drop_database(database)


# -- without SQLAlchemy --------------------------------------------------------------------

WITHOUT_SQLALCHEMY = """
import sys
sys.modules["sqlalchemy"] = None  # import sqlalchemy raises ImportError; find_spec: None
from fastapi_eventbus.cli import main
main(sys.argv[1:], prog_name="fastapi-eventbus")
"""


@pytest.mark.parametrize(
    "command", [["--help"], ["outbox", "--help"], ["outbox", "count", "--help"]]
)
def test_the_help_works_without_sqlalchemy(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_SQLALCHEMY, *command],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: fastapi-eventbus")


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_the_commands_name_the_extra_without_sqlalchemy(
    outboxed: Outboxed, command: list[str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_SQLALCHEMY, "outbox", *command, outboxed.url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "Error: SQLAlchemy is not installed: pip install 'fastapi-eventbus-di[sqlalchemy]'\n"
    )


# -- help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["count"], ["list"], ["replay"], ["purge"]])
def test_every_outbox_command_has_help(command: list[str]) -> None:
    result = invoke("outbox", *command, "--help")
    assert result.exit_code == 0
    assert result.output.startswith(f"Usage: fastapi-eventbus outbox {' '.join(command)}".strip())


def test_the_replay_help_names_a_setting_that_exists() -> None:
    output = " ".join(invoke("outbox", "replay", "--help").output.split())
    assert "SQLAlchemyOutbox(poll_interval=...)" in output
    assert hasattr(SQLAlchemyOutbox(create_engine("sqlite://")), "poll_interval")
