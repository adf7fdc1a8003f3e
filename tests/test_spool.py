"""The spool (in this process): written at emit, emptied on delivery, resent, dead-lettered.

The crash, outage and shutdown tests with real processes and moto's SQS are in
``tests/test_faults.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

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
from fastapi_eventbus.exceptions import ForwarderError
from fastapi_eventbus.forwarders import DeadLetter, Delivery, Forwarder, Retry
from fastapi_eventbus.spool import Spool

pytestmark = pytest.mark.anyio

Bus = Annotated[EventBus, Depends(get_bus)]
QUICK = Retry(attempts=2, initial_delay=0.001, max_delay=0.001)


class Broker(Forwarder):
    """A forwarder whose broker can be down (transient) or refuse events for good."""

    loop_bound = False

    def __init__(self, name: str = "broker") -> None:
        self.dead: list[DeadLetter] = []
        super().__init__(name=name, retry=QUICK, dead_letter=self.dead.append)
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
        ({"lease": 0}, "lease must be a number > 0"),
        ({"max_attempts": 0}, "max_attempts must be an int >= 1"),
        ({"resend_interval": "1"}, "resend_interval must be a number > 0"),
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
    assert bus._core.max_batch_events is None


async def test_unfinished_spooled_events_are_reported_and_released_at_shutdown(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Broker()
    broker.up = False
    broker.retry = Retry(attempts=1000, initial_delay=0.01, max_delay=0.01, total_timeout=60)
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


def test_an_unreadable_row_is_set_aside_not_retried_forever(path: Path) -> None:
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
    (dead,) = Spool(path)._read("SELECT event_id, reason FROM dead")
    assert dead[0] == "bad"
    assert "is unreadable" in str(dead[1])
    with pytest.raises(SpoolError, match="spooled event bad for broker is unreadable"):
        spool.dead()


def test_a_new_process_with_a_dead_ones_pid_takes_its_events_over(path: Path) -> None:
    # A container restarted: same host, same pid (often 1), but another process.
    old = Spool(path)
    host, pid, _, tag = old.owner.rsplit(":", 3)
    old.owner = f"{host}:{pid}:1:{tag}"  # started at another time than this process
    old.add([("broker", Event(name="order.placed", id="from-before"))])
    assert [c.event.id for c in Spool(path).claim()] == ["from-before"]
