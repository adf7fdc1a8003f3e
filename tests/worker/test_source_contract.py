"""The shared `SourceContract` run against `MemorySource` and the shipped sources."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from fastapi_eventbus import Event
from fastapi_eventbus.forwarders import Forwarder
from fastapi_eventbus.forwarders.pubsub import PubSubForwarder
from fastapi_eventbus.testing import MemorySource
from fastapi_eventbus.worker import PubSubSource
from tests._pubsub import PROJECT, Channel, Emulator
from tests.contracts.source import MakeSource, Send, SourceContract
from tests.forwarders._moto import Moto


def forwarding(forwarder: Forwarder) -> Send:
    """Send events with *forwarder*, checking they all went."""

    async def send(events: Sequence[Event]) -> None:
        async with forwarder:
            outcome = await forwarder.deliver(events)
        assert outcome.lost == 0, outcome

    return send


class TestMemorySource(SourceContract):
    quiet = 0.3

    @pytest.fixture
    def memory(self) -> MemorySource:
        return MemorySource(wait_time=0.1)

    @pytest.fixture
    def make_source(self, memory: MemorySource) -> MakeSource:
        return lambda: memory

    @pytest.fixture
    def send(self, memory: MemorySource) -> Send:
        async def put(events: Sequence[Event]) -> None:
            for event in events:
                memory.put(event)

        return put


@pytest.mark.slow
class TestSQSSource(SourceContract):
    @pytest.fixture
    def queue_url(self, moto: Moto) -> str:
        return moto.queue("contract")

    @pytest.fixture
    def make_source(self, moto: Moto, queue_url: str) -> MakeSource:
        return lambda: moto.source(queue_url)

    @pytest.fixture
    def send(self, moto: Moto, queue_url: str) -> Send:
        return forwarding(moto.forwarder(queue_url))


@pytest.mark.slow
class TestPubSubSource(SourceContract):
    @pytest.fixture
    def channel(self, pubsub_emulator: Emulator) -> Channel:
        return pubsub_emulator.channel()

    @pytest.fixture
    def make_source(self, channel: Channel) -> MakeSource:
        path = f"projects/{PROJECT}/subscriptions/{channel.subscription}"
        return lambda: PubSubSource(path, emulator_host=channel.emulator.host, pull_timeout=1.0)

    @pytest.fixture
    def send(self, channel: Channel) -> Send:
        return forwarding(PubSubForwarder(channel.topic, emulator_host=channel.emulator.host))
