"""Shared fixtures: a fresh app with an installed bus for every test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fastapi_eventbus import DiscardedEvents, EventBus, HandlerFailure


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
