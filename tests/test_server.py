"""Through a real uvicorn server: the response reaches the client before handlers finish."""

import threading
import time

import httpx
from fastapi import Depends, FastAPI

from fastapi_eventbus import Event, EventBus, get_bus
from tests.conftest import serve


def test_the_response_arrives_while_a_slow_handler_is_still_running() -> None:
    bus = EventBus()
    app = FastAPI()
    bus.install(app)
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    @bus.on("report.requested")
    def build_report(event: Event) -> None:  # sync: runs in the threadpool
        started.set()
        release.wait(timeout=10)
        finished.set()

    @app.post("/reports")
    async def request_report(bus: EventBus = Depends(get_bus)) -> dict[str, str]:
        bus.emit("report.requested", {"id": 1})
        return {"status": "accepted"}

    with serve(app) as base_url:
        begin = time.monotonic()
        response = httpx.post(f"{base_url}/reports", timeout=5)
        elapsed = time.monotonic() - begin
        assert response.json() == {"status": "accepted"}
        assert started.wait(timeout=5), "the handler never started"
        assert not finished.is_set(), "the handler finished before the response arrived"
        assert elapsed < 5
        release.set()
        assert finished.wait(timeout=5)


def test_shutdown_of_a_real_server_drains_in_flight_handlers() -> None:
    bus = EventBus(shutdown_timeout=5)
    app = FastAPI()
    bus.install(app)
    started, finished = threading.Event(), threading.Event()

    @bus.on("slow")
    def slow(event: Event) -> None:
        started.set()
        time.sleep(0.5)
        finished.set()

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("slow")

    with serve(app) as base_url:
        httpx.post(base_url, timeout=5)
        assert started.wait(timeout=5)
    # serve() has asked uvicorn to exit and joined it: the handler must have completed.
    assert finished.is_set()
