"""The spool (in this process): written at emit, emptied on delivery, resent, dead-lettered.

The crash, outage and shutdown tests with real processes and moto's SQS are in
``tests/test_faults.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient

from fastapi_eventbus import (
    CapacityError,
    ConfigurationError,
    DiscardedEvents,
    Event,
    EventBus,
    SpoolError,
    get_bus,
)
from fastapi_eventbus._spool_io import owner_gone
from fastapi_eventbus.exceptions import ForwarderError
from fastapi_eventbus.forwarders import DeadLetter, Delivery, Forwarder, Retry
from fastapi_eventbus.spool import Spool
from fastapi_eventbus.storage import Storage
from tests.conftest import missing_peer

pytestmark = pytest.mark.anyio

Bus = Annotated[EventBus, Depends(get_bus)]
QUICK = Retry(attempts=2, initial_delay=0.001, max_delay=0.001)


class Broker(Forwarder):
    """A forwarder whose broker can be down (transient) or refuse events for good."""

    loop_bound = False

    def __init__(
        self, name: str = "broker", send_timeout: float | None = 60.0, retry: Retry = QUICK
    ) -> None:
        self.dead: list[DeadLetter] = []
        super().__init__(
            name=name, retry=retry, dead_letter=self.dead.append, send_timeout=send_timeout
        )
        self.up = True
        self.refuse: set[str] = set()
        self.received: list[str] = []

    async def send(self, events: Sequence[Event]) -> Delivery | None:
        if not self.up:
            raise ForwarderError("broker down", transient=True)
        refused = [event for event in events if event.name in self.refuse]
        self.received += [event.id for event in events if event not in refused]
        return Delivery(rejected=refused, reason="400 bad message") if refused else None


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "spool.sqlite3"


def spooled_bus(path: Path, broker: Broker, **options: float) -> EventBus:
    bus = EventBus(spool=Spool(path, retry_delay=0.001, **options))  # type: ignore[arg-type]
    bus.forward("order.*", broker)
    return bus


async def test_an_emitted_event_is_on_disk_before_the_response(path: Path) -> None:
    broker = Broker()
    bus = spooled_bus(path, broker)
    app = FastAPI()
    bus.install(app)
    seen_in_endpoint: list[int] = []

    @app.post("/orders")
    async def place(events: Bus) -> str:
        event = events.emit("order.placed", {"id": 1})
        events.emit("audit.logged")  # no forwarder: not spooled
        # Another connection (another process) sees it already: it is committed.
        with sqlite3.connect(path) as other:
            ((count,),) = other.execute("SELECT COUNT(*) FROM pending").fetchall()
        seen_in_endpoint.append(count)
        return event.id

    with TestClient(app) as client:
        event_id = client.post("/orders").json()
    assert seen_in_endpoint == [1]
    assert broker.received == [event_id]
    assert Spool(path).count().pending == 0  # removed once the broker had it


async def test_what_the_broker_did_not_take_is_resent_later(path: Path) -> None:
    broker = Broker()
    broker.up = False
    bus = spooled_bus(path, broker)
    ids = [(await bus.publish("order.placed", {"n": n})).id for n in range(3)]
    assert broker.dead == []  # transient: not dead-lettered, kept
    pending = bus.spool.pending() if bus.spool else []
    assert [(p.event.id, p.attempts, p.error) for p in pending] == [
        (event_id, 1, "ForwarderError('broker down')") for event_id in ids
    ]
    assert [p.event.payload for p in pending] == [{"n": 0}, {"n": 1}, {"n": 2}]
    broker.up = True
    await asyncio.sleep(0.01)  # the retry delay
    assert await bus.resend() == 3
    assert sorted(broker.received) == sorted(ids)
    assert bus.spool is not None
    assert bus.spool.count().pending == 0


async def test_a_refused_event_is_dead_lettered_and_can_be_replayed(path: Path) -> None:
    broker = Broker()
    broker.refuse = {"order.bad"}
    bus = spooled_bus(path, broker)
    bad = await bus.publish("order.bad")
    good = await bus.publish("order.good")
    spool = bus.spool
    assert spool is not None
    assert broker.received == [good.id]
    assert [d.ids for d in broker.dead] == [[bad.id]]
    (dead,) = spool.dead()
    assert (dead.forwarder, dead.event, dead.error) == ("broker", bad, "rejected: 400 bad message")
    broker.refuse = set()
    assert spool.replay(ids=[bad.id]) == 1
    assert spool.count().dead == 0
    await bus.resend()
    assert broker.received == [good.id, bad.id]
    assert spool.count().pending == 0


async def test_after_max_attempts_an_event_is_dead_lettered(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Broker()
    broker.up = False
    bus = spooled_bus(path, broker, max_attempts=3)
    event = await bus.publish("order.placed")
    for _ in range(2):
        await asyncio.sleep(0.01)
        await bus.resend()
    assert bus.spool is not None
    assert bus.spool.count().pending == 0
    (dead,) = bus.spool.dead()
    assert dead.event.id == event.id
    assert dead.attempts == 3
    assert dead.error == "gave up after 3 rounds: ForwarderError('broker down')"
    assert [d.ids for d in broker.dead] == [[event.id]]
    assert "not delivered (gave up after 3 rounds" in caplog.text
    assert event.id in caplog.text


async def test_events_of_a_failed_request_leave_the_spool(path: Path) -> None:
    broker = Broker()
    discarded: list[DiscardedEvents] = []
    bus = EventBus(spool=path, on_discard=discarded.append)
    bus.forward("order.*", broker)
    app = FastAPI()
    bus.install(app)

    @app.post("/orders")
    async def place(events: Bus) -> None:
        events.emit("order.placed")
        raise HTTPException(409)

    with TestClient(app) as client:
        assert client.post("/orders").status_code == 409
    assert len(discarded) == 1
    assert Spool(path).count().pending == 0
    assert broker.received == []


async def test_the_lifespan_sends_what_a_dead_process_left(path: Path) -> None:
    # A process spools an event and dies before sending it.
    code = (
        "import sys; from fastapi_eventbus import Event; from fastapi_eventbus.spool import Spool;"
        f"Spool({str(path)!r}).add([('broker', Event(name='order.placed', id='left-behind'))])"
    )
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
    assert await process.wait() == 0
    pending = Spool(path).pending()
    assert [p.event.id for p in pending] == ["left-behind"]
    broker = Broker()
    bus = spooled_bus(path, broker)
    app = FastAPI()
    bus.install(app)
    with TestClient(app):  # startup: its lease was the dead process's, taken over at once
        for _ in range(200):
            if broker.received:
                break
            await asyncio.sleep(0.01)
    assert broker.received == ["left-behind"]
    assert Spool(path).count().pending == 0


async def test_a_live_process_keeps_its_events_until_its_lease_runs_out(path: Path) -> None:
    mine, theirs = Spool(path), Spool(path, lease=0.05)  # both of this (live) process
    theirs.add([("broker", Event(name="order.placed", id="busy"))])
    assert mine.claim() == []  # being sent by a live process
    await asyncio.sleep(0.06)
    assert [c.event.id for c in mine.claim()] == ["busy"]
    assert mine.claim() == []  # now leased to us


def test_concurrent_claims_never_hand_out_an_event_twice(path: Path) -> None:
    spool = Spool(path)
    spool.add([("broker", Event(name="order.placed", id=f"e{i}")) for i in range(300)])
    assert spool.release() == 300  # due now, for anyone
    claimed: list[list[str]] = []

    def claim_all() -> None:
        spool, got = Spool(path), []  # its own connection, like another process
        while batch := spool.claim(limit=7):
            got += [c.event.id for c in batch]
        claimed.append(got)

    threads = [threading.Thread(target=claim_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [event_id for got in claimed for event_id in got]
    assert sorted(every) == sorted(f"e{i}" for i in range(300))  # each exactly once


def test_the_spool_holds_json_not_pickle(path: Path) -> None:
    event = Event(name="order.placed", payload={"total": 9.5}, trace_context={"traceparent": "x"})
    Spool(path).add([("broker", event)])
    with sqlite3.connect(path) as db:
        ((raw,),) = db.execute("SELECT event FROM pending").fetchall()
    assert json.loads(raw)["payload"] == {"total": 9.5}
    assert Event.model_validate_json(raw) == event


def test_forwarders_sharing_a_spool_need_distinct_names(path: Path) -> None:
    bus = EventBus(spool=path)
    bus.forward("order.*", Broker("orders"))
    with pytest.raises(ConfigurationError, match="two forwarders are named 'orders'"):
        bus.forward("invoice.*", Broker("orders"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lease": 0}, "lease must be a number of seconds > 0"),
        ({"max_attempts": 0}, "max_attempts must be an int >= 1"),
        ({"resend_interval": "1"}, "resend_interval must be a number of seconds > 0"),
    ],
)
def test_bad_spool_settings_fail_in_the_constructor(
    path: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Spool(path, **options)  # type: ignore[arg-type]


def test_an_unusable_spool_path_fails_in_the_constructor(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="cannot open the spool"):
        EventBus(spool=tmp_path / "missing-dir" / "spool.sqlite3")
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("not a database " * 100)
    with pytest.raises(SpoolError, match="cannot open the spool"):
        Spool(not_sqlite)


# -- bounded memory ---------------------------------------------------------------------


def test_a_request_over_max_batch_events_is_refused_at_emit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handled: list[str] = []
    bus = EventBus(max_batch_events=3)
    bus.on("order.*")(lambda event: handled.append(event.id))
    app = FastAPI()
    bus.install(app)
    refused: list[str] = []

    @app.post("/orders")
    async def place(events: Bus) -> int:
        for n in range(5):
            try:
                events.emit("order.placed", {"n": n})
            except CapacityError as exc:
                refused.append(str(exc))
        return 0

    with TestClient(app) as client:
        client.post("/orders")
        client.post("/orders")  # the limit is per request
    assert len(handled) == 6
    assert len(refused) == 4
    assert refused[0] == (
        "event refused: this request (or handler call) already emitted 3 events, "
        "the max_batch_events limit"
    )
    assert "event refused" in caplog.text


async def test_publish_over_max_pending_events_is_refused_until_some_finish() -> None:
    release = asyncio.Event()
    bus = EventBus(max_pending_events=2)

    @bus.on("order.*")
    async def slow(event: Event) -> None:
        await release.wait()

    first = asyncio.create_task(bus.publish("order.placed"))
    second = asyncio.create_task(bus.publish("order.placed"))
    await asyncio.sleep(0.01)
    with pytest.raises(CapacityError, match="2 events are pending"):
        await bus.publish("order.placed")
    release.set()
    await asyncio.gather(first, second)
    await bus.publish("order.placed")  # room again


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, "10"])
def test_bad_limits_fail_in_the_constructor(limit: object) -> None:
    with pytest.raises(ConfigurationError, match="max_pending_events must be an int >= 1"):
        EventBus(max_pending_events=limit)  # type: ignore[arg-type]


def test_no_limits_at_all() -> None:
    bus = EventBus(max_batch_events=None, max_pending_events=None)
    app = FastAPI()
    bus.install(app)

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> int:
        return len([bus.emit("many") for _ in range(10_001)])  # over both defaults' first

    assert TestClient(app).post("/").json() == 10_001


async def test_unfinished_spooled_events_are_reported_and_released_at_shutdown(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Broker()
    broker.up = False
    broker.retry = Retry(attempts=1000, initial_delay=0.01, max_delay=0.01, total_timeout=30)
    discarded: list[DiscardedEvents] = []
    bus = EventBus(spool=path, shutdown_timeout=0.1, on_discard=discarded.append)
    bus.forward("order.*", broker)
    publishing = asyncio.create_task(bus.publish("order.placed"))
    await asyncio.sleep(0.05)  # the broker is down: the send keeps retrying
    with caplog.at_level(logging.ERROR):
        unfinished = await bus.close()
    event = await publishing
    assert unfinished == [event]
    (report,) = discarded
    assert report.events == (event,)
    assert "stay in the spool" in report.reason
    assert "stay in the spool" in caplog.text
    (pending,) = Spool(path).pending()
    assert pending.event == event
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT lease_until FROM pending").fetchall() == [(0,)]  # due now


def test_an_unreadable_row_is_set_aside_not_retried_forever(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(path)
    spool.add(
        [("broker", Event(name="order.placed", id="fine")), ("broker", Event(name="x", id="bad"))]
    )
    with sqlite3.connect(path) as db:  # written by a newer version, or damaged
        db.execute(
            """UPDATE pending SET event = '{"name": "x", "new_field": 1}' WHERE event_id = 'bad'"""
        )
    spool.release()
    assert [c.event.id for c in spool.claim()] == ["fine"]
    (dead,) = spool.dead()  # listed, not an error that hides the other dead rows
    assert (dead.event.id, dead.event.name, dead.readable) == ("bad", "x", False)
    assert dead.error is not None
    assert "spooled event bad for broker is unreadable: ValidationError" in dead.error
    assert "event bad for forwarder broker dead-lettered" in caplog.text


@pytest.mark.parametrize(
    ("event_id", "raw"),
    [("bad", '{"name": " x", "broken'), ("bad\nid", '{"name": "x", "broken')],
    ids=["name-with-spaces", "id-with-a-line-break"],
)
def test_a_damaged_row_with_a_name_or_id_emit_refuses_is_set_aside(
    path: Path, event_id: str, raw: str
) -> None:
    """Found: the stand-in event of such a row could not be built: every claim raised, and
    the good rows behind it were never sent, nor the damaged one dead-lettered."""
    left = Spool(path)
    left.add([("broker", Event(name="order.placed", id=f"good-{n}")) for n in range(3)])
    left.release()
    with sqlite3.connect(path) as db:  # damaged, and older than the good rows
        db.execute(
            "INSERT INTO pending (forwarder, event_id, event, created, attempts, owner,"
            " lease_until) VALUES ('broker', ?, ?, 0, 0, '', 0)",
            (event_id, raw),
        )
    spool = Spool(path)
    assert sorted(c.event.id for c in spool.claim()) == ["good-0", "good-1", "good-2"]
    (dead,) = spool.dead()
    assert (dead.event.id, dead.readable) == (event_id, False)


async def test_a_row_whose_event_id_is_not_its_key_is_set_aside_not_resent_forever(
    path: Path,
) -> None:
    """Found: settled by the event's id, such a row (copied by hand, or damaged) was never
    leased nor deleted: the resend loop sent it thousands of times a second."""
    left = Spool(path)
    left.add([("broker", Event(name="order.placed", id="a"))])
    left.release()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE pending SET event_id = 'b'")
    broker = Broker()
    bus = spooled_bus(path, broker)
    for _ in range(3):
        await bus.resend()
    assert broker.received == []
    spool = Spool(path)
    assert spool.count().pending == 0
    (dead,) = spool.dead()
    assert (dead.event.id, dead.readable) == ("b", False)
    assert dead.error is not None
    assert "is not the row's" in dead.error


def poison_row(path: Path, event_id: str, depth: int = 100_000, forwarder: str = "broker") -> None:
    """Write, by hand, a due row whose JSON nests deeper than Python's recursion limit
    (json.loads raises RecursionError, not a ValueError), older than every other row."""
    nested = "[" * depth + "]" * depth
    raw = f'{{"name": "order.placed", "payload": {nested}, "id": "{event_id}"}}'
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO pending (forwarder, event_id, event, created, attempts, owner,"
            " lease_until) VALUES (?, ?, ?, 0, 0, '', 0)",
            (forwarder, event_id, raw),
        )


async def test_events_for_a_forwarder_this_bus_lacks_are_reported_when_given_up(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows of a forwarder since renamed (or of another application sharing the spool)
    wait, with a WARNING, until no round is left: then they are dead-lettered with an
    ERROR naming them and ``on_discard`` (they were buried with the WARNING only)."""
    left = Spool(path)
    left.add([("old-name", Event(name="order.placed", id="orphan"))])
    left.release()
    poison_row(path, "unreadable-orphan", forwarder="old-name")
    discards: list[DiscardedEvents] = []
    spool = Spool(path, max_attempts=2, retry_delay=0.001, max_retry_delay=0.001)
    bus = EventBus(spool=spool, on_discard=discards.append)
    bus.forward("*", Broker())
    for _ in range(4):
        await bus.resend()
        await asyncio.sleep(0.01)
    assert sorted(id for report in discards for id in report.ids) == [
        "orphan",
        "unreadable-orphan",
    ]
    assert all("old-name" in report.reason for report in discards)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("orphan" in line and "old-name" in line for line in errors)
    assert {dead.event.id for dead in spool.dead()} == {"orphan", "unreadable-orphan"}


async def test_a_poison_row_does_not_hold_up_the_good_rows_behind_it(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Another process spooled five events and died before sending them.
    good = [Event(name="order.placed", id=f"good-{n}", payload={"n": n}) for n in range(5)]
    left = Spool(path)
    left.add([("broker", event) for event in good])
    left.release()
    poison_row(path, "poison")
    broker = Broker()
    bus = spooled_bus(path, broker)
    app = FastAPI()
    bus.install(app)
    with TestClient(app):  # the lifespan's resend loop: the real path
        for _ in range(300):
            if len(broker.received) == 5 and broker.dead:
                break
            await asyncio.sleep(0.01)
    assert sorted(broker.received) == [event.id for event in good]
    (report,) = broker.dead  # the app hears of it through the forwarder's dead_letter
    assert report.ids == ["poison"]
    assert "RecursionError" in report.reason
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "poison" in r.message]
    assert len(errors) == 1  # once, not a traceback every second
    spool = Spool(path)
    assert spool.count().pending == 0
    (dead,) = spool.dead()
    assert (dead.event.id, dead.event.name, dead.readable) == ("poison", "order.placed", False)


# -- the file on disk -------------------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)  # the usual default: files world-readable
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("umask_022")
def test_the_spool_files_are_readable_by_their_owner_only(path: Path) -> None:
    spool = Spool(path)
    spool.add([("broker", Event(name="order.placed", payload={"card": "4111..."}))])
    modes = {
        suffix: stat.S_IMODE(Path(f"{path}{suffix}").stat().st_mode)
        for suffix in ("", "-wal", "-shm")
    }
    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}


def test_a_spool_file_every_user_can_read_is_warned_about(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Spool(path).close()
    path.chmod(0o644)  # made by an older version, or by hand
    Spool(path)
    assert "can be read or written by every user (mode 0o644)" in caplog.text
    assert "chmod 600" in caplog.text


def _wal_size(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_the_write_ahead_log_stays_small(path: Path) -> None:
    spool = Spool(path)
    biggest = 0
    for n in range(1500):  # each event written, then removed: what a running app does
        event = Event(name="order.placed", payload={"n": n, "text": "x" * 1000})
        spool.add([("broker", event)])
        spool.sent("broker", [event])
        biggest = max(biggest, _wal_size(path))
    assert biggest < 1024 * 1024  # SQLite's default let it reach 4 MB and stay there


def test_a_write_that_finds_the_disk_full_empties_the_write_ahead_log(path: Path) -> None:
    spool = Spool(path)
    spool.add([("broker", Event(name="order.placed", payload="x" * 1000)) for _ in range(50)])
    assert _wal_size(path) > 0
    db = spool._connect()
    ((pages,),) = db.execute("PRAGMA page_count").fetchall()
    db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own SQLITE_FULL, simulated
    with pytest.raises(SpoolError, match="database or disk is full"):
        spool.add([("broker", Event(name="order.placed", payload="x" * 100_000))])
    assert _wal_size(path) == 0  # what the log held is in the database: its space is free
    db.execute("PRAGMA max_page_count = 1073741823")  # space returns
    spool.add([("broker", Event(name="order.placed", id="after"))])
    assert spool.count().pending == 51


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB file system of its own (tmpfs: needs root, as in CI)."""
    mountpoint = tmp_path / "volume"
    mountpoint.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mountpoint)],
            capture_output=True,
            text=True,
            check=False,
        )
        failure = mounted.stderr.strip() if mounted.returncode != 0 else None
    except OSError as exc:  # no mount command
        failure = str(exc)
    if failure is not None:
        missing_peer(f"cannot mount a small tmpfs: {failure}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _fill(directory: Path) -> Path:
    """Take every free byte of *directory*'s volume with one file."""
    ballast = directory / "ballast"
    with ballast.open("wb") as file:
        try:
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        except OSError:
            pass
    return ballast


async def test_a_spool_on_a_small_volume_does_not_fill_it(small_volume: Path) -> None:
    broker = Broker()
    bus = spooled_bus(small_volume / "spool.sqlite3", broker)
    app = FastAPI()
    bus.install(app)

    @app.post("/orders")
    async def place(events: Bus) -> str:
        return events.emit("order.placed", {"text": "x" * 1000}).id

    with TestClient(app) as client:  # each event written, sent, removed: the log is reused
        sent = [client.post("/orders").json() for _ in range(1500)]
    assert sorted(broker.received) == sorted(sent)
    assert _wal_size(small_volume / "spool.sqlite3") < 1024 * 1024


async def test_emits_refused_on_a_full_volume_work_again_once_space_returns(
    small_volume: Path,
) -> None:
    path = small_volume / "spool.sqlite3"
    broker = Broker(send_timeout=0.05)  # its sends end well within the lease
    broker.up = False  # events pile up in the spool
    bus = spooled_bus(path, broker, lease=0.2)
    accepted: list[str] = []
    refused: list[str] = []

    async def emit() -> None:
        try:
            accepted.append((await bus.publish("order.placed", {"text": "x" * 1000})).id)
        except SpoolError as exc:  # refused where it was made: the caller knows
            refused.append(str(exc))

    ballast = _fill(small_volume)  # something else takes the space
    for _ in range(3000):
        await emit()
        if refused:
            break
    assert "disk is full" in refused[0]
    ballast.unlink()  # space returns
    broker.up = True
    for _ in range(50):
        await emit()
    assert len(refused) == 1  # every emit after the space returned was accepted
    for _ in range(100):  # what piled up is sent too
        await asyncio.sleep(0.05)
        await bus.resend()
        if len(broker.received) == len(accepted):
            break
    assert sorted(broker.received) == sorted(accepted)
    assert Spool(path).count().pending == 0


def test_a_new_process_with_a_dead_ones_pid_takes_its_events_over(path: Path) -> None:
    # A container restarted: same host, same pid (often 1), but another process.
    old = Spool(path)
    host, pid, _, tag = old.owner.rsplit(":", 3)
    old.owner = f"{host}:{pid}:1:{tag}"  # started at another time than this process
    old.add([("broker", Event(name="order.placed", id="from-before"))])
    assert [c.event.id for c in Spool(path).claim()] == ["from-before"]


def _unshare_works() -> bool:
    try:
        done = subprocess.run(
            ["unshare", "-Urpf", "--mount-proc", "true"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


_CLAIM = (
    "import sys; from fastapi_eventbus.spool import Spool; "
    "print(' '.join(sorted(c.event.id for c in Spool(sys.argv[1]).claim())))"
)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _unshare_works(),
    reason="needs `unshare -Urpf --mount-proc` (Linux, user and PID namespaces allowed)",
)
def test_a_process_in_another_pid_namespace_never_takes_a_live_ones_rows(path: Path) -> None:
    """Found: two containers of one pod (one host name, their own PID namespaces) sharing a
    spool on an emptyDir: the other container could not see this process's pid, took it for
    dead, and took its rows (leased 120 s, being sent) at once: sent twice. Its lease applies
    now; what is due is still claimed."""
    alive = Spool(path)
    done = Spool(path)
    try:
        alive.add([("broker", Event(name="order.placed", id="being-sent"))])
        done.add([("broker", Event(name="order.placed", id="due"))])
        done.release()
        claimed = subprocess.run(
            ["unshare", "-Urpf", "--mount-proc", sys.executable, "-c", _CLAIM, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert claimed.stdout.split() == ["due"]  # not "being-sent": its process runs
    finally:
        alive.close()
        done.close()


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="no PID namespaces here")
def test_the_owner_mark_names_the_pid_namespace(path: Path) -> None:
    """Found: a row's owner mark named the host alone (``host:pid:...``), so a process
    in another PID namespace on the same host read the pid as one of its own, found it
    not running, and took the rows of a live process. The mark names the namespace."""
    namespace = os.stat("/proc/self/ns/pid").st_ino
    spool = Spool(path)
    try:
        host = spool.owner.rsplit(":", 3)[0]
    finally:
        spool.close()
    assert host == f"{socket.gethostname()}/{namespace}"


def test_only_a_mark_of_this_pid_namespace_or_an_old_one_is_known_gone() -> None:
    """How `owner_gone` reads marks: a pid of this namespace that no longer runs is gone;
    one of another namespace (or host) is not, whatever it is here; a mark of an earlier
    release (the host's name alone) is read as it was then."""
    unused = 2**22 + 1  # above Linux's pid_max: no process has it
    name = socket.gethostname()
    host = f"{name}/4026531836"
    assert owner_gone(f"{host}:{unused}::abcd1234", host)
    assert not owner_gone(f"{name}/4026532000:{unused}::abcd1234", host)
    assert not owner_gone(f"other-host/4026531836:{unused}::abcd1234", host)
    assert owner_gone(f"{name}:{unused}::abcd1234", host)  # an old mark, as before
    assert not owner_gone(f"other-host:{unused}::abcd1234", host)
    assert not owner_gone(f"{host}:{os.getpid()}::abcd1234", host)  # this one runs
    assert not owner_gone("", host)


def test_a_forwarder_whose_send_may_outlast_the_lease_is_refused(path: Path) -> None:
    """Found: ``Spool(lease=2)`` with a forwarder retrying for 8 s was accepted; during an
    outage the resend loop took the row over (its lease ran out) while the request's own
    send still retried it: one process sent the event twice. Refused where they meet."""
    slow = Broker(retry=Retry(total_timeout=8.0), send_timeout=1.0)
    bus = EventBus(spool=Spool(path, lease=2.0))
    with pytest.raises(ConfigurationError) as refused:
        bus.forward("order.*", slow)
    message = str(refused.value)
    assert "may take 9s for one send" in message
    assert "lease=2s" in message
    assert bus.forward("order.*", Broker(send_timeout=0.5)) is not None  # 2 tries: 1.001s


def test_a_forwarder_without_a_send_timeout_on_a_spool_is_a_warning(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A send without a time limit may outlast any lease: a WARNING, not a refusal (such a
    forwarder may be right, with a send that ends in its own way)."""
    bus = EventBus(spool=Spool(path, lease=30.0))
    with caplog.at_level(logging.WARNING, logger="fastapi_eventbus"):
        bus.forward("order.*", Broker(send_timeout=None))
    assert "forwarder broker has no send_timeout" in caplog.text
    assert "lease (30s)" in caplog.text


def test_the_spool_implements_the_storage_contract(path: Path) -> None:
    """`fastapi_eventbus.storage.Storage` is what the bus needs of a spool (issue 15, item 3)."""
    spool = Spool(path)
    try:
        assert isinstance(spool, Storage)
        assert spool.name == str(path)
    finally:
        spool.close()


def test_settle_sends_buries_and_counts_rounds(path: Path) -> None:
    sent, refused, failing = (Event(name="x") for _ in range(3))
    spool = Spool(path, max_attempts=1)
    try:
        spool.add([("f", sent), ("f", refused), ("f", failing)])
        settled = spool.settle(
            "f",
            [sent, refused, failing],
            dead=[(refused, "refused")],
            unsent=[failing],
            error="down",
        )
        assert settled.spent == (failing,)
        assert settled.reason == "gave up after 1 rounds: down"
        assert spool.pending() == []
        buried = {item.event.id: item.error for item in spool.dead()}
        assert buried == {refused.id: "refused", failing.id: settled.reason}
    finally:
        spool.close()


async def test_a_storage_that_breaks_while_settling_a_send_is_reported_by_id(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: the flush gathered its sends with ``return_exceptions=True`` and dropped what
    they raised: a storage whose bookkeeping failed with anything but `SpoolError` (a custom
    one's bug) left its events with no log line; they were sent again later, unexplained."""

    class Broken(Spool):
        def settle(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug in the storage")

    broker = Broker()
    bus = EventBus(spool=Broken(path, retry_delay=0.001))
    bus.forward("order.*", broker)
    with caplog.at_level(logging.ERROR, "fastapi_eventbus"):
        event = await bus.publish("order.placed")
    (line,) = [r.getMessage() for r in caplog.records if event.id in r.getMessage()]
    assert "they stay in the storage, to be sent again" in line
    assert Spool(path).count().pending == 1


async def test_a_storage_that_breaks_while_settling_a_resend_is_reported_by_id(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: the same bug in a resend (the spool's events sent again) raised out of
    `resend`, logged by the resender as a traceback with no event id, and the other
    forwarders' sends of that round were not waited for."""

    class Broken(Spool):
        broken = False

        def settle(self, *args: Any, **kwargs: Any) -> Any:
            if self.broken:
                raise RuntimeError("a bug in the storage")
            return super().settle(*args, **kwargs)

    broker, other = Broker(), Broker("other")
    spool = Broken(path, retry_delay=0.001)
    bus = EventBus(spool=spool)
    bus.forward("order.*", broker)
    bus.forward("order.*", other)
    broker.up = other.up = False
    event = await bus.publish("order.placed")  # unsent: kept in the spool
    broker.up = other.up = True
    spool.broken = True
    await asyncio.sleep(0.01)  # due again (retry_delay)
    with caplog.at_level(logging.ERROR, "fastapi_eventbus"):
        assert await bus.resend() == 2
    lines = [r.getMessage() for r in caplog.records if event.id in r.getMessage()]
    assert len(lines) == 2
    assert all("they stay in the storage, to be sent again" in line for line in lines)
    assert broker.received == other.received == [event.id]


def test_a_resend_ignoring_its_cancellation_does_not_hold_the_shutdown(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: the lifespan's exit cancelled the spool's resender and waited for it with no
    time limit: a forwarder with no ``send_timeout`` whose send ignored its cancellation
    kept the bus's shutdown (and the application's exit) waiting. It is left running after
    a grace second, with an ERROR; its events stay in the spool. (asyncio's own exit still
    waits for such a task: nothing can stop code that ignores its cancellation.)"""
    released = threading.Event()
    sending = threading.Event()
    ended: list[float] = []

    class Stubborn(Broker):
        async def send(self, events: Sequence[Event]) -> Delivery | None:
            if not self.up:
                raise ForwarderError("broker down", transient=True)
            sending.set()
            while not released.is_set():
                with suppress(asyncio.CancelledError):  # ignored
                    await asyncio.sleep(0.05)
            self.received += [event.id for event in events]
            return None

    broker = Stubborn()
    broker.send_timeout = None
    spool = Spool(path, retry_delay=0.001, resend_interval=0.05)
    bus = EventBus(spool=spool, shutdown_timeout=1.0)
    bus.forward("order.*", broker)
    broker.up = False
    event = asyncio.run(bus.publish("order.placed"))  # kept in the spool
    asyncio.run(bus.close())
    broker.up = True

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:  # runs once the bus's shutdown is over
            ended.append(time.monotonic())
            released.set()  # else asyncio's own exit would wait for the send

    app = FastAPI(lifespan=lifespan)
    bus.install(app)
    ending = threading.Timer(15, released.set)  # on the old code: the exit's only end
    ending.start()
    try:
        with caplog.at_level(logging.ERROR, "fastapi_eventbus"), TestClient(app):
            assert sending.wait(10)  # the resender is sending it: the app exits now
            began = time.monotonic()
    finally:
        released.set()
        ending.cancel()
    assert ended[0] - began < 5, ended[0] - began
    assert any("resend still ran" in r.getMessage() for r in caplog.records), caplog.messages
    assert broker.received == [event.id]  # it went on once released, and was sent
    assert Spool(path).count().pending == 0


class Boom(BaseException):
    """A library's own `BaseException` that is not an `Exception` (as gevent's ``Timeout``)."""


async def test_a_send_raising_a_base_exception_is_dead_lettered_not_resent_forever(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: a send raising a `BaseException` that is not an `Exception` ended its task with
    it, which the flush and `resend` took for no failure: the spooled row was never
    settled, so it was sent again at every round with its attempts never counted, and
    never reported. It is a permanent failure: dead-lettered by id, in the spool too."""

    class Raising(Broker):
        error: BaseException | None = None

        async def send(self, events: Sequence[Event]) -> Delivery | None:
            if self.error is not None:
                raise self.error
            return await super().send(events)

    broker = Raising()
    broker.up = False
    bus = spooled_bus(path, broker, max_attempts=3)
    kept = await bus.publish("order.placed", {"n": 0})  # unsent: kept, for `resend`
    broker.up, broker.error = True, Boom("boom")
    flushed = await bus.publish("order.placed", {"n": 1})  # through the flush
    await asyncio.sleep(0.01)  # the kept one is due again (retry_delay)
    with caplog.at_level(logging.ERROR, "fastapi_eventbus"):
        assert await bus.resend() == 1
        assert await bus.resend() == 0  # nothing left to send again
    spool = bus.spool
    assert spool is not None
    assert sorted(event_id for d in broker.dead for event_id in d.ids) == sorted(
        [kept.id, flushed.id]
    )
    assert sorted(row.event.id for row in spool.dead()) == sorted([kept.id, flushed.id])
    assert all("Boom('boom')" in (row.error or "") for row in spool.dead())
    assert spool.count().pending == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(kept.id in line for line in errors), errors
