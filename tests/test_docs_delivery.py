"""docs/examples/delivery.py does what docs/delivery.md says it does."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from fastapi.testclient import TestClient

from fastapi_eventbus import Event
from fastapi_eventbus.forwarders import Delivery, Forwarder
from fastapi_eventbus.spool import Spool, SpoolCounts
from tests._support import ROOT, load_module
from tests.conftest import serve


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_module(ROOT / "docs/examples/delivery.py", monkeypatch, "docs_delivery")


class Orders(Forwarder):
    """A broker that refuses what it is told to, and can hold sends until released."""

    loop_bound = False

    def __init__(self) -> None:
        super().__init__(name="orders")
        self.refusing = False
        self.received: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    async def send(self, events: Sequence[Event]) -> Delivery | None:
        await asyncio.to_thread(self.gate.wait)  # the server's loop and the test's thread
        if self.refusing:
            return Delivery(rejected=list(events), reason="400 malformed")
        self.received += [event.id for event in events]
        return None


def test_an_emitted_event_is_delivered_and_leaves_the_spool(
    example: ModuleType, tmp_path: Path
) -> None:
    orders = Orders()
    app = example.create_app(tmp_path / "spool.sqlite3", orders)
    with TestClient(app) as client:
        event_id = client.post("/orders").json()["event"]
    assert orders.received == [event_id]
    assert Spool(tmp_path / "spool.sqlite3").count().pending == 0


def test_dead_letters_are_listed_and_replayed(
    example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    orders, path = Orders(), tmp_path / "spool.sqlite3"
    orders.refusing = True
    with TestClient(example.create_app(path, orders)) as client:
        event_id = client.post("/orders").json()["event"]
        assert Spool(path).count().dead == 1
        orders.refusing = False
        assert example.review_dead_letters(path) == 1
        assert f"orders {event_id} order.placed rejected: 400 malformed" in capsys.readouterr().out
        # The running app's lifespan sends it within its resend interval.
        for _ in range(300):
            if orders.received:
                break
            threading.Event().wait(0.01)
    assert orders.received == [event_id]
    assert Spool(path).count() == SpoolCounts(pending=0, dead=0)


@pytest.mark.slow
def test_a_full_bus_answers_503_with_retry_after(example: ModuleType, tmp_path: Path) -> None:
    orders = Orders()
    app = example.create_app(tmp_path / "spool.sqlite3", orders, max_pending=2)  # reached quickly
    orders.gate.clear()  # the broker stalls: sends wait, events stay pending
    with serve(app) as url:
        statuses = [httpx.post(f"{url}/orders").status_code for _ in range(3)]
        refused = httpx.post(f"{url}/orders")
        orders.gate.set()
    assert statuses == [201, 201, 503]
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"
    assert "max_pending_events" in refused.json()["detail"]
    assert len(orders.received) == 2


def test_every_test_the_page_names_exists() -> None:
    """docs/delivery.md names a test for each claim: each must exist, so no claim outlives its
    test."""
    page = (ROOT / "docs/delivery.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", page)
    assert len(named) > 30
    for path, function in named:
        source = (ROOT / path).read_text()
        assert not function or re.search(rf"def {function}\b", source), f"{path}::{function}"


def test_a_mounted_app_whose_lifespan_the_outer_app_runs_is_served(
    example: ModuleType, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    orders = Orders()
    main = example.mount_shop(example.create_app(tmp_path / "spool.sqlite3", orders))
    with TestClient(main) as client:
        event_id = client.post("/shop/orders").json()["event"]
    assert orders.received == [event_id]
    assert Spool(tmp_path / "spool.sqlite3").count().pending == 0
    assert not [r for r in caplog.records if "lifespan is not running" in r.getMessage()]
