"""Fixtures of the worker tests: one moto SQS server for all of them, a database file.

``pubsub_emulator`` (Google's Pub/Sub emulator, started once per run) is the root conftest's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.forwarders._moto import Moto, running_moto
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
