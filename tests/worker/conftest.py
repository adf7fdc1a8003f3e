"""Fixtures of the worker tests: one moto SQS server for all of them, a database file.

``pubsub_emulator`` is the forwarder tests' fixture (Google's Pub/Sub emulator, started
once per session), made available here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.forwarders._moto import Moto, running_moto
from tests.forwarders.test_pubsub import pubsub_emulator as pubsub_emulator
from tests.worker.shop import DB_ENV


@pytest.fixture(scope="package")
def moto() -> Iterator[Moto]:
    with running_moto() as server:
        yield server


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The SQLite file of `tests.worker.shop.worker_app`, for this process and its workers."""
    path = tmp_path / "shop.sqlite3"
    monkeypatch.setenv(DB_ENV, str(path))
    return path
