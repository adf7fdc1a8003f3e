"""PubSubForwarder against Google's Pub/Sub emulator, a real peer started once per session.

Topics and subscriptions are created per test through the emulator's REST API;
what the forwarder published is pulled back over the same API. Publish requests
are counted for real: with an `aiohttp.TraceConfig` on a session handed to the
forwarder, or by a small proxy in front of the emulator that can also answer
with injected HTTP errors (429, 503, 403) before passing requests through.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
import pytest
from fastapi import Depends, FastAPI, Request, Response
from fastapi.testclient import TestClient
from pydantic import BaseModel

from fastapi_eventbus import (
    ConfigurationError,
    Event,
    EventBus,
    ForwarderError,
    InvalidEventError,
    MissingExtraError,
    get_bus,
)
from fastapi_eventbus.forwarders import DeadLetter, Retry
from fastapi_eventbus.forwarders.pubsub import DEFAULT_API_ROOT, PubSubForwarder
from fastapi_eventbus.testing import capture
from fastapi_eventbus.wire import decode_message, pubsub_attributes, pubsub_data
from tests._pubsub import PROJECT, Channel, Emulator, free_port
from tests.conftest import serve

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
QUICK = Retry(attempts=4, initial_delay=0.01, max_delay=0.05, total_timeout=10)


# -- the emulator ---------------------------------------------------------------------------


@pytest.fixture
def channel(pubsub_emulator: Emulator) -> Channel:
    return pubsub_emulator.channel()


# -- helpers --------------------------------------------------------------------------------


class NewOrders(BaseModel):
    count: int = 1
    customer: str = "ada"


def shop(bus: EventBus) -> FastAPI:
    """An app whose ``POST /orders`` emits *count* ``order.placed`` events and one other."""
    app = FastAPI()
    bus.install(app)

    @app.post("/orders", status_code=201)
    async def place(body: NewOrders, events: EventBus = Depends(get_bus)) -> dict[str, int]:
        for n in range(body.count):
            events.emit("order.placed", {"customer": body.customer, "n": n})
        events.emit("user.seen", {"customer": body.customer})  # not forwarded
        return {"placed": body.count}

    return app


@asynccontextmanager
async def counting_session(statuses: list[int]) -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp session that appends the status of every response it receives."""

    async def on_request_end(
        session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceRequestEndParams
    ) -> None:
        statuses.append(params.response.status)

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        yield session


def flaky_proxy(upstream: str, faults: list[int], statuses: list[int]) -> FastAPI:
    """Passes requests to *upstream*, but first answers with the statuses in *faults*.

    A fault of 0 passes that request through; -1 answers 503 after a second; 200
    answers an empty JSON object. Every status answered is appended to *statuses*.
    """
    proxy = FastAPI()

    @proxy.api_route("/{path:path}", methods=["GET", "POST", "PUT"])
    async def forward(path: str, request: Request) -> Response:
        fault = faults.pop(0) if faults else 0
        if fault == -1:
            await asyncio.sleep(1.0)
            fault = 503
        if fault == 200:
            statuses.append(fault)
            return Response("{}", 200, media_type="application/json")
        if fault:
            statuses.append(fault)
            error = {"error": {"code": fault, "message": "injected by the test proxy"}}
            return Response(json.dumps(error), fault, media_type="application/json")
        async with httpx.AsyncClient() as client:
            answer = await client.request(
                request.method,
                f"http://{upstream}/{path}",
                content=await request.body(),
                headers={"content-type": "application/json"},
                timeout=30,
            )
        statuses.append(answer.status_code)
        return Response(answer.content, answer.status_code, media_type="application/json")

    return proxy


def payloads(received: list[dict[str, Any]]) -> list[Any]:
    return [decode_message(item).payload for item in received]


# -- delivery -------------------------------------------------------------------------------


@pytest.mark.slow
def test_events_from_requests_arrive_as_binary_mode_cloudevents(
    pubsub_emulator: Emulator, channel: Channel
) -> None:
    bus = EventBus(source="//shop/tests")
    bus.forward("order.*", PubSubForwarder(channel.topic, emulator_host=pubsub_emulator.host))
    with capture(bus) as seen, TestClient(shop(bus)) as client:
        assert client.post("/orders", json={"count": 2}).status_code == 201
        assert client.post("/orders", json={"customer": "bob"}).status_code == 201

    received = channel.pull(3)
    assert channel.pull(1, timeout=0.3) == []
    emitted = {event.id: event for event in seen.emitted if event.name == "order.placed"}
    assert sorted(decode_message(item).id for item in received) == sorted(emitted)
    for item in received:
        message = item["message"]
        event = emitted[message["attributes"]["ce-id"]]
        assert decode_message(item) == event  # id, type, source, time, data
        assert message["attributes"] == {
            "ce-specversion": "1.0",
            "ce-id": event.id,
            "ce-source": "//shop/tests",
            "ce-type": "order.placed",
            "ce-time": event.time.isoformat().replace("+00:00", "Z"),
            "content-type": "application/json",
        }
        assert json.loads(base64.b64decode(message["data"])) == event.payload
        assert "orderingKey" not in message


@pytest.mark.slow
@pytest.mark.anyio
async def test_trace_context_travels_in_attributes_never_in_data(
    pubsub_emulator: Emulator, channel: Channel
) -> None:
    event = Event(
        name="order.placed",
        payload={"id": 1},
        source="//shop/tests",
        trace_context={"traceparent": TRACEPARENT, "tracestate": "vendor=1"},
    )
    async with PubSubForwarder(channel.topic, emulator_host=pubsub_emulator.host) as forwarder:
        assert await forwarder.send([event]) is None

    [item] = channel.pull(1)
    attributes = item["message"]["attributes"]
    assert attributes["traceparent"] == TRACEPARENT
    assert attributes["tracestate"] == "vendor=1"
    assert json.loads(base64.b64decode(item["message"]["data"])) == {"id": 1}
    assert decode_message(item) == event  # trace context included


@pytest.mark.slow
@pytest.mark.anyio
async def test_publish_waits_for_the_forward(pubsub_emulator: Emulator, channel: Channel) -> None:
    statuses: list[int] = []
    bus = EventBus()
    async with counting_session(statuses) as session:
        forwarder = PubSubForwarder(
            channel.topic, emulator_host=pubsub_emulator.host, session=session
        )
        bus.forward("order.*", forwarder)
        event = await bus.publish("order.placed", {"id": 7})
        assert statuses == [200]  # the publish request was answered before publish returned
        await bus.close()
        assert not session.closed  # a session passed in belongs to the caller

    [item] = channel.pull(1)
    assert decode_message(item).id == event.id
    assert decode_message(item).payload == {"id": 7}


# -- batching -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_flush_of_2500_events_takes_three_publish_requests(
    pubsub_emulator: Emulator, channel: Channel
) -> None:
    # The emulator, like Pub/Sub, refuses a request of more than 1,000 messages.
    statuses: list[int] = []
    bus = EventBus()
    async with counting_session(statuses) as session:
        forwarder = PubSubForwarder(
            channel.topic, emulator_host=pubsub_emulator.host, session=session
        )
        bus.forward("order.*", forwarder)
        transport = httpx.ASGITransport(app=shop(bus))
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            response = await client.post("/orders", json={"count": 2500})
        assert response.status_code == 201
        assert statuses == [200, 200, 200]  # the flush had finished with the request
        await bus.close()

    received = channel.pull(2500, timeout=30)
    assert sorted(p["n"] for p in payloads(received)) == list(range(2500))


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_flush_is_split_by_request_size_too(
    pubsub_emulator: Emulator, channel: Channel
) -> None:
    # Three 3 MB payloads: about 4 MB each in a request's JSON (base64), 10 MB per request.
    statuses: list[int] = []
    blob = "x" * 3_000_000
    events = [Event(name="order.placed", payload={"n": n, "blob": blob}) for n in range(3)]
    async with counting_session(statuses) as session:
        forwarder = PubSubForwarder(
            channel.topic, emulator_host=pubsub_emulator.host, session=session
        )
        async with forwarder:
            assert await forwarder.send(events) is None
    assert statuses == [200, 200]
    assert sorted(p["n"] for p in payloads(channel.pull(3, timeout=30))) == [0, 1, 2]


@pytest.mark.slow
def test_ordering_keys_come_from_the_callable(pubsub_emulator: Emulator) -> None:
    channel = pubsub_emulator.channel(ordered=True)
    bus = EventBus()
    forwarder = PubSubForwarder(
        channel.topic,
        emulator_host=pubsub_emulator.host,
        ordering_key=lambda event: str(event.payload["customer"]),
    )
    bus.forward("order.*", forwarder)
    with capture(bus) as seen, TestClient(shop(bus)) as client:
        for customer, count in (("ada", 3), ("bob", 2), ("ada", 2)):
            client.post("/orders", json={"count": count, "customer": customer})

    received = channel.pull(7)
    assert len(received) == 7
    for item in received:
        assert item["message"]["orderingKey"] == decode_message(item).payload["customer"]
    orders = [e for e in seen.emitted if e.name == "order.placed"]
    for customer in ("ada", "bob"):  # each key's messages arrive in emission order
        sent = [e.id for e in orders if e.payload["customer"] == customer]
        got = [decode_message(i).id for i in received if i["message"]["orderingKey"] == customer]
        assert got == sent


@pytest.mark.slow
def test_ordering_holds_across_requests_whose_flushes_overlap(pubsub_emulator: Emulator) -> None:
    # On a real server the client sends the next request while the last one's flush runs.
    channel = pubsub_emulator.channel(ordered=True)
    bus = EventBus()
    forwarder = PubSubForwarder(
        channel.topic,
        emulator_host=pubsub_emulator.host,
        ordering_key=lambda event: str(event.payload["customer"]),
    )
    bus.forward("order.*", forwarder)
    with capture(bus) as seen, serve(shop(bus)) as url, httpx.Client(base_url=url) as client:
        for n in range(30):
            client.post("/orders", json={"count": 2, "customer": "bob" if n % 3 else "ada"})

    received = channel.pull(60)
    for customer in ("ada", "bob"):
        sent = [
            e.id
            for e in seen.emitted
            if e.name == "order.placed" and e.payload["customer"] == customer
        ]
        got = [decode_message(i).id for i in received if i["message"]["orderingKey"] == customer]
        assert got == sent


# -- failures -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_missing_topic_is_dead_lettered_without_retries(
    pubsub_emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    letters: list[DeadLetter] = []
    statuses: list[int] = []
    bus = EventBus()
    async with counting_session(statuses) as session:
        forwarder = PubSubForwarder(
            f"projects/{PROJECT}/topics/no-such-topic",
            emulator_host=pubsub_emulator.host,
            session=session,
            retry=QUICK,
            dead_letter=letters.append,
        )
        bus.forward("order.*", forwarder)
        events = [await bus.publish("order.placed", {"n": n}) for n in range(2)]
        await bus.close()

    assert statuses == [404, 404]  # one request per publish: no retry
    assert [letter.ids for letter in letters] == [[events[0].id], [events[1].id]]
    error = letters[0].exception
    assert isinstance(error, ForwarderError)
    assert not error.transient
    assert "HTTP 404" in str(error)
    assert isinstance(error.__cause__, aiohttp.ClientResponseError)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(events[0].id in message for message in errors)


@pytest.mark.slow
def test_an_unreachable_emulator_is_retried_then_dead_lettered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    letters: list[DeadLetter] = []
    arrived = threading.Event()

    def dead_letter(letter: DeadLetter) -> None:
        letters.append(letter)
        arrived.set()

    retry = Retry(attempts=4, initial_delay=0.5, max_delay=2.0, total_timeout=30)
    bus = EventBus()
    forwarder = PubSubForwarder(
        f"projects/{PROJECT}/topics/orders",
        emulator_host=f"127.0.0.1:{free_port()}",  # nothing listens there
        retry=retry,
        dead_letter=dead_letter,
    )
    bus.forward("order.*", forwarder)
    with capture(bus) as seen, serve(shop(bus)) as url:
        started = time.monotonic()
        response = httpx.post(f"{url}/orders", json={"count": 3})
        elapsed = time.monotonic() - started
        assert arrived.wait(timeout=20)
        gave_up = time.monotonic() - started

    assert response.status_code == 201
    # Three waits of at least 0.25 + 0.5 + 1.0 s come before the dead letter; none before the
    # response.
    assert elapsed < 1.0 < 1.75 <= gave_up
    [letter] = letters
    assert letter.ids == [e.id for e in seen.emitted if e.name == "order.placed"]
    assert letter.reason.startswith("gave up after 4 attempt(s)")
    assert isinstance(letter.exception, ForwarderError)
    assert letter.exception.transient
    retries = [
        r for r in caplog.records if r.levelno == logging.WARNING and "retrying" in r.message
    ]
    assert len(retries) == 3


@pytest.mark.slow
def test_429_and_503_are_retried_until_delivered(
    pubsub_emulator: Emulator, channel: Channel
) -> None:
    statuses: list[int] = []
    letters: list[DeadLetter] = []
    with serve(flaky_proxy(pubsub_emulator.host, [503, 429], statuses)) as proxy:
        bus = EventBus()
        forwarder = PubSubForwarder(
            channel.topic,
            emulator_host=proxy.removeprefix("http://"),
            retry=QUICK,
            dead_letter=letters.append,
        )
        bus.forward("order.*", forwarder)
        with TestClient(shop(bus)) as client:
            client.post("/orders", json={"count": 2})

    assert statuses == [503, 429, 200]
    assert letters == []
    assert sorted(p["n"] for p in payloads(channel.pull(2))) == [0, 1]
    assert channel.pull(1, timeout=0.3) == []


@pytest.mark.slow
def test_a_request_that_times_out_is_retried(pubsub_emulator: Emulator, channel: Channel) -> None:
    letters: list[DeadLetter] = []
    with serve(flaky_proxy(pubsub_emulator.host, [-1], [])) as proxy:
        bus = EventBus()
        forwarder = PubSubForwarder(
            channel.topic,
            emulator_host=proxy.removeprefix("http://"),
            timeout=0.3,
            retry=QUICK,
            dead_letter=letters.append,
        )
        bus.forward("order.*", forwarder)
        with TestClient(shop(bus)) as client:
            started = time.monotonic()
            client.post("/orders", json={"count": 2})
            assert time.monotonic() - started < 1.0  # did not wait for the slow answer

    assert letters == []
    assert sorted(p["n"] for p in payloads(channel.pull(2))) == [0, 1]


@pytest.mark.slow
def test_a_failed_request_mid_batch_resends_only_what_was_not_published(
    pubsub_emulator: Emulator, channel: Channel
) -> None:
    statuses: list[int] = []
    with serve(flaky_proxy(pubsub_emulator.host, [0, 503], statuses)) as proxy:
        bus = EventBus()
        forwarder = PubSubForwarder(
            channel.topic, emulator_host=proxy.removeprefix("http://"), retry=QUICK
        )
        bus.forward("order.*", forwarder)
        with TestClient(shop(bus)) as client:
            client.post("/orders", json={"count": 2500})

    assert statuses == [200, 503, 200, 200]  # 1,000 published; then 1,000 + 500 on the retry
    received = channel.pull(2500, timeout=30)
    assert sorted(p["n"] for p in payloads(received)) == list(range(2500))
    assert channel.pull(1, timeout=0.3) == []  # nothing published twice


@pytest.mark.slow
def test_a_refused_request_mid_batch_dead_letters_only_the_rest(
    pubsub_emulator: Emulator, channel: Channel
) -> None:
    statuses: list[int] = []
    letters: list[DeadLetter] = []
    with serve(flaky_proxy(pubsub_emulator.host, [0, 403], statuses)) as proxy:
        bus = EventBus()
        forwarder = PubSubForwarder(
            channel.topic,
            emulator_host=proxy.removeprefix("http://"),
            retry=QUICK,
            dead_letter=letters.append,
        )
        bus.forward("order.*", forwarder)
        with capture(bus) as seen, TestClient(shop(bus)) as client:
            client.post("/orders", json={"count": 2500})

    assert statuses == [200, 403]
    orders = [e.id for e in seen.emitted if e.name == "order.placed"]
    [letter] = letters
    assert letter.ids == orders[1000:]
    assert letter.reason.startswith("rejected: ")
    assert sorted(p["n"] for p in payloads(channel.pull(1000))) == list(range(1000))


def refusing_proxy(upstream: str, marker: bytes, statuses: list[int]) -> FastAPI:
    """Passes publish requests to *upstream*, but answers 400 (``INVALID_ARGUMENT``, as
    Pub/Sub does for one value it refuses) to any whose messages' data contain *marker*."""
    proxy = FastAPI()

    @proxy.api_route("/{path:path}", methods=["GET", "POST", "PUT"])
    async def forward(path: str, request: Request) -> Response:
        body = await request.body()
        messages = json.loads(body).get("messages", []) if body else []
        if any(marker in base64.b64decode(m.get("data", "")) for m in messages):
            statuses.append(400)
            error = {"error": {"code": 400, "message": "Request payload size exceeds the limit"}}
            return Response(json.dumps(error), 400, media_type="application/json")
        async with httpx.AsyncClient() as client:
            answer = await client.request(
                request.method,
                f"http://{upstream}/{path}",
                content=body,
                headers={"content-type": "application/json"},
                timeout=30,
            )
        statuses.append(answer.status_code)
        return Response(answer.content, answer.status_code, media_type="application/json")

    return proxy


@pytest.mark.slow
def test_a_value_refused_mid_batch_dead_letters_that_event_alone(
    pubsub_emulator: Emulator, channel: Channel
) -> None:
    """A 400 is a value Pub/Sub refuses: one message's. In a later request of a flush, it
    must not dead-letter the events around it, nor those of the requests not yet sent."""
    statuses: list[int] = []
    letters: list[DeadLetter] = []
    with serve(refusing_proxy(pubsub_emulator.host, b"poison", statuses)) as proxy:
        bus = EventBus()
        forwarder = PubSubForwarder(
            channel.topic,
            emulator_host=proxy.removeprefix("http://"),
            retry=QUICK,
            dead_letter=letters.append,
        )
        bus.forward("order.*", forwarder)
        app = FastAPI()
        bus.install(app)

        @app.post("/orders")
        async def place(events: EventBus = Depends(get_bus)) -> None:
            for n in range(2500):
                events.emit("order.placed", {"n": n, "note": "poison" if n == 1700 else ""})

        with capture(bus) as seen, TestClient(app) as client:
            client.post("/orders")

    [poisoned] = [e.id for e in seen.emitted if e.payload["n"] == 1700]
    assert [letter.ids for letter in letters] == [[poisoned]]
    received = sorted(p["n"] for p in payloads(channel.pull(2499, timeout=30)))
    assert received == [n for n in range(2500) if n != 1700]
    assert channel.pull(1, timeout=0.3) == []  # nothing published twice


@pytest.mark.slow
def test_an_answer_without_message_ids_is_retried(
    pubsub_emulator: Emulator, channel: Channel, caplog: pytest.LogCaptureFixture
) -> None:
    statuses: list[int] = []
    with serve(flaky_proxy(pubsub_emulator.host, [200], statuses)) as proxy:
        bus = EventBus()
        forwarder = PubSubForwarder(
            channel.topic, emulator_host=proxy.removeprefix("http://"), retry=QUICK
        )
        bus.forward("order.*", forwarder)
        with TestClient(shop(bus)) as client:
            client.post("/orders", json={"count": 2})

    assert statuses == [200, 200]
    assert "response lists no message id(s)" in caplog.text
    assert sorted(p["n"] for p in payloads(channel.pull(2))) == [0, 1]


@pytest.mark.slow
def test_an_emulator_needs_no_credentials(
    pubsub_emulator: Emulator, channel: Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/credentials.json")
    bus = EventBus()
    bus.forward("order.*", PubSubForwarder(channel.topic, emulator_host=pubsub_emulator.host))
    with TestClient(shop(bus)) as client:
        client.post("/orders", json={"count": 1})
    assert len(channel.pull(1)) == 1


# A bare TestClient runs each request on its own event loop: the forwarder abandons the
# HTTP session of the previous loop, and aiohttp warns when it is garbage-collected unclosed.
# Collected here, inside the test, so no other test sees that.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Unclosed:ResourceWarning")
def test_an_app_without_its_lifespan_starts_again_on_each_event_loop(
    pubsub_emulator: Emulator, channel: Channel, caplog: pytest.LogCaptureFixture
) -> None:
    letters: list[DeadLetter] = []

    def two_requests() -> None:
        bus = EventBus()
        forwarder = PubSubForwarder(
            channel.topic, emulator_host=pubsub_emulator.host, dead_letter=letters.append
        )
        bus.forward("order.*", forwarder)
        client = TestClient(shop(bus))  # no `with`: no lifespan, and a new event loop per request
        assert client.post("/orders", json={"count": 1}).status_code == 201
        assert client.post("/orders", json={"count": 2, "customer": "bob"}).status_code == 201

    two_requests()
    gc.collect()
    assert letters == []
    received = payloads(channel.pull(3))
    assert sorted((p["customer"], p["n"]) for p in received) == [("ada", 0), ("bob", 0), ("bob", 1)]
    restarts = [r for r in caplog.records if "another event loop" in r.getMessage()]
    assert len(restarts) == 1
    assert restarts[0].levelno == logging.WARNING
    assert restarts[0].getMessage().startswith("forwarder PubSubForwarder: ")


@pytest.mark.anyio
async def test_an_unreadable_credentials_file_is_dead_lettered_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    letters: list[DeadLetter] = []
    bus = EventBus()
    forwarder = PubSubForwarder(
        "projects/my-project/topics/orders",
        service_file="/nonexistent/credentials.json",
        retry=QUICK,
        dead_letter=letters.append,
    )
    bus.forward("order.*", forwarder)
    event = await bus.publish("order.placed", {})
    [letter] = letters
    assert letter.ids == [event.id]
    assert letter.reason.startswith("permanent failure")
    assert "could not create the Pub/Sub client: FileNotFoundError" in letter.reason
    await bus.close()


@pytest.mark.slow
def test_a_403_is_dead_lettered_at_once(pubsub_emulator: Emulator, channel: Channel) -> None:
    statuses: list[int] = []
    letters: list[DeadLetter] = []
    with serve(flaky_proxy(pubsub_emulator.host, [403], statuses)) as proxy:
        bus = EventBus()
        forwarder = PubSubForwarder(
            channel.topic,
            emulator_host=proxy.removeprefix("http://"),
            retry=QUICK,
            dead_letter=letters.append,
        )
        bus.forward("order.*", forwarder)
        with capture(bus) as seen, TestClient(shop(bus)) as client:
            client.post("/orders", json={"count": 2})

    assert statuses == [403]
    [letter] = letters
    assert letter.ids == [e.id for e in seen.emitted if e.name == "order.placed"]
    assert letter.reason.startswith("permanent failure")
    assert "HTTP 403" in letter.reason
    assert "injected by the test proxy" in letter.reason


# -- configuration and emit-time checks (no emulator needed) ----------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "orders",
        "projects/p/topics/",
        "projects/my-project/subscriptions/orders",
        "projects/my-project/topics/ab",
        "projects/my-project/topics/1orders",
        "projects/my-project/topics/orders/extra",
    ],
)
def test_the_topic_must_be_a_full_topic_path(topic: str) -> None:
    with pytest.raises(ConfigurationError, match="projects/PROJECT/topics/TOPIC"):
        PubSubForwarder(topic)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"api_root": "https://pubsub.googleapis.com/v1", "emulator_host": "localhost:8085"},
        {"api_root": "pubsub.googleapis.com"},
        {"emulator_host": "http://localhost:8085"},
        {"timeout": 0},
        {"ordering_key": "customer"},
        {"max_message_bytes": 0},
    ],
)
def test_bad_settings_fail_in_the_constructor(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        PubSubForwarder("projects/my-project/topics/orders", **kwargs)


def test_the_endpoint_follows_emulator_host_and_api_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = "projects/my-project/topics/orders"
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    real = PubSubForwarder(topic)
    assert (real.api_root, real.emulated) == (DEFAULT_API_ROOT, False)
    regional = PubSubForwarder(topic, api_root="https://europe-west1-pubsub.googleapis.com/v1/")
    assert regional.api_root == "https://europe-west1-pubsub.googleapis.com/v1"
    assert not regional.emulated
    plain = PubSubForwarder(topic, api_root="http://localhost:8085/v1")
    assert plain.emulated  # never send credentials over plain HTTP
    explicit = PubSubForwarder(topic, emulator_host="localhost:8085")
    assert (explicit.api_root, explicit.emulated) == ("http://localhost:8085/v1", True)
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:9999")
    from_env = PubSubForwarder(topic)
    assert (from_env.api_root, from_env.emulated) == ("http://127.0.0.1:9999/v1", True)


def test_a_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gcloud.aio.pubsub", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"fastapi-eventbus-di\[gcp\]") as info:
        PubSubForwarder("projects/my-project/topics/orders")
    assert info.value.extra == "gcp"


def test_the_sdk_is_imported_only_when_the_forwarder_starts() -> None:
    code = (
        "import sys, fastapi_eventbus\n"
        "from fastapi_eventbus.forwarders.pubsub import PubSubForwarder\n"
        "PubSubForwarder('projects/my-project/topics/orders', emulator_host='localhost:1')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('gcloud.aio.', 'aiohttp'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_encoded_size_counts_data_attributes_and_ordering_key() -> None:
    event = Event(name="order.placed", payload={"id": "é"}, trace_context={"traceparent": "x"})
    forwarder = PubSubForwarder(
        "projects/my-project/topics/orders",
        emulator_host="localhost:1",
        ordering_key=lambda e: "kö",
    )
    attributes = sum(len(k.encode()) + len(v.encode()) for k, v in pubsub_attributes(event).items())
    assert forwarder.encoded_size(event) == len(pubsub_data(event)) + attributes + len(b"k\xc3\xb6")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("settings", "payload", "error"),
    [
        ({"max_message_bytes": 300}, {"blob": "x" * 300}, "over the 300-byte limit"),
        ({"ordering_key": lambda e: 7}, {}, "ordering_key returned int"),
        ({"ordering_key": lambda e: "k" * 1025}, {}, "ordering key is over"),
    ],
)
async def test_what_pubsub_would_refuse_is_rejected_at_emit_time(
    settings: dict[str, Any], payload: dict[str, Any], error: str
) -> None:
    bus = EventBus()
    forwarder = PubSubForwarder(
        "projects/my-project/topics/orders", emulator_host=f"127.0.0.1:{free_port()}", **settings
    )
    bus.forward("order.*", forwarder)
    with pytest.raises(InvalidEventError, match=error):
        await bus.publish("order.placed", payload)
    assert not forwarder._started  # nothing was sent, nothing was opened
    await bus.publish("other.event", payload)  # not forwarded: not checked


@pytest.mark.anyio
async def test_an_attribute_over_the_limit_is_rejected_at_emit_time() -> None:
    bus = EventBus(source="//" + "s" * 1100)
    bus.forward("*", PubSubForwarder("projects/my-project/topics/orders", emulator_host="h:1"))
    with pytest.raises(InvalidEventError, match="'ce-source' is over"):
        await bus.publish("order.placed", {})


@pytest.mark.anyio
async def test_sending_before_start_is_an_error() -> None:
    forwarder = PubSubForwarder("projects/my-project/topics/orders", emulator_host="h:1")
    with pytest.raises(ForwarderError, match="not started"):
        await forwarder.send([Event(name="order.placed")])


# -- start-up checks (verify_on_start) ------------------------------------------------------

CHECK_FAILED = "forwarder PubSubForwarder failed its start-up check (verify_on_start=True): "


def startup_error(bus: EventBus) -> ForwarderError:
    """The `ForwarderError` that stops the startup of the shop app on *bus*."""
    with pytest.raises(ForwarderError) as caught, TestClient(shop(bus)):
        pytest.fail("the app started")
    return caught.value


@pytest.mark.slow
def test_a_missing_topic_stops_the_app_at_startup(pubsub_emulator: Emulator) -> None:
    topic = f"projects/{PROJECT}/topics/no-such-topic"
    bus = EventBus()
    bus.forward(
        "order.*",
        PubSubForwarder(topic, emulator_host=pubsub_emulator.host, verify_on_start=True),
    )
    error = startup_error(bus)
    assert str(error).startswith(f"{CHECK_FAILED}get topic {topic} failed: HTTP 404 ")
    assert str(error).endswith(": the topic does not exist (check the project and topic id)")
    assert not error.transient
    assert isinstance(error.__cause__, ForwarderError)  # what verify raised
    assert isinstance(error.__cause__.__cause__, aiohttp.ClientResponseError)


@pytest.mark.slow
def test_a_topic_the_credentials_may_not_read_stops_the_app_at_startup(
    pubsub_emulator: Emulator, channel: Channel
) -> None:
    statuses: list[int] = []
    with serve(flaky_proxy(pubsub_emulator.host, [403], statuses)) as proxy:
        bus = EventBus()
        forwarder = PubSubForwarder(
            channel.topic, emulator_host=proxy.removeprefix("http://"), verify_on_start=True
        )
        bus.forward("order.*", forwarder)
        error = startup_error(bus)
    assert statuses == [403]
    assert str(error).startswith(f"{CHECK_FAILED}get topic {channel.topic} failed: HTTP 403 ")
    assert str(error).endswith(
        ": the credentials may not read the topic (pubsub.topics.get is needed to verify it)"
    )


def test_an_unreadable_credentials_file_stops_the_app_at_startup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    bus = EventBus()
    forwarder = PubSubForwarder(
        "projects/my-project/topics/orders",
        service_file="/nonexistent/credentials.json",
        verify_on_start=True,
    )
    bus.forward("order.*", forwarder)
    message = str(startup_error(bus))
    assert message.startswith(f"{CHECK_FAILED}could not create the Pub/Sub client: ")
    assert "FileNotFoundError" in message


@pytest.mark.slow
def test_a_verified_forwarder_starts_and_publishes(
    pubsub_emulator: Emulator, channel: Channel
) -> None:
    statuses: list[int] = []
    with serve(flaky_proxy(pubsub_emulator.host, [], statuses)) as proxy:
        bus = EventBus()
        forwarder = PubSubForwarder(
            channel.topic, emulator_host=proxy.removeprefix("http://"), verify_on_start=True
        )
        bus.forward("order.*", forwarder)
        with TestClient(shop(bus)) as client:
            client.post("/orders", json={"count": 2})
    assert sorted(p["n"] for p in payloads(channel.pull(2))) == [0, 1]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("extensions", "error"),
    [
        ({f"x{n}": "v" for n in range(95)}, "101 attributes, over Pub/Sub's limit of 100"),
        ({"x" * 254: "v"}, "attribute name 'ce-xxx"),
        ({"big": "v" * 1025}, "'ce-big' is over Pub/Sub's 1024-byte limit"),
    ],
)
async def test_extensions_pubsub_would_refuse_are_rejected_at_emit_time(
    extensions: dict[str, str], error: str
) -> None:
    """Each extension attribute is a ``ce-*`` message attribute, within Pub/Sub's limits."""
    bus = EventBus()
    forwarder = PubSubForwarder("projects/my-project/topics/orders", emulator_host="h:1")
    bus.forward("*", forwarder)
    with pytest.raises(InvalidEventError, match=error):
        await bus.publish("order.placed", {}, extensions=extensions)
    fine = {f"x{n}": "v" * 1024 for n in range(93)} | {"x" * 253: "v"}  # 100 attributes
    forwarder.check(Event(name="order.placed", extensions=fine))
