"""docs/examples/broker.py, the broker of docs/brokers.md: the contract suites, and one run
from ``emit`` through its forwarder and its source to a worker's handler."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_eventbus import Event, EventBus, SourceError, get_bus
from fastapi_eventbus.worker import Worker
from tests._support import ROOT, load_module, until
from tests.contracts.forwarder import ForwarderContract, MakeForwarder, ReceivedIds
from tests.contracts.source import MakeSource, Send, SourceContract, orders, receive


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_module(ROOT / "docs/examples/broker.py", monkeypatch, "docs_broker")


@pytest.fixture
def queue(tmp_path: Path) -> Path:
    """A fresh queue: an empty directory."""
    path = tmp_path / "orders"
    path.mkdir()
    return path


def left(queue: Path) -> list[str]:
    """The files in *queue*, waiting or claimed (none once every message is settled)."""
    return sorted(path.name for path in [*queue.glob("*.json"), *queue.glob("claimed/*")])


def sent_ids(queue: Path) -> list[str]:
    """The event ids of the messages waiting in *queue*."""
    return [json.loads(path.read_bytes())["event"]["id"] for path in queue.glob("*.json")]


def forwarded(example: ModuleType, queue: Path) -> Send:
    """Send events to *queue* with the example's forwarder, checking they all went."""

    async def send(events: Sequence[Event]) -> None:
        async with example.DirectoryForwarder(queue) as forwarder:
            outcome = await forwarder.deliver(events)
        assert outcome.lost == 0, outcome

    return send


class TestDirectoryForwarder(ForwarderContract):
    @pytest.fixture
    def make_forwarder(self, example: ModuleType, queue: Path) -> MakeForwarder:
        return lambda: example.DirectoryForwarder(queue)

    @pytest.fixture
    def received_ids(self, queue: Path) -> ReceivedIds:
        async def ids(count: int) -> list[str]:
            return sent_ids(queue)

        return ids

    @pytest.fixture
    def make_failing_forwarder(self, example: ModuleType, tmp_path: Path) -> MakeForwarder:
        return lambda: example.DirectoryForwarder(tmp_path / "missing")


class TestDirectorySource(SourceContract):
    @pytest.fixture
    def make_source(self, example: ModuleType, queue: Path) -> MakeSource:
        return lambda: example.DirectorySource(queue)

    @pytest.fixture
    def send(self, example: ModuleType, queue: Path) -> Send:
        return forwarded(example, queue)


@pytest.mark.anyio
async def test_a_claim_past_its_visibility_timeout_is_delivered_again(
    example: ModuleType, queue: Path
) -> None:
    (event,) = orders(1)
    await forwarded(example, queue)([event])
    async with example.DirectorySource(queue, visibility_timeout=0.2) as source:
        (first,) = await receive(source, 1)
        await source.extend(first)  # the heartbeat: 0.2s more from now
        (again,) = await receive(source, 1, timeout=5)  # its worker is gone
        assert source.decode(again).id == event.id
        assert again.receipt != first.receipt
        with pytest.raises(SourceError):
            await source.ack(first)  # the late worker cannot settle the new delivery
        await source.ack(again)
    assert left(queue) == []


@pytest.mark.anyio
async def test_a_nack_without_a_delay_waits_the_retry_delay(
    example: ModuleType, queue: Path
) -> None:
    await forwarded(example, queue)(orders(1))
    async with example.DirectorySource(queue) as source:
        source.retry_delay = 0.5
        (first,) = await receive(source, 1)
        await source.nack(first)
        given_back = time.monotonic()
        (again,) = await receive(source, 1)
        assert time.monotonic() - given_back >= 0.4
        await source.ack(again)


@pytest.mark.anyio
async def test_a_missing_queue_stops_the_worker(example: ModuleType, tmp_path: Path) -> None:
    worker = Worker(EventBus(), example.DirectorySource(tmp_path / "missing"))
    with pytest.raises(SourceError, match="no queue directory"):
        await worker.run()


@pytest.mark.anyio
async def test_what_is_not_a_message_of_the_broker_is_refused(
    example: ModuleType, queue: Path
) -> None:
    (queue / "1-junk.json").write_text("not json")
    bus = EventBus()
    async with Worker(bus, example.DirectorySource(queue), on_undecodable="delete") as worker:
        await until(lambda: worker.stats.undecodable == 1)
    assert left(queue) == []


# --8<-- [start:end-to-end]
def test_each_emitted_event_is_handled_once_by_the_worker(example: ModuleType, queue: Path) -> None:
    web = EventBus()  # the web app forwards...
    web.forward("order.*", example.DirectoryForwarder(queue))
    app = FastAPI()
    web.install(app)

    @app.post("/orders/{number}")
    async def place(number: int, bus: Annotated[EventBus, Depends(get_bus)]) -> str:
        return bus.emit("order.placed", {"number": number}).id

    with TestClient(app) as client:
        emitted = [client.post(f"/orders/{number}").json() for number in range(20)]

    worker_bus, handled, failed = EventBus(), Counter[str](), set[str]()  # ...a worker handles

    @worker_bus.on("order.placed")
    async def book(event: Event) -> None:
        if event.payload["number"] == 7 and event.id not in failed:  # fails once, comes again
            failed.add(event.id)
            raise RuntimeError("the ledger is busy")
        handled[event.id] += 1

    async def work() -> None:
        source = example.DirectorySource(queue)
        source.retry_delay = 0.1
        async with Worker(worker_bus, source) as worker:
            await until(lambda: worker.stats.handled == len(emitted))
        assert (worker.stats.failed, worker.stats.settle_errors) == (1, 0)

    asyncio.run(work())
    assert handled == Counter(emitted)  # every event once
    assert left(queue) == []  # nothing waits, nothing is claimed
    # --8<-- [end:end-to-end]
