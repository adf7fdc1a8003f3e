"""``fastapi-eventbus spool``: count, list, replay and purge a spool file's events."""

from __future__ import annotations

import inspect
import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.cli import main
from fastapi_eventbus.forwarders import Forwarder
from fastapi_eventbus.spool import Spool

ISO_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z"


@dataclass
class Spooled:
    """A spool file with events: ``orders`` has 2 pending and 2 dead, ``audit`` 1 and 1."""

    path: Path
    pending: list[tuple[str, Event]]
    dead: list[tuple[str, Event]]
    owner: str
    """The mark of the process that spooled them: it still runs (this one), and holds
    the pending events that did not fail (leased: being sent)."""


def event(number: int) -> Event:
    return Event(name="order.placed", payload={"order": number})


@pytest.fixture
def spooled(tmp_path: Path) -> Spooled:
    path = tmp_path / "events.sqlite3"
    orders = [event(number) for number in range(4)]
    audit = [event(number) for number in range(10, 12)]
    spool = Spool(path)
    try:
        for forwarder, item in [*(("orders", item) for item in orders), ("audit", audit[0])]:
            spool.add([(forwarder, item)])  # one by one: "created" orders them
        spool.add([("audit", audit[1])])
        spool.failed("orders", orders[:3], "broker down\nconnection refused")
        spool.bury("orders", orders[:1], "refused for good: 400 bad message")
        spool.bury("orders", orders[3:], "gave up after 20 rounds: timeout")
        spool.bury("audit", audit[:1], "refused for good: 413 too large")
    finally:
        spool.close()
    return Spooled(
        path,
        pending=[("orders", orders[1]), ("orders", orders[2]), ("audit", audit[1])],
        dead=[("orders", orders[0]), ("orders", orders[3]), ("audit", audit[0])],
        owner=spool.owner,
    )


def stop_the_application(spooled: Spooled) -> None:
    """The process that spooled the events stopped: its shutdown released what it held."""
    spool = Spool(spooled.path)
    spool.owner = spooled.owner
    try:
        spool.release()
    finally:
        spool.close()


def invoke(*args: str | Path, answer: str | None = None) -> Result:
    """Run the command; an exception escaping it (a traceback) fails the test."""
    return CliRunner().invoke(
        main, [str(arg) for arg in args], input=answer, catch_exceptions=False
    )


def ids_in(path: Path, *, dead: bool) -> set[tuple[str, str]]:
    spool = Spool(path)
    try:
        rows = spool.dead() if dead else spool.pending()
    finally:
        spool.close()
    return {(row.forwarder, row.event.id) for row in rows}


def ids(entries: Sequence[tuple[str, Event]]) -> set[tuple[str, str]]:
    return {(forwarder, item.id) for forwarder, item in entries}


# -- count ---------------------------------------------------------------------------------


def test_count(spooled: Spooled) -> None:
    result = invoke("spool", "count", spooled.path)
    assert (result.exit_code, result.output) == (0, "pending 3\ndead 3\n")


def test_count_as_json(spooled: Spooled) -> None:
    result = invoke("spool", "count", spooled.path, "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == {"pending": 3, "dead": 3}


def test_count_of_an_empty_spool(tmp_path: Path) -> None:
    Spool(tmp_path / "empty.sqlite3").close()
    result = invoke("spool", "count", tmp_path / "empty.sqlite3")
    assert (result.exit_code, result.output) == (0, "pending 0\ndead 0\n")


def test_python_m_runs_the_spool_commands(spooled: Spooled) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastapi_eventbus", "spool", "count", str(spooled.path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "pending 3\ndead 3\n"


# -- list ----------------------------------------------------------------------------------


def test_list_prints_one_line_per_pending_event(spooled: Spooled) -> None:
    result = invoke("spool", "list", spooled.path)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert len(lines) == 3
    (_, first), (_, second), (_, third) = spooled.pending
    assert re.fullmatch(
        rf"{first.id}  orders  order\.placed  attempts=1  {ISO_UTC}  "
        "broker down connection refused",  # the error on the event's line
        lines[0],
    )
    assert re.fullmatch(
        rf"{second.id}  orders  order\.placed  attempts=1  {ISO_UTC}  broker down.*", lines[1]
    )
    assert re.fullmatch(rf"{third.id}  audit  order\.placed  attempts=0  {ISO_UTC}", lines[2])


def test_list_dead_gives_the_reasons(spooled: Spooled) -> None:
    result = invoke("spool", "list", spooled.path, "--dead")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [line.split("  ")[0] for line in lines] == [item.id for _, item in spooled.dead]
    assert re.fullmatch(
        rf".*  orders  order\.placed  attempts=1  {ISO_UTC}  refused for good: 400 bad message",
        lines[0],
    )
    assert lines[1].endswith("gave up after 20 rounds: timeout")
    assert lines[2].endswith("refused for good: 413 too large")


def test_list_by_forwarder_and_limit(spooled: Spooled) -> None:
    result = invoke("spool", "list", spooled.path, "--forwarder", "orders", "--limit", "1")
    assert result.exit_code == 0
    (line,) = result.output.splitlines()
    assert line.startswith(f"{spooled.pending[0][1].id}  orders  ")
    result = invoke("spool", "list", spooled.path, "--dead", "--forwarder", "audit")
    assert [line.split("  ")[:2] for line in result.output.splitlines()] == [
        [spooled.dead[2][1].id, "audit"]
    ]
    assert invoke("spool", "list", spooled.path, "--forwarder", "nobody").output == ""


@pytest.mark.parametrize("dead", [False, True], ids=["pending", "dead"])
def test_list_as_json_lines(spooled: Spooled, dead: bool) -> None:
    result = invoke("spool", "list", spooled.path, "--json", *(["--dead"] if dead else []))
    assert result.exit_code == 0
    records = [json.loads(line) for line in result.output.splitlines()]
    expected = spooled.dead if dead else spooled.pending
    assert [Event.model_validate(record["event"]) for record in records] == [
        item for _, item in expected
    ]
    assert [record["forwarder"] for record in records] == [name for name, _ in expected]
    assert {tuple(record) for record in records} == {
        ("event", "forwarder", "attempts", "created", "error", "readable")
    }
    assert {record["readable"] for record in records} == {True}
    for record in records:
        assert re.fullmatch(ISO_UTC, record["created"])
    if dead:
        assert [record["attempts"] for record in records] == [1, 0, 0]
        assert records[1]["error"] == "gave up after 20 rounds: timeout"
    else:
        assert [record["attempts"] for record in records] == [1, 1, 0]
        assert records[0]["error"] == "broker down\nconnection refused"  # as it was
        assert records[2]["error"] is None


def test_list_escapes_what_it_prints(tmp_path: Path) -> None:
    # emit refuses such names now; a spool written before, or by hand, may hold them.
    forged = "order.placed  attempts=0  2024-01-01T00:00:00Z\nfake-id  orders  order.paid"
    rows = [  # Event() refuses them too: made as a row written by hand would read
        Event.model_construct(name=forged, id="first", payload=None),
        Event.model_construct(name="\x1b[2J\x1b[31mred\x1b[0m\x9b\u2028\u202e", id="second\r"),
        Event(name="back\\slash", id="third"),
    ]
    spool = Spool(tmp_path / "events.sqlite3")
    spool.add([("orders", row) for row in rows])
    spool.failed("orders", rows[2:], "refused:\x1b]8;;http://evil\x07link")
    spool.close()
    result = invoke("spool", "list", tmp_path / "events.sqlite3")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert len(lines) == 3  # one per event: no forged row
    assert lines[0].startswith(
        "first  orders  order.placed  attempts=0  2024-01-01T00:00:00Z\\nfake-id  orders  "
    )
    assert lines[1].startswith(
        "second\\r  orders  \\x1b[2J\\x1b[31mred\\x1b[0m\\x9b\\u2028\\u202e  attempts=0"
    )
    assert lines[2].startswith("third  orders  back\\\\slash  attempts=1")
    assert lines[2].endswith("  refused:\\x1b]8;;http://evil\\x07link")
    assert all(line.isprintable() for line in lines)


def test_list_shows_an_unreadable_row_with_the_others(spooled: Spooled) -> None:
    with sqlite3.connect(spooled.path) as db:  # damaged by hand: JSON nested too deep
        db.execute(
            "INSERT INTO dead (forwarder, event_id, event, created, attempts, reason,"
            " failed_at) VALUES ('orders', 'poison', ?, 1, 0, 'unreadable', 1)",
            ('{"name": "order.placed", "payload": ' + "[" * 100_000 + "]" * 100_000 + "}",),
        )
    result = invoke("spool", "list", spooled.path, "--dead")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        "poison",
        *(item.id for _, item in spooled.dead),
    ]
    assert re.fullmatch(
        rf"poison  orders  order\.placed  attempts=0  {ISO_UTC}  spooled event poison for "
        "orders is unreadable: RecursionError: .*",
        lines[0],
    )
    result = invoke("spool", "list", spooled.path, "--dead", "--json")
    records = [json.loads(line) for line in result.output.splitlines()]
    assert [(r["event"]["id"], r["readable"]) for r in records][:2] == [
        ("poison", False),
        (spooled.dead[0][1].id, True),
    ]
    assert records[0]["event"]["payload"] is None  # a stand-in: the payload is not read


def test_list_limit_must_be_positive(spooled: Spooled) -> None:
    result = invoke("spool", "list", spooled.path, "--limit", "0")
    assert result.exit_code == 2


# -- replay --------------------------------------------------------------------------------


def test_replay_moves_exactly_the_chosen_ids(spooled: Spooled) -> None:
    chosen = [spooled.dead[0], spooled.dead[2]]  # two forwarders
    options = [arg for _, item in chosen for arg in ("--id", item.id)]
    result = invoke("spool", "replay", spooled.path, *options)
    assert (result.exit_code, result.output) == (0, "replayed 2 event(s)\n")
    assert ids_in(spooled.path, dead=True) == ids([spooled.dead[1]])
    assert ids_in(spooled.path, dead=False) == ids(spooled.pending + chosen)
    spool = Spool(spooled.path)
    try:
        replayed = {row.event.id: row for row in spool.pending()}
    finally:
        spool.close()
    assert [replayed[item.id].attempts for _, item in chosen] == [0, 0]  # a fresh start


def test_replay_by_forwarder(spooled: Spooled) -> None:
    result = invoke("spool", "replay", spooled.path, "--forwarder", "orders")
    assert (result.exit_code, result.output) == (0, "replayed 2 event(s)\n")
    assert ids_in(spooled.path, dead=True) == ids(spooled.dead[2:])


def test_replay_forwarder_and_id_together(spooled: Spooled) -> None:
    audit_id = spooled.dead[2][1].id
    result = invoke("spool", "replay", spooled.path, "--forwarder", "orders", "--id", audit_id)
    assert (result.exit_code, result.output) == (0, "replayed 0 event(s)\n")
    assert ids_in(spooled.path, dead=True) == ids(spooled.dead)


def test_replay_everything(spooled: Spooled) -> None:
    assert invoke("spool", "replay", spooled.path).output == "replayed 3 event(s)\n"
    assert invoke("spool", "count", spooled.path).output == "pending 6\ndead 0\n"


class Broker(Forwarder):
    loop_bound = False

    def __init__(self) -> None:
        super().__init__(name="orders")
        self.received: list[str] = []

    async def send(self, events: Sequence[Event]) -> None:
        self.received += [item.id for item in events]


@pytest.mark.anyio
async def test_a_bus_sends_what_was_replayed(spooled: Spooled) -> None:
    bus = EventBus(spool=spooled.path)
    broker = Broker()
    bus.forward("order.*", broker)
    try:
        replayed = spooled.dead[1][1]
        assert invoke("spool", "replay", spooled.path, "--id", replayed.id).exit_code == 0
        await bus.resend()  # what the installed lifespan does every resend_interval
        assert broker.received == [replayed.id]  # due at once (the others wait: backoff, lease)
        assert ids_in(spooled.path, dead=False) == ids(spooled.pending)
    finally:
        await bus.close()
        assert bus.spool is not None
        bus.spool.close()


# -- purge ---------------------------------------------------------------------------------


def test_purge_dead_deletes_only_the_chosen(spooled: Spooled) -> None:
    chosen = spooled.dead[1]
    result = invoke("spool", "purge", spooled.path, "--dead", "--id", chosen[1].id, "--yes")
    assert (result.exit_code, result.output) == (0, "purged 1 event(s)\n")
    assert ids_in(spooled.path, dead=True) == ids([spooled.dead[0], spooled.dead[2]])
    assert ids_in(spooled.path, dead=False) == ids(spooled.pending)


def test_purge_pending_of_a_forwarder(spooled: Spooled) -> None:
    stop_the_application(spooled)
    result = invoke("spool", "purge", spooled.path, "--pending", "--forwarder", "audit", "-y")
    assert (result.exit_code, result.output) == (0, "purged 1 event(s)\n")
    assert ids_in(spooled.path, dead=False) == ids(spooled.pending[:2])
    assert ids_in(spooled.path, dead=True) == ids(spooled.dead)


def test_purge_all_dead(spooled: Spooled) -> None:
    assert invoke("spool", "purge", spooled.path, "--dead", "--yes").output == "purged 3 event(s)\n"
    assert invoke("spool", "count", spooled.path).output == "pending 3\ndead 0\n"


@pytest.mark.parametrize("kind", ["--dead", "--pending"])
def test_purge_asks_and_a_no_aborts(spooled: Spooled, kind: str) -> None:
    result = invoke("spool", "purge", spooled.path, kind, answer="n\n")
    assert result.exit_code == 1
    assert "Aborted!" in result.output
    if kind == "--pending":
        assert f"3 pending event(s) in {spooled.path} have not been delivered yet" in result.output
    else:
        assert f"Delete 3 dead-lettered event(s) from {spooled.path} for good?" in result.output
    assert ids_in(spooled.path, dead=True) == ids(spooled.dead)
    assert ids_in(spooled.path, dead=False) == ids(spooled.pending)


def test_purge_asks_about_the_chosen_and_a_yes_deletes(spooled: Spooled) -> None:
    stop_the_application(spooled)
    chosen = spooled.pending[0][1].id
    result = invoke("spool", "purge", spooled.path, "--pending", "--id", chosen, answer="y\n")
    assert result.exit_code == 0
    assert "1 pending event(s) in" in result.output
    assert result.output.endswith("purged 1 event(s)\n")
    assert ids_in(spooled.path, dead=False) == ids(spooled.pending[1:])


def test_purge_does_not_ask_when_nothing_matches(spooled: Spooled) -> None:
    result = invoke("spool", "purge", spooled.path, "--dead", "--forwarder", "nobody")
    assert (result.exit_code, result.output) == (0, "purged 0 event(s)\n")


@pytest.mark.parametrize("kinds", [[], ["--dead", "--pending"]], ids=["neither", "both"])
def test_purge_needs_dead_or_pending(spooled: Spooled, kinds: list[str]) -> None:
    result = invoke("spool", "purge", spooled.path, *kinds, "--yes")
    assert result.exit_code == 2
    assert "pass exactly one of --dead and --pending" in result.output
    assert invoke("spool", "count", spooled.path).output == "pending 3\ndead 3\n"


# -- bad paths -----------------------------------------------------------------------------

COMMANDS = [
    ["count"],
    ["list"],
    ["list", "--dead"],
    ["replay"],
    ["purge", "--dead", "--yes"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_missing_file_is_a_usage_error_and_is_not_created(
    tmp_path: Path, command: list[str]
) -> None:
    path = tmp_path / "nope.sqlite3"
    result = invoke("spool", *command, path)
    assert result.exit_code == 2
    assert "Invalid value for 'PATH'" in result.output
    assert "does not exist" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke("spool", "count", tmp_path)
    assert result.exit_code == 2
    assert "is a directory" in result.output


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_file_that_is_not_a_database(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a database, but long enough to have a header of sorts\n" * 10)
    before = path.read_bytes()
    result = invoke("spool", *command, path)  # no exception escapes: no traceback
    assert result.exit_code == 2
    assert f"Invalid value for PATH: {path} is not a spool: not an SQLite database" in (
        result.output
    )
    assert "Traceback" not in result.output
    assert path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [path]


def test_an_empty_file_is_not_a_spool(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.touch()
    result = invoke("spool", "count", path)
    assert result.exit_code == 2
    assert "is not a spool: an SQLite database without the spool's tables" in result.output
    assert path.read_bytes() == b""


def test_another_sqlite_database_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (name TEXT)")
    db.commit()
    db.close()
    before = path.read_bytes()
    result = invoke("spool", "purge", path, "--pending", "--yes")
    assert result.exit_code == 2
    assert f"{path} is not a spool: an SQLite database without the spool's tables" in (
        result.output
    )
    assert path.read_bytes() == before  # no spool tables added, still not in WAL mode
    assert sorted(tmp_path.iterdir()) == [path]


def test_a_broken_spool_is_an_error_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "broken.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE pending (x); CREATE TABLE dead (y);")
    db.close()
    result = subprocess.run(
        [sys.executable, "-m", "fastapi_eventbus", "spool", "list", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: cannot open the spool {path}: ")
    assert "Traceback" not in result.stderr


def test_events_that_cannot_be_read_are_listed_with_the_reason(spooled: Spooled) -> None:
    db = sqlite3.connect(spooled.path)
    db.execute("""UPDATE dead SET event = '{"name": "a", "from_the_future": 1}'""")
    db.commit()
    db.close()
    result = invoke("spool", "list", spooled.path, "--dead")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [line.split("  ")[:3] for line in lines] == [
        [item.id, forwarder, "a"] for forwarder, item in spooled.dead
    ]
    for line in lines:
        assert "is unreadable: ValidationError: 1 validation error for Event" in line
        assert "from_the_future" in line
    assert invoke("spool", "list", spooled.path).exit_code == 0  # the pending ones are fine


# -- help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["count"], ["list"], ["replay"], ["purge"]])
def test_every_spool_command_has_help(command: list[str]) -> None:
    result = invoke("spool", *command, "--help")
    assert result.exit_code == 0
    assert result.output.startswith(f"Usage: fastapi-eventbus spool {' '.join(command)}".strip())


def test_the_replay_help_says_when_events_are_sent() -> None:
    output = " ".join(invoke("spool", "replay", "--help").output.split())
    assert "A running application sends them within its resend interval" in output


def test_replay_help_names_a_setting_that_exists() -> None:
    """Finding 9 of the delivery issue: the help named ``EventBus resend_interval``, which
    `EventBus` does not have; the setting belongs to `Spool`."""
    help_text = " ".join(CliRunner().invoke(main, ["spool", "replay", "--help"]).output.split())
    assert "Spool(resend_interval=...)" in help_text
    assert "EventBus resend_interval" not in help_text
    assert "resend_interval" in inspect.signature(Spool).parameters


def test_purge_deletes_only_what_it_asked_about(
    spooled: Spooled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found: ``purge --pending`` counted the matching events, asked, then deleted by the
    same filter: what the running application spooled while the question was open was
    deleted too, never sent, with only a count printed. It deletes what it asked about."""
    confirm = click.confirm
    fresh = event(99)

    def confirm_while_the_app_spools(text: str, **options: Any) -> Any:
        spool = Spool(spooled.path)  # the running application's handle on the file
        try:
            spool.add([("orders", fresh)])
        finally:
            spool.close()
        return confirm(text, **options)

    stop_the_application(spooled)
    monkeypatch.setattr(click, "confirm", confirm_while_the_app_spools)
    result = invoke("spool", "purge", spooled.path, "--pending", answer="y\n")
    assert result.exit_code == 0, result.output
    assert result.output.endswith("purged 3 event(s)\n")
    assert ids_in(spooled.path, dead=False) == {("orders", fresh.id)}


def test_purge_takes_more_ids_than_a_statement_can_name(spooled: Spooled) -> None:
    """A purge confirmed at the prompt names every event it asked about: past the parameters
    SQLite takes in one statement, it would fail with "too many SQL variables"."""
    limit = sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    spool = Spool(spooled.path)
    try:
        chosen = [item.id for _, item in spooled.pending]
        more = [*chosen, *(f"x-{n}" for n in range(limit + 1))]
        assert spool.purge(dead=False, ids=more) == 3
    finally:
        spool.close()
    assert ids_in(spooled.path, dead=False) == set()


def test_purge_warns_of_pending_events_a_running_process_holds(spooled: Spooled) -> None:
    """Found: ``purge --pending --yes`` said "purged 1 event(s)" (its help: "purged, they
    are never sent") while the application that holds the event was sending it, and
    delivered it anyway. The purge cannot stop that send: it says so, with how many."""
    result = invoke("spool", "purge", spooled.path, "--pending", "--forwarder", "audit", "-y")
    assert result.exit_code == 0
    assert result.output.startswith("purged 1 event(s)\n")
    assert "WARNING: 1 of them were held by a running process" in result.output
    assert "may still be delivered" in result.output
    assert ("audit", spooled.pending[2][1].id) not in ids_in(spooled.path, dead=False)
    stop_the_application(spooled)  # what a stopped process held is purged without a word
    result = invoke("spool", "purge", spooled.path, "--pending", "-y")
    assert (result.exit_code, result.output) == (0, "purged 2 event(s)\n")


def test_replay_leaves_a_dead_event_that_is_pending_again(spooled: Spooled) -> None:
    """Found: replaying a dead-lettered event that was pending again for its forwarder (the
    same id) skipped it (``INSERT OR IGNORE``), deleted the dead copy and counted it as
    replayed. It stays dead-lettered now, named, and is not counted."""
    old = spooled.dead[0][1]
    spool = Spool(spooled.path)
    try:
        spool.add([("orders", old.model_copy(update={"payload": {"copy": "new"}}))])
    finally:
        spool.close()
    result = invoke("spool", "replay", spooled.path, "--forwarder", "orders")
    assert result.exit_code == 1
    assert result.output.startswith("replayed 1 event(s)\n")
    assert f"not replayed: event {old.id} is pending for orders already" in result.output
    assert "1 event(s) stay dead-lettered" in result.output
    assert ("orders", old.id) in ids_in(spooled.path, dead=True)


def test_replay_leaves_an_unreadable_row_dead_lettered(spooled: Spooled) -> None:
    """Found: ``replay`` counted an unreadable dead row as replayed; it was put back only to
    be dead-lettered again at the next claim. It stays, named, and is not counted."""
    db = sqlite3.connect(spooled.path)
    db.execute("INSERT INTO dead VALUES ('orders', 'damaged', '{\"name\": \"x\", ', 1, 3, 'r', 1)")
    db.commit()
    db.close()
    result = invoke("spool", "replay", spooled.path)
    assert result.exit_code == 1
    assert result.output.startswith("replayed 3 event(s)\n")
    assert "spooled event damaged for orders is unreadable" in result.output
    assert ids_in(spooled.path, dead=True) == {("orders", "damaged")}
