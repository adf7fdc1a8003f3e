"""The shared `ForwarderContract` run against every shipped forwarder."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator

import pytest

from fastapi_eventbus.forwarders import EchoForwarder
from fastapi_eventbus.forwarders.pubsub import PubSubForwarder
from fastapi_eventbus.testing import RecordingForwarder
from fastapi_eventbus.wire import decode_message
from tests._pubsub import Channel, Emulator
from tests.contracts.forwarder import ForwarderContract, MakeForwarder, ReceivedIds
from tests.forwarders._moto import Moto, running_moto


class TestRecordingForwarder(ForwarderContract):
    @pytest.fixture
    def recorder(self) -> RecordingForwarder:
        return RecordingForwarder()

    @pytest.fixture
    def make_forwarder(self, recorder: RecordingForwarder) -> MakeForwarder:
        return lambda: recorder

    @pytest.fixture
    def received_ids(self, recorder: RecordingForwarder) -> ReceivedIds:
        async def ids(count: int) -> list[str]:
            return [event.id for event in recorder.events]

        return ids


class TestEchoForwarder(ForwarderContract):
    @pytest.fixture
    def stream(self) -> io.StringIO:
        return io.StringIO()

    @pytest.fixture
    def make_forwarder(self, stream: io.StringIO) -> MakeForwarder:
        return lambda: EchoForwarder(stream, name="echo")

    @pytest.fixture
    def received_ids(self, stream: io.StringIO) -> ReceivedIds:
        async def ids(count: int) -> list[str]:
            return [json.loads(line)["id"] for line in stream.getvalue().splitlines()]

        return ids

    @pytest.fixture
    def make_failing_forwarder(self) -> MakeForwarder:
        closed = io.StringIO()
        closed.close()  # writing raises ValueError: not a failure a retry fixes
        return lambda: EchoForwarder(closed, name="echo")


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with running_moto() as server:
        yield server


@pytest.mark.slow
class TestSQSForwarder(ForwarderContract):
    @pytest.fixture
    def queue_url(self, moto: Moto) -> str:
        return moto.queue("contract")

    @pytest.fixture
    def make_forwarder(self, moto: Moto, queue_url: str) -> MakeForwarder:
        return lambda: moto.forwarder(queue_url)

    @pytest.fixture
    def received_ids(self, moto: Moto, queue_url: str) -> ReceivedIds:
        async def ids(count: int) -> list[str]:
            got = await moto.collect_ids(queue_url, lambda c: c.total() >= count, timeout=10)
            return list(got.elements())

        return ids

    @pytest.fixture
    def make_failing_forwarder(self, moto: Moto, queue_url: str) -> MakeForwarder:
        return lambda: moto.forwarder(f"{queue_url}-missing")


@pytest.mark.slow
class TestPubSubForwarder(ForwarderContract):
    @pytest.fixture
    def channel(self, pubsub_emulator: Emulator) -> Channel:
        return pubsub_emulator.channel()

    @pytest.fixture
    def make_forwarder(self, channel: Channel) -> MakeForwarder:
        return lambda: PubSubForwarder(channel.topic, emulator_host=channel.emulator.host)

    @pytest.fixture
    def received_ids(self, channel: Channel) -> ReceivedIds:
        async def ids(count: int) -> list[str]:
            items = await asyncio.to_thread(channel.pull, count)
            return [decode_message(item).id for item in items]

        return ids

    @pytest.fixture
    def make_failing_forwarder(self, channel: Channel) -> MakeForwarder:
        topic = f"{channel.topic}-missing"
        return lambda: PubSubForwarder(topic, emulator_host=channel.emulator.host)
