"""`SQSForwarder` through a broker outage: moto's SQS behind a `tests._proxy.Proxy` that goes down.

With the default `Retry`, an outage shorter than its ``total_timeout`` loses nothing.
While batches are being retried, the log gets a line per attempt number, not one per
retry per batch; a batch that is given up on gets one ERROR line with all its ids.
Events are counted by id: emitted, received from the queue, dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest

from fastapi_eventbus import Event
from fastapi_eventbus.forwarders import DeadLetter, DeliveryOutcome, Retry
from fastapi_eventbus.forwarders.sqs import SQSForwarder
from fastapi_eventbus.wire import decode_message
from tests._proxy import Proxy
from tests.forwarders._moto import KEY_ID, REGION, SECRET, Moto
from tests.test_faults import moto, proxy

__all__ = ["moto", "proxy"]  # the fault tests' fixtures: a moto server and a proxy in front of it

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


def through(
    proxy: Proxy, queue_url: str, dead: list[DeadLetter], retry: Retry | None = None
) -> SQSForwarder:
    """An `SQSForwarder` reaching *queue_url* through *proxy*, dead-lettering into *dead*."""
    return SQSForwarder(
        queue_url,
        endpoint_url=proxy.endpoint,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        retry=retry,
        dead_letter=dead.append,
    )


def orders(batch: int, count: int) -> list[Event]:
    return [Event(name="order.placed", payload={"batch": batch, "n": n}) for n in range(count)]


async def test_a_3s_outage_loses_nothing_with_the_default_retry(
    moto: Moto, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_eventbus")
    url = await moto.create_queue()
    dead: list[DeadLetter] = []
    forwarder = through(proxy, url, dead)
    assert forwarder.retry == Retry()
    emitted: list[Event] = []
    sends: list[asyncio.Future[DeliveryOutcome]] = []
    async with forwarder:
        proxy.down()
        down_at = time.monotonic()
        for batch in range(3):  # a batch at 0 s, 1 s and 2 s into the outage
            emitted += orders(batch, 5)
            sends.append(asyncio.ensure_future(forwarder.deliver(emitted[-5:])))
            await asyncio.sleep(1.0)
        await asyncio.sleep(3.0 - (time.monotonic() - down_at))
        proxy.heal()
        outcomes = await asyncio.wait_for(asyncio.gather(*sends), timeout=30)
    assert dead == []
    assert [outcome.lost for outcome in outcomes] == [0, 0, 0]
    received = [decode_message(m).id for m in await moto.receive_async(url, len(emitted))]
    assert sorted(received) == sorted(event.id for event in emitted)  # each once
    assert "SQSForwarder: sending again after" in caplog.text


async def test_an_outage_logs_a_line_per_attempt_not_per_batch_and_one_error_per_batch(
    moto: Moto, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    url = await moto.create_queue()
    dead: list[DeadLetter] = []
    retry = Retry(initial_delay=0.05, max_delay=0.2, total_timeout=1.5)
    batches = [orders(batch, 3) for batch in range(20)]  # 20 requests' flushes
    async with through(proxy, url, dead, retry) as forwarder:
        proxy.down()
        await asyncio.gather(*(forwarder.deliver(batch) for batch in batches))

    ours = [r for r in caplog.records if r.name == "fastapi_eventbus"]
    warnings = [r.getMessage() for r in ours if r.levelno == logging.WARNING]
    errors = [r.getMessage() for r in ours if r.levelno == logging.ERROR]
    tries = [int(re.findall(r"gave up after (\d+) attempt", d.reason)[0]) for d in dead]
    assert 1 < len(warnings) <= max(tries)  # not 20 batches x the retries
    assert all(
        re.match(r"forwarder SQSForwarder: attempt \d+ failed for 3 event\(s\) \(.*cannot reach", m)
        for m in warnings
    )
    assert any("event(s) of other batches wait too" in m for m in warnings)
    # One ERROR line per batch, with all its ids; the same batches reach the hook.
    expected = sorted(", ".join(event.id for event in batch) for batch in batches)
    assert sorted(m.rsplit(": ", 1)[1] for m in errors) == expected
    assert sorted(", ".join(letter.ids) for letter in dead) == expected
