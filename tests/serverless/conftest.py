"""Fixtures of the serverless tests: one moto SQS server for all of them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.forwarders._moto import Moto, running_moto


@pytest.fixture(scope="package")
def moto() -> Iterator[Moto]:
    with running_moto() as server:
        yield server
