"""A broker outage with default settings and no spool, in a real uvicorn process.

``python -m uvicorn tests.test_outage:create_app --factory`` serves an app whose
``POST /orders`` emits one ``order.placed`` event, forwarded by an `SQSForwarder`
with its default `Retry` to moto's SQS server (in this process), through a
`tests._proxy.Proxy` that refuses connections for 3 s or 10 s while requests keep
coming. The app's ``dead_letter`` callback writes the ids it is given to a file.

Events are counted by id: emitted (what the server answered), received from the
queue, dead-lettered (the callback's file, and the ERROR lines of the log). With
the default ``total_timeout`` of 30 s these outages lose nothing and dead-letter
nothing; an event neither received nor dead-lettered would be lost silently.

Each test prints its figures (run with ``-s``) and records them with
``record_property``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI

from fastapi_eventbus import EventBus, get_bus
from fastapi_eventbus.forwarders import DeadLetter
from fastapi_eventbus.forwarders.sqs import SQSForwarder
from tests._proxy import Proxy
from tests.forwarders._moto import Moto
from tests.test_faults import moto, proxy, running_server, start_server

__all__ = ["moto", "proxy"]  # the fault tests' fixtures: a moto server and a proxy in front of it

pytestmark = pytest.mark.slow

QUEUE_ENV = "OUTAGE_QUEUE_URL"
ENDPOINT_ENV = "OUTAGE_SQS_ENDPOINT"
DEAD_ENV = "OUTAGE_DEAD_LETTERS"
VERIFY_ENV = "OUTAGE_VERIFY_ON_START"
APP = "tests.test_outage:create_app"
RATE = 20
"""Requests a second, one event each."""
Record = Callable[[str, object], None]


# -- the application, in the uvicorn process --------------------------------------------------


def create_app() -> FastAPI:
    """The app: ``POST /orders`` emits one ``order.placed`` event and returns its id."""
    handler = logging.StreamHandler()  # level and logger in every line, for the test to count
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fastapi_eventbus").addHandler(handler)
    dead_letters = Path(os.environ[DEAD_ENV])

    def keep(letter: DeadLetter) -> None:
        with dead_letters.open("a") as file:
            file.writelines(f"{event_id}\n" for event_id in letter.ids)

    bus = EventBus()
    forwarder = SQSForwarder(  # default retry, no spool
        os.environ[QUEUE_ENV],
        endpoint_url=os.environ[ENDPOINT_ENV],
        dead_letter=keep,
        verify_on_start=os.environ.get(VERIFY_ENV) == "1",
    )
    bus.forward("order.*", forwarder)
    app = FastAPI()
    bus.install(app)

    @app.post("/orders")
    async def place(bus: Annotated[EventBus, Depends(get_bus)]) -> str:
        return bus.emit("order.placed", {"item": "book"}).id

    return app


# -- the test side ----------------------------------------------------------------------------


@dataclass
class Load:
    """Posts *RATE* requests a second in a thread, keeping the event id each one returns."""

    url: str
    ids: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            begin = time.monotonic()
            number = 0
            while not self._stop.is_set():
                response = client.post("/orders")
                response.raise_for_status()
                self.ids.append(response.json())
                number += 1
                self._stop.wait(max(0.0, begin + number / RATE - time.monotonic()))

    def stop(self) -> list[str]:
        """Stop posting; the ids of the events the server accepted."""
        self._stop.set()
        self._thread.join(timeout=15)
        assert not self._thread.is_alive(), "a request hung"
        return self.ids


def dead_lettered(path: Path) -> Counter[str]:
    """The ids the app's dead-letter callback was given, with how often."""
    return Counter(path.read_text().split()) if path.exists() else Counter()


def logged_as_error(output: str) -> set[str]:
    """The ids named in the server's ERROR lines."""
    errors = [line for line in output.splitlines() if line.startswith("ERROR fastapi_eventbus: ")]
    return {match for line in errors for match in re.findall(r"[0-9a-f-]{36}", line)}


@pytest.mark.parametrize("outage", [3.0, 10.0], ids=["3s", "10s"])
def test_a_broker_outage_loses_nothing_with_default_settings(
    moto: Moto, proxy: Proxy, tmp_path: Path, outage: float, record_property: Record
) -> None:
    queue_url = moto.queue("outage")
    dead_file = tmp_path / "dead-letters"
    env = {QUEUE_ENV: queue_url, ENDPOINT_ENV: proxy.endpoint, DEAD_ENV: str(dead_file)}
    with running_server(env, tmp_path / "server.log", app=APP) as server:
        load = Load(server.url)
        time.sleep(1.0)
        proxy.down()
        time.sleep(outage)
        proxy.heal()
        time.sleep(1.0)
        emitted = load.stop()

        def accounted(received: Counter[str]) -> bool:
            return set(emitted) <= received.keys() | dead_lettered(dead_file).keys()

        # Every event is sent or given up on within total_timeout (30 s) of its first try.
        received = asyncio.run(moto.collect_ids(queue_url, accounted, timeout=45))
    output = server.output()
    dead = dead_lettered(dead_file)
    lost = set(emitted) - received.keys() - dead.keys()
    unreported = set(emitted) - received.keys() - (dead.keys() & logged_as_error(output))
    warnings = [line for line in output.splitlines() if line.startswith("WARNING fastapi_eventbus")]
    figures = {
        "outage_seconds": outage,
        "events_emitted": len(emitted),
        "events_delivered": len(received.keys() & set(emitted)),
        "duplicates": received.total() - len(received),
        "dead_lettered": len(dead),
        "lost_silently": len(lost),
        "unreported": len(unreported),
        "warning_lines": len(warnings),
    }
    for name, value in figures.items():
        record_property(name, value)
    print("\n" + "\n".join(f"  {name.replace('_', ' ')}: {v}" for name, v in figures.items()))
    assert len(emitted) >= RATE * outage  # requests kept coming during the outage
    assert not lost
    assert not dead, f"{len(dead)} event(s) dead-lettered by a {outage:g}s outage"
    assert received.keys() == set(emitted)
    assert 0 < len(warnings) < 20, "\n".join(warnings)  # not one per retry per event


def test_a_missing_queue_stops_uvicorn_with_verify_on_start(moto: Moto, tmp_path: Path) -> None:
    queue_url = f"{moto.endpoint}/123456789012/no-such-queue"
    env = {
        QUEUE_ENV: queue_url,
        ENDPOINT_ENV: moto.endpoint,
        DEAD_ENV: str(tmp_path / "dead-letters"),
        VERIFY_ENV: "1",
    }
    server = start_server(env, tmp_path / "server.log", app=APP)
    try:
        code = server.process.wait(timeout=30)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    output = server.output()
    assert code != 0, output
    assert "Application startup failed. Exiting." in output
    assert (
        "ForwarderError: forwarder SQSForwarder failed its start-up check "
        f"(verify_on_start=True): GetQueueAttributes on {queue_url}: "
        "AWS.SimpleQueueService.NonExistentQueue (HTTP 400)"
    ) in output
