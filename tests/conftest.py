"""Shared fixtures: a fresh app with an installed bus for every test."""

from __future__ import annotations

import os
import sysconfig
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

import fastapi_eventbus
from fastapi_eventbus import DiscardedEvents, EventBus, HandlerFailure

if TYPE_CHECKING:
    from tests._postgres import Postgres
    from tests._pubsub import Emulator


# CI's run against the built wheel: .ci/run installs the wheel and runs this suite from the
# unpacked sdist, without its fastapi_eventbus/ directory, with
# FASTAPI_EVENTBUS_EXPECT_INSTALLED=1. The package under test must then be the installed
# wheel, never a source tree.


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("FASTAPI_EVENTBUS_EXPECT_INSTALLED") != "1":
        return
    package = Path(fastapi_eventbus.__file__).resolve()
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    if not package.is_relative_to(site_packages):
        pytest.exit(
            f"FASTAPI_EVENTBUS_EXPECT_INSTALLED=1 but fastapi_eventbus was imported from "
            f"{package}, not from {site_packages}",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Hooks:
    """Records what the bus reports through its hooks."""

    failures: list[HandlerFailure] = field(default_factory=list)
    discards: list[DiscardedEvents] = field(default_factory=list)


@pytest.fixture
def hooks() -> Hooks:
    return Hooks()


@pytest.fixture
def bus(hooks: Hooks) -> EventBus:
    return EventBus(on_error=hooks.failures.append, on_discard=hooks.discards.append)


@pytest.fixture
def app(bus: EventBus) -> FastAPI:
    app = FastAPI()
    bus.install(app)
    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run *app* on a real uvicorn server on 127.0.0.1 and yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def missing_peer(reason: str) -> NoReturn:
    """A real peer (broker, emulator) is unavailable: skip here, fail in CI (``CI=true``)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"required test peer missing in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[Emulator]:
    """Google's Pub/Sub emulator, started once for the whole run (forwarder and worker tests)."""
    from tests._pubsub import running_emulator

    with running_emulator() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster, started once for the whole run (the outbox tests)."""
    from tests._postgres import running_postgres

    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres: Postgres) -> Iterator[str]:
    """A fresh database for one test, as an asyncpg SQLAlchemy URL; dropped after the test."""
    database = postgres.create_database()
    yield postgres.url(database=database)
    postgres.drop_database(database)
