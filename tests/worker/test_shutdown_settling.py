"""Stopping a worker while a message's acknowledgement (or give-back) is under way."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.testing import MemorySource
from fastapi_eventbus.worker import ReceivedMessage, Worker, WorkerStats

pytestmark = pytest.mark.anyio


class SettlingHangs(MemorySource):
    """A `MemorySource` whose acknowledgements and give-backs never return."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.settling = asyncio.Event()

    async def ack(self, message: ReceivedMessage) -> None:
        self.settling.set()
        await asyncio.Event().wait()

    async def nack(self, message: ReceivedMessage, delay: float | None = None) -> None:
        if delay == 0:  # the worker's give-back at shutdown: would hide the double count
            await super().nack(message, delay)
            return
        self.settling.set()
        await asyncio.Event().wait()


def worker_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "fastapi_eventbus.worker" and r.levelno >= logging.WARNING
    ]


async def test_stop_while_an_acknowledgement_hangs_reports_the_message_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found: the message was counted ``handled`` *and* ``unfinished``, and the WARNING said
    it was cancelled to "go back for redelivery" though its handlers had succeeded; no line
    said its acknowledgement did not finish. It is a handled message whose acknowledgement
    failed (``settle_errors``), like any other acknowledgement that does not finish."""
    bus = EventBus()
    bus.on("order.*")(lambda event: None)
    source = SettlingHangs(name="source")
    source.put(Event(name="order.placed"), message_id="m0")
    async with Worker(bus, source, shutdown_timeout=0.1) as worker:
        await asyncio.wait_for(source.settling.wait(), 5)
    assert worker.stats == WorkerStats(received=1, handled=1, settle_errors=1)
    assert source.acked == []
    lines = worker_lines(caplog)
    assert not [line for line in lines if line.startswith("cancelling")], lines
    assert [line for line in lines if "m0" in line] == [
        "could not acknowledge message m0 on source (cancelled at shutdown); "
        "it may be delivered again"
    ]


async def test_stop_while_a_give_back_hangs_reports_the_message_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same for a failed message: ``failed`` and a settle error, not ``unfinished``."""
    bus = EventBus()

    @bus.on("order.*")
    async def fails(event: Event) -> None:
        raise RuntimeError("boom")

    source = SettlingHangs(name="source")
    source.put(Event(name="order.placed"), message_id="m0")
    async with Worker(bus, source, shutdown_timeout=0.1) as worker:
        await asyncio.wait_for(source.settling.wait(), 5)
    assert worker.stats == WorkerStats(received=1, failed=1, settle_errors=1)
    lines = worker_lines(caplog)
    assert not [line for line in lines if line.startswith("cancelling")], lines
    assert (
        "could not give back message m0 on source (cancelled at shutdown); "
        "it may be delivered again"
    ) in lines
