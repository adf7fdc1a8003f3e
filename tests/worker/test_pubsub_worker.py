"""The worker against Google's Pub/Sub emulator: in another process (the CLI), and in-process."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from fastapi_eventbus import ConfigurationError, Event, EventBus, MissingExtraError, SourceError
from fastapi_eventbus.forwarders.pubsub import PubSubForwarder
from fastapi_eventbus.worker import Backoff, PubSubSource, ReceivedMessage, Worker, WorkerStats
from tests._pubsub import PROJECT, Channel, Emulator
from tests._support import until
from tests.worker._helpers import wait_for, worker_process
from tests.worker.shop import execute, web_app

pytestmark = pytest.mark.slow


def subscription_path(channel: Channel) -> str:
    return f"projects/{PROJECT}/subscriptions/{channel.subscription}"


def publish_raw(channel: Channel, data: bytes) -> str:
    """Publish a message that no forwarder wrote; its message id."""
    url = f"http://{channel.emulator.host}/v1/{channel.topic}:publish"
    body = {"messages": [{"data": base64.b64encode(data).decode()}]}
    response = httpx.post(url, json=body)
    response.raise_for_status()
    message_id: str = response.json()["messageIds"][0]
    return message_id


def test_a_worker_process_handles_what_the_web_app_published(
    pubsub_emulator: Emulator, db: Path, tmp_path: Path
) -> None:
    channel = pubsub_emulator.channel()
    options = ["--pubsub", subscription_path(channel), "--emulator-host", pubsub_emulator.host]
    options += ["--on-undecodable", "delete"]
    forwarder = PubSubForwarder(channel.topic, emulator_host=pubsub_emulator.host)
    with worker_process("tests.worker.shop:worker_app", *options, log=tmp_path / "w.log") as worker:
        with TestClient(web_app(forwarder)) as client:
            ids = [
                client.post("/orders", json=order).json()["id"]
                for order in ({"item": "book"}, {"item": "kettle", "fail_times": 1})
            ]
        raw_id = publish_raw(channel, b"not json")
        # Nacked, the failing one comes back after nack_backoff's first delay (1 s).
        wait_for(lambda: len(execute(db, "SELECT * FROM handled")) == 2, 20, "2 handled")
        wait_for(lambda: raw_id in worker.output(), what="the undecodable message's log line")
        assert worker.terminate() == 0, worker.output()
    rows = execute(db, "SELECT event_id, pid FROM handled")
    assert sorted(rows) == sorted((event_id, worker.process.pid) for event_id in ids)
    ((attempts,),) = execute(db, "SELECT COUNT(*) FROM attempts WHERE event_id = ?", ids[1])
    assert attempts == 2  # nacked, redelivered, handled
    assert worker.process.pid != os.getpid()
    assert channel.pull(1, timeout=1.5) == []  # everything acknowledged, the bad one too


@pytest.mark.anyio
async def test_failures_are_nacked_and_redelivered_in_process(pubsub_emulator: Emulator) -> None:
    channel = pubsub_emulator.channel()
    bus = EventBus()
    attempts: dict[str, int] = {}

    @bus.on("order.*")
    async def flaky(event: Event) -> None:
        attempts[event.id] = attempts.get(event.id, 0) + 1
        if attempts[event.id] == 1:
            raise RuntimeError("first delivery fails")

    publisher = EventBus()
    publisher.forward("order.*", PubSubForwarder(channel.topic, emulator_host=pubsub_emulator.host))
    ids = [(await publisher.publish("order.placed", {"n": n})).id for n in range(3)]
    await publisher.close()
    source = PubSubSource(subscription_path(channel), emulator_host=pubsub_emulator.host)
    async with Worker(bus, source, concurrency=2) as worker:
        await until(lambda: worker.stats.handled == 3, timeout=20)  # back after about 1 s
    assert worker.stats == WorkerStats(received=6, handled=3, failed=3)
    assert attempts == dict.fromkeys(ids, 2)
    assert channel.pull(1, timeout=1.5) == []


@pytest.mark.anyio
async def test_a_pull_that_times_out_is_an_empty_receive(pubsub_emulator: Emulator) -> None:
    channel = pubsub_emulator.channel()
    source = PubSubSource(
        subscription_path(channel), emulator_host=pubsub_emulator.host, pull_timeout=0.5
    )
    async with source:
        started = time.monotonic()
        assert await source.receive(1) == []
        assert time.monotonic() - started < 5


@pytest.mark.anyio
async def test_a_failing_message_comes_back_with_backoff_not_in_a_tight_loop(
    pubsub_emulator: Emulator,
) -> None:
    channel = pubsub_emulator.channel()  # no retry policy on the subscription
    bus = EventBus()
    deliveries: list[float] = []

    @bus.on("order.*")
    async def broken(event: Event) -> None:
        deliveries.append(time.monotonic())
        raise RuntimeError("always fails")

    publisher = EventBus()
    publisher.forward("order.*", PubSubForwarder(channel.topic, emulator_host=pubsub_emulator.host))
    await publisher.publish("order.placed")
    await publisher.close()
    source = PubSubSource(
        subscription_path(channel),
        emulator_host=pubsub_emulator.host,
        nack_backoff=Backoff(initial=1.0, maximum=60.0),
    )
    async with Worker(bus, source):
        await until(lambda: len(deliveries) >= 1, timeout=10)
        await asyncio.sleep(6)
    # Backoff: at most after 1 s, 2 s (and 4 s) in those 6 s. Given back at once, the message
    # would come back dozens of times. (The emulator's redelivery timing varies: it is only
    # trusted to hold the message back, not to the second.)
    assert 1 <= len(deliveries) <= 4, len(deliveries)


class DeadlineRecorder:
    """Stands in for the SDK client: records each ``modify_ack_deadline``."""

    def __init__(self) -> None:
        self.deadlines: list[tuple[str, int]] = []

    async def modify_ack_deadline(
        self, subscription: str, ack_ids: list[str], seconds: int
    ) -> None:
        self.deadlines += [(ack_id, seconds) for ack_id in ack_ids]


@pytest.mark.anyio
async def test_nack_backoff_counts_failures_per_message() -> None:
    source = PubSubSource("projects/shop/subscriptions/orders", emulator_host="127.0.0.1:1")
    recorder = source._client = DeadlineRecorder()  # type: ignore[assignment]
    first = ReceivedMessage(body={}, message_id="m1", receipt="a1")
    other = ReceivedMessage(body={}, message_id="m2", receipt="a2")
    counted = ReceivedMessage(body={}, message_id="m3", receipt="a3", receive_count=5)
    for message in (first, first, other, first, counted):
        await source.nack(message)
    await source.nack(first, delay=0)  # an explicit delay wins (shutdown gives back at once)
    assert recorder.deadlines == [("a1", 1), ("a1", 2), ("a2", 1), ("a1", 4), ("a3", 16), ("a1", 0)]


@pytest.mark.anyio
async def test_a_message_with_no_message_id_backs_off_longer_at_each_delivery() -> None:
    """Found: an item of a pull answer without its ``messageId`` was named after its
    ``ackId``, which changes at every delivery: each give-back counted as its first, so it
    came back every second, forever. It is now named after its content."""
    source = PubSubSource("projects/shop/subscriptions/orders", emulator_host="127.0.0.1:1")
    recorder = source._client = DeadlineRecorder()  # type: ignore[assignment]
    message = {"data": "bm90IGFuIGV2ZW50", "attributes": {"type": "x"}}
    names = set()
    for delivery in range(3):
        received = source._read({"ackId": f"ack-{delivery}", "message": message}, False)
        assert received is not None
        names.add(received.message_id)
        await source.nack(received)
    assert recorder.deadlines == [("ack-0", 1), ("ack-1", 2), ("ack-2", 4)]
    (name,) = names
    assert "ack-" not in name
    other = source._read({"ackId": "ack-3", "message": {**message, "data": "b3RoZXI="}}, False)
    assert other is not None
    assert other.message_id != name


@pytest.mark.anyio
async def test_a_missing_subscription_stops_the_worker(pubsub_emulator: Emulator) -> None:
    missing = f"projects/{PROJECT}/subscriptions/no-such-subscription"
    worker = Worker(EventBus(), PubSubSource(missing, emulator_host=pubsub_emulator.host))
    with pytest.raises(SourceError, match="HTTP 404") as caught:
        await worker.run()
    assert not caught.value.transient


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"subscription": "orders"}, "subscription must be a full path"),
        ({"max_messages": 0}, "max_messages must be an int >= 1"),
        ({"pull_timeout": 0}, "pull_timeout must be > 0"),
        ({"api_root": "http://a/v1", "emulator_host": "b:1"}, "not both"),
    ],
)
def test_pubsub_source_settings(options: dict[str, Any], message: str) -> None:
    options.setdefault("subscription", "projects/shop/subscriptions/orders")
    with pytest.raises(ConfigurationError, match=message):
        PubSubSource(**options)


def test_pubsub_source_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    source = PubSubSource("projects/shop/subscriptions/orders")
    assert (source.name, source.api_root, source.emulated) == (
        "orders",
        "https://pubsub.googleapis.com/v1",
        False,
    )
    assert (
        repr(source) == "<PubSubSource 'orders' subscription='projects/shop/subscriptions/orders'>"
    )
    with pytest.raises(SourceError, match="has not started"):
        source.client  # noqa: B018


def test_pubsub_source_names_the_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gcloud.aio.pubsub", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"fastapi-eventbus-di\[gcp\]"):
        PubSubSource("projects/shop/subscriptions/orders")


@pytest.mark.anyio
async def test_a_pull_the_broker_never_answers_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found: a broker that takes the connection and never answers (a stalled proxy) left the
    worker pulling and timing out with no log line at all: an outage nobody could see."""

    answered = asyncio.Event()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(65536)
            await answered.wait()  # never, until the test ends
        finally:
            writer.close()

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    source = PubSubSource(
        "projects/shop/subscriptions/orders", emulator_host=f"127.0.0.1:{port}", pull_timeout=0.2
    )
    await source.start()
    try:
        with caplog.at_level(logging.WARNING, "fastapi_eventbus.worker"):
            assert await source.receive(10) == []
    finally:
        await source.close()
        answered.set()
        server.close()
        await server.wait_closed()
    (warning,) = [r.getMessage() for r in caplog.records if "no answer" in r.getMessage()]
    assert "orders: a pull got no answer within pull_timeout (0.2s)" in warning


async def publish_lines(channel: Channel, *lines: tuple[str, int]) -> list[str]:
    """Publish ``order.line`` events ``{"order": key, "n": n}``, in this order, as a
    `PubSubForwarder` with each order's key as its ordering key does; their event ids."""
    publisher = EventBus()
    forwarder = PubSubForwarder(
        channel.topic,
        emulator_host=channel.emulator.host,
        ordering_key=lambda event: str(event.payload["order"]),
    )
    publisher.forward("order.*", forwarder)
    ids = [(await publisher.publish("order.line", {"order": o, "n": n})).id for o, n in lines]
    await publisher.close()
    return ids


@pytest.mark.anyio
async def test_messages_with_one_ordering_key_are_handled_in_their_order(
    pubsub_emulator: Emulator,
) -> None:
    """Found: a `PubSubSource` handled the messages of one ordering key concurrently, so a
    slow first message finished after the ones published after it: the order a
    `PubSubForwarder(ordering_key=...)` and an ordered subscription keep was lost in the
    worker. Like an SQS FIFO queue's groups, each key's messages now run one after the
    other; keys run concurrently."""
    channel = pubsub_emulator.channel(ordered=True)
    bus = EventBus()
    finished: list[tuple[str, int]] = []

    @bus.on("order.*")
    async def handle(event: Event) -> None:
        if event.payload["n"] == 0:
            await asyncio.sleep(0.5)  # the first of its key is the slowest
        finished.append((event.payload["order"], event.payload["n"]))

    await publish_lines(channel, ("o-1", 0), ("o-1", 1), ("o-2", 0), ("o-1", 2), ("o-2", 1))
    source = PubSubSource(subscription_path(channel), emulator_host=pubsub_emulator.host)
    async with Worker(bus, source, concurrency=5) as worker:
        await until(lambda: worker.stats.handled == 5, timeout=20)
    for order in ("o-1", "o-2"):
        assert [n for key, n in finished if key == order] == sorted(
            n for key, n in finished if key == order
        )
    assert len(finished) == 5
    assert channel.pull(1, timeout=1.5) == []


@pytest.mark.anyio
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
async def test_a_failed_message_holds_back_the_later_ones_of_its_key_if_the_subscription_orders(
    pubsub_emulator: Emulator, ordered: bool
) -> None:
    """The first message of a key fails once: from an ordered subscription, the later ones of
    that key go back unhandled with it, and Pub/Sub delivers them again in their order;
    another key is not held.

    Found: the worker did so from a subscription without message ordering too (Pub/Sub
    hands the key over all the same): each give-back counted toward the dead-letter policy,
    for messages whose order nothing keeps. Keys are kept in order now only from a
    subscription that orders (read from it, or ``ordered=``)."""
    channel = pubsub_emulator.channel(ordered=ordered)
    bus = EventBus()
    finished: list[tuple[str, int]] = []
    failed: list[int] = []
    running: list[Worker] = []

    @bus.on("order.*")
    async def handle(event: Event) -> None:
        key, n = event.payload["order"], event.payload["n"]
        if key == "o-1" and n == 0 and not failed:
            failed.append(n)
            await until(lambda: running and running[0].stats.received >= 4)  # the later ones
            raise RuntimeError("first delivery fails")
        finished.append((key, n))

    await publish_lines(channel, ("o-1", 0), ("o-1", 1), ("o-2", 0), ("o-1", 2))
    source = PubSubSource(
        subscription_path(channel),
        emulator_host=pubsub_emulator.host,
        nack_backoff=Backoff(initial=0.1, maximum=0.1),
    )
    async with Worker(bus, source, concurrency=4) as worker:
        running.append(worker)
        await until(lambda: len(finished) == 4, timeout=30)
    assert worker.stats.failed == 1
    assert source.ordered is ordered
    if ordered:
        assert [n for key, n in finished if key == "o-1"] == [0, 1, 2]
        assert worker.stats.held_back >= 1
    else:
        assert worker.stats.held_back == 0
    assert channel.pull(1, timeout=1.5) == []


@pytest.mark.anyio
@pytest.mark.parametrize("ack_deadline", [None, 10], ids=["no heartbeat", "heartbeat"])
async def test_an_ordered_subscription_learned_at_the_first_pull_warns_once_without_a_heartbeat(
    pubsub_emulator: Emulator, caplog: pytest.LogCaptureFixture, ack_deadline: int | None
) -> None:
    """Found: with the defaults (``ordered=None``, read at the first pull with a key, and no
    ``ack_deadline``) a worker on an ordered subscription never warned that a message
    waiting for the one before it keeps only the ack deadline it was pulled with: the
    start-time check saw ``ordered`` None. It now warns once, when the source learns it;
    with a heartbeat, not at all."""
    channel = pubsub_emulator.channel(ordered=True)
    bus = EventBus()
    handled: list[str] = []
    bus.on("order.*")(lambda event: handled.append(event.id))
    ids = await publish_lines(channel, ("o-1", 0), ("o-1", 1))
    source = PubSubSource(
        subscription_path(channel), emulator_host=pubsub_emulator.host, ack_deadline=ack_deadline
    )
    with caplog.at_level(logging.WARNING, "fastapi_eventbus.worker"):
        async with Worker(bus, source, concurrency=2):
            await until(lambda: len(handled) == 2, timeout=20)
            ids += await publish_lines(channel, ("o-1", 2))  # a second pull with a key
            await until(lambda: len(handled) == 3, timeout=20)
    assert handled == ids
    assert source.ordered is True
    lines = [r.getMessage() for r in caplog.records if "no heartbeat" in r.getMessage()]
    if ack_deadline is None:
        (line,) = lines
        assert line.startswith(f"{source.name} keeps each group's messages in order")
    else:
        assert lines == []


class PullRewriter:
    """An HTTP proxy in front of the emulator that breaks items of the first pull answer
    holding messages, as a faulty broker or middlebox would: *broken* maps a
    message's position in that answer to the field it loses (``messageId``, ``ackId``),
    or, if the field is in *replaced*, gets that value instead (``orderingKey``)."""

    def __init__(
        self,
        upstream: str,
        broken: dict[int, str],
        deny_get: tuple[int, int] = (0, 0),
        fail_acks: int = 0,
        replaced: dict[str, Any] | None = None,
        get_answer: Any = None,
    ) -> None:
        self.upstream, self.broken, self.replaced = upstream, broken, replaced or {}
        self.deny_get = deny_get  # (HTTP status, how many GET requests it answers)
        self.fail_acks = fail_acks  # the first acknowledge requests answered 503
        self.get_answer = get_answer  # a 200 answer to the first GET request, not the emulator's
        self.lost: dict[str, str] = {}  # the broken items' message id -> the field it lost
        self._runner: Any = None
        self.host = ""

    async def __aenter__(self) -> PullRewriter:
        from aiohttp import web

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)  # a pull may be waiting
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.host = f"127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()

    async def _relay(self, request: Any) -> Any:
        from aiohttp import web

        status, times = self.deny_get
        if times and request.method == "GET":  # 403: no pubsub.subscriptions.get
            self.deny_get = (status, times - 1)
            return web.json_response({"error": {"code": status}}, status=status)
        if self.get_answer is not None and request.method == "GET":
            answer, self.get_answer = self.get_answer, None
            return web.json_response(answer)
        if self.fail_acks and request.path.endswith(":acknowledge"):
            self.fail_acks -= 1
            return web.json_response({"error": {"code": 503}}, status=503)
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with httpx.AsyncClient(timeout=None) as client:  # pulls wait for messages
            url = f"http://{self.upstream}{request.path_qs}"
            answer = await client.request(request.method, url, content=body, headers=headers)
        if not request.path.endswith(":pull") or self.lost or answer.status_code != 200:
            kind = answer.headers.get("Content-Type", "application/json")
            return web.Response(
                body=answer.content,
                status=answer.status_code,
                content_type=None,
                headers={"Content-Type": kind},
            )
        pulled = answer.json()
        for position, field in self.broken.items():
            items = pulled.get("receivedMessages", [])
            if position < len(items):
                item = items[position]
                self.lost[item["message"]["messageId"]] = field
                if field in self.replaced:
                    item["message"][field] = self.replaced[field]
                else:
                    (item["message"] if field == "messageId" else item).pop(field)
        return web.json_response(pulled)


@pytest.mark.anyio
async def test_a_malformed_item_in_a_pull_answer_fails_that_message_alone(
    pubsub_emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: one item of a pull answer without its ``messageId`` or ``ackId`` failed the
    whole pull, so every other message it carried stayed unhandled until its ack deadline.
    Now the others are handled at once; an item that has its ``ackId`` is undecodable (the
    worker's ``on_undecodable``: given back, delivered again, handled); one without can be
    neither acknowledged nor given back: an ERROR names it, and Pub/Sub delivers it again
    at its ack deadline."""
    channel = pubsub_emulator.channel()
    bus = EventBus()
    handled: list[str] = []

    @bus.on("order.*")
    async def handle(event: Event) -> None:
        handled.append(event.id)

    publisher = EventBus()
    publisher.forward("order.*", PubSubForwarder(channel.topic, emulator_host=pubsub_emulator.host))
    ids = [(await publisher.publish("order.placed", {"n": n})).id for n in range(4)]
    await publisher.close()
    async with PullRewriter(pubsub_emulator.host, {0: "messageId", 1: "ackId"}) as proxy:
        source = PubSubSource(
            subscription_path(channel),
            emulator_host=proxy.host,
            nack_backoff=Backoff(initial=0.1, maximum=0.1),
        )
        with caplog.at_level(logging.ERROR, "fastapi_eventbus"):
            async with Worker(bus, source, concurrency=4) as worker:
                await until(lambda: len(proxy.lost) == 2, timeout=10)
                # All but the one without an ack id, which waits for its ack deadline (10 s).
                await until(lambda: len(handled) == 3, timeout=5)
                await until(lambda: len(handled) == 4, timeout=20)
    assert sorted(handled) == sorted(ids)
    assert worker.stats.undecodable == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    without_ack = next(i for i, field in proxy.lost.items() if field == "ackId")
    (line,) = [e for e in errors if f"(messageId={without_ack})" in e]
    assert "no ackId" in line
    assert any("no messageId" in e for e in errors), errors
    assert channel.pull(1, timeout=1.5) == []


@pytest.mark.anyio
@pytest.mark.parametrize("status", [403, 503])
async def test_a_subscription_that_cannot_be_read_keeps_ordering_keys_in_order(
    pubsub_emulator: Emulator, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    """Without ``pubsub.subscriptions.get`` (403) the source cannot tell whether the
    subscription orders messages: a WARNING says so and how to tell it, and keys are kept
    in order. A passing failure (503) is asked again at the next pull with a key, not kept."""
    channel = pubsub_emulator.channel(ordered=True)
    bus = EventBus()
    finished: list[int] = []

    @bus.on("order.*")
    async def handle(event: Event) -> None:
        finished.append(event.payload["n"])

    await publish_lines(channel, ("o-1", 0), ("o-1", 1))
    async with PullRewriter(pubsub_emulator.host, {}, deny_get=(status, 1)) as proxy:
        source = PubSubSource(subscription_path(channel), emulator_host=proxy.host)
        with caplog.at_level(logging.WARNING, "fastapi_eventbus.worker"):
            async with Worker(bus, source, concurrency=2):
                await until(lambda: len(finished) == 2, timeout=20)
                assert source.ordered is (True if status == 403 else None)
                await publish_lines(channel, ("o-1", 2))  # the next pull with a key
                await until(lambda: len(finished) == 3, timeout=20)
    assert finished == [0, 1, 2]
    assert source.ordered is True  # 503: read at the second pull
    (warning,) = [r.getMessage() for r in caplog.records if "orders messages" in r.getMessage()]
    assert f"cannot read whether the subscription orders messages: HTTP {status}" in warning
    assert ("ordered=" in warning) is (status == 403)
    assert ("asked again" in warning) is (status == 503)


@pytest.mark.anyio
async def test_an_acknowledgement_refused_once_is_sent_again(
    pubsub_emulator: Emulator,
) -> None:
    """Found: one acknowledge request that failed (a 503: Pub/Sub asks to retry) was not
    sent again: every message it carried (up to 500) came back and ran its handlers again.
    A transient failure is now retried once."""
    channel = pubsub_emulator.channel()
    bus = EventBus()
    calls: list[str] = []
    bus.on("order.*")(lambda event: calls.append(event.id))
    publisher = EventBus()
    publisher.forward("order.*", PubSubForwarder(channel.topic, emulator_host=pubsub_emulator.host))
    ids = [(await publisher.publish("order.placed", {"n": n})).id for n in range(3)]
    await publisher.close()
    async with PullRewriter(pubsub_emulator.host, {}, fail_acks=1) as proxy:
        source = PubSubSource(subscription_path(channel), emulator_host=proxy.host)
        async with Worker(bus, source, concurrency=3) as worker:
            await until(lambda: worker.stats.handled == 3, timeout=20)
            await until(lambda: proxy.fail_acks == 0 and not worker.in_flight(), timeout=10)
    assert sorted(calls) == sorted(ids)
    assert worker.stats.settle_errors == 0
    assert channel.pull(1, timeout=11) == []  # past the ack deadline (10 s): none came back


@pytest.mark.anyio
async def test_an_ordering_key_that_is_not_a_string_fails_that_message_alone(
    pubsub_emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: one item of a pull answer whose ``orderingKey`` was not a string (``["bad"]``,
    from a faulty broker or middlebox) stopped the whole worker with a TypeError: the pull's
    later messages were never handled, nor named. That item is now undecodable (an ERROR
    names it; given back, delivered again, handled); the pull's other messages are handled."""
    channel = pubsub_emulator.channel(ordered=True)
    bus = EventBus()
    handled: list[int] = []

    @bus.on("order.*")
    async def handle(event: Event) -> None:
        handled.append(event.payload["n"])

    await publish_lines(channel, *((f"k{n}", n) for n in range(4)))
    rewriter = PullRewriter(
        pubsub_emulator.host, {1: "orderingKey"}, replaced={"orderingKey": ["bad"]}
    )
    async with rewriter as proxy:
        source = PubSubSource(
            subscription_path(channel),
            emulator_host=proxy.host,
            nack_backoff=Backoff(initial=0.1, maximum=0.1),
        )
        with caplog.at_level(logging.ERROR, "fastapi_eventbus"):
            async with Worker(bus, source, concurrency=4) as worker:
                await until(lambda: len(proxy.lost) == 1, timeout=10)
                await until(lambda: len(handled) == 4, timeout=10)
    assert sorted(handled) == [0, 1, 2, 3]
    assert worker.stats.undecodable == 1
    (bad,) = proxy.lost
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    (line,) = [e for e in errors if bad in e]
    assert "orderingKey is a list, not a string" in line
    assert channel.pull(1, timeout=1.5) == []


@pytest.mark.anyio
async def test_a_subscription_answer_that_is_not_an_object_loses_no_pulled_message(
    pubsub_emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: reading whether the subscription orders messages failed with an AttributeError
    when its answer was JSON but not an object: the pull failed, and the messages it had
    taken stayed unhandled until their ack deadline (10 s), none of them named. Such an
    answer is now like one that cannot be read: a WARNING, the keys kept in order, and the
    pull's messages handled at once."""
    channel = pubsub_emulator.channel(ordered=True)
    bus = EventBus()
    handled: list[int] = []
    bus.on("order.*")(lambda event: handled.append(event.payload["n"]))
    await publish_lines(channel, ("o-1", 0), ("o-1", 1))
    async with PullRewriter(pubsub_emulator.host, {}, get_answer=["not", "an", "object"]) as proxy:
        source = PubSubSource(subscription_path(channel), emulator_host=proxy.host)
        with caplog.at_level(logging.WARNING, "fastapi_eventbus.worker"):
            async with Worker(bus, source, concurrency=2):
                await until(lambda: len(handled) == 2, timeout=5)  # within the ack deadline
    assert handled == [0, 1]
    (warning,) = [r.getMessage() for r in caplog.records if "orders messages" in r.getMessage()]
    assert "its answer is a JSON list" in warning
