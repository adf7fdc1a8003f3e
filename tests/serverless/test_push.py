"""`push_router`: Pub/Sub push and CloudEvents over HTTP (Eventarc) requests run the handlers.

End to end: Google's Pub/Sub emulator pushes to the router on a real uvicorn server, events
published by the real `PubSubForwarder`. CloudEvents requests are built with the CloudEvents
SDK (``cloudevents``), in binary and structured mode, and Eventarc's ``messagePublished``
envelope around a Pub/Sub message. OIDC tokens are signed with a key made here and checked
against a JWKS served over HTTP, as Google's is.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import importlib.util
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any

import httpx
import jwt
import pytest
from cloudevents.core.bindings.http import HTTPMessage, to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from jwt.algorithms import RSAAlgorithm

from fastapi_eventbus import (
    ConfigurationError,
    DiscardedEvents,
    Event,
    EventBus,
    MissingExtraError,
    wire,
)
from fastapi_eventbus.forwarders.pubsub import PubSubForwarder
from fastapi_eventbus.serverless import GoogleOIDC, push_router
from fastapi_eventbus.testing import capture
from tests._pubsub import Emulator
from tests._support import ROOT, load_module, until, wait_for
from tests.conftest import serve

PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"


class Shop:
    """An app with the router at ``/events``; what its handlers saw, by event id."""

    def __init__(self, handler_timeout: float = 60.0, **options: Any) -> None:
        self.discards: list[DiscardedEvents] = []
        self.bus = EventBus(handler_timeout=handler_timeout, on_discard=self.discards.append)
        self.attempts: Counter[str] = Counter()
        self.handled: dict[str, Event] = {}
        self.seen: dict[str, dict[str, Any]] = {}

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
            yield {"warehouse": "eu-1"}

        self.app = FastAPI(lifespan=lifespan)
        self.bus.install(self.app)
        self.app.include_router(push_router(path="/events", **options))

        @self.bus.on("order.*")
        async def ship(event: Event, request: Request, db: Annotated[str, Depends(get_db)]) -> None:
            self.attempts[event.id] += 1
            self.seen[event.id] = {
                "db": db,
                "warehouse": getattr(request.state, "warehouse", None),
                "path": request.url.path,
            }
            if isinstance(event.payload, dict):
                if event.payload.get("fail_once") and self.attempts[event.id] == 1:
                    raise RuntimeError("the first delivery fails")
                if event.payload.get("sleep"):
                    await asyncio.sleep(event.payload["sleep"])
                if event.payload.get("stubborn"):
                    await asleep_ignoring_one_cancel(event.payload["stubborn"])
            self.handled[event.id] = event


def get_db() -> str:
    return "production"


async def asleep_ignoring_one_cancel(seconds: float) -> None:
    """A handler that hangs, and swallows the first cancellation: still, it cannot hang a
    request."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        await asyncio.sleep(3)  # then it stops (the lifespan's shutdown waits for it)


def order(event_id: str, payload: Any = None, **attributes: Any) -> CloudEvent:
    return CloudEvent(
        attributes={"type": "order.placed", "source": "//shop", "id": event_id, **attributes},
        data={"order": event_id} if payload is None else payload,
    )


def push_envelope(event: Event, message_id: str = "m-1") -> dict[str, Any]:
    """The push envelope of *event* as the `PubSubForwarder` publishes it (binary mode)."""
    return {
        "message": {
            "data": base64.b64encode(wire.pubsub_data(event)).decode(),
            "attributes": wire.pubsub_attributes(event),
            "messageId": message_id,
            "publishTime": "2026-12-06T10:00:00Z",
        },
        "subscription": "projects/shop-project/subscriptions/orders-push",
    }


# -- the emulator pushing to uvicorn ---------------------------------------------------------


@contextmanager
def push_subscription(emulator: Emulator, endpoint: str) -> Iterator[str]:
    """A topic whose push subscription pushes to *endpoint*; yields the topic's path."""
    channel = emulator.channel()  # a topic (and a pull subscription, unused)
    name = f"push-{channel.subscription}"
    body = {"topic": channel.topic, "pushConfig": {"pushEndpoint": endpoint}}
    httpx.put(emulator.rest(f"subscriptions/{name}"), json=body).raise_for_status()
    try:
        yield channel.topic
    finally:
        httpx.delete(emulator.rest(f"subscriptions/{name}"))


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_emulator_pushes_each_event_once_and_a_failure_again(
    pubsub_emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    shop = Shop(on_undecodable="delete")
    caplog.set_level(logging.ERROR, "fastapi_eventbus.worker")
    with serve(shop.app) as url, push_subscription(pubsub_emulator, f"{url}/events/pubsub") as t:
        publisher = EventBus()
        publisher.forward("order.*", PubSubForwarder(t, emulator_host=pubsub_emulator.host))
        ids = [(await publisher.publish("order.placed", {"n": n})).id for n in range(5)]
        flaky = (await publisher.publish("order.placed", {"fail_once": True})).id
        await publisher.close()
        async with httpx.AsyncClient() as http:
            response = await http.post(
                f"http://{pubsub_emulator.host}/v1/{t}:publish",
                json={"messages": [{"data": base64.b64encode(b"not an event").decode()}]},
            )
        foreign = response.json()["messageIds"][0]
        await until(lambda: len(shop.handled) == 6, timeout=30)
        await until(lambda: any(foreign in line for line in caplog.messages), timeout=10)
        await asyncio.sleep(1.5)  # nothing more comes: every message was acknowledged
    assert set(shop.handled) == {*ids, flaky}
    assert shop.attempts == {**dict.fromkeys(ids, 1), flaky: 2}  # 500, pushed again, handled
    assert {seen["warehouse"] for seen in shop.seen.values()} == {"eu-1"}  # lifespan state
    assert shop.handled[ids[0]].payload == {"n": 0}


# -- CloudEvents over HTTP -------------------------------------------------------------------


@pytest.fixture
def shop() -> Shop:
    return Shop()


@pytest.fixture
def client(shop: Shop) -> Iterator[TestClient]:
    with TestClient(shop.app) as client:
        yield client


def post(client: TestClient, message: HTTPMessage, path: str = "/events/cloudevents") -> Any:
    """POST the CloudEvents SDK's *message*; the response."""
    return client.post(path, headers=message.headers, content=message.body)


def test_binary_and_structured_mode_events_are_handled(client: TestClient, shop: Shop) -> None:
    binary = post(client, to_binary_event(order("b-1", subject="a b%")))
    structured = post(client, to_structured_event(order("s-1")))
    assert (binary.status_code, structured.status_code) == (204, 204)
    assert shop.attempts == {"b-1": 1, "s-1": 1}
    assert shop.handled["b-1"].payload == {"order": "b-1"}
    assert shop.handled["s-1"].source == "//shop"
    assert shop.seen["b-1"] == {
        "db": "production",
        "warehouse": "eu-1",
        "path": "/events/cloudevents",
    }


def test_data_base64_and_text_data_are_decoded(client: TestClient, shop: Shop) -> None:
    text = order("t-1", "plain words", datacontenttype="text/plain")
    as_bytes = order("d-1", b'{"order": "d-1"}', datacontenttype="application/json")
    assert post(client, to_binary_event(text)).status_code == 204
    message = to_structured_event(as_bytes)
    assert "data_base64" in json.loads(message.body)
    assert post(client, message).status_code == 204
    assert shop.handled["t-1"].payload == "plain words"
    assert shop.handled["d-1"].payload == {"order": "d-1"}


def test_every_attribute_reaches_the_decode_hook_extensions_too() -> None:
    cloudevents: list[dict[str, Any]] = []
    shop = Shop(decode=lambda message: cloudevents.append(dict(message)))
    with TestClient(shop.app) as client:
        binary = to_binary_event(order("x-1", tenant="acme", subject="carts/1 50%"))
        assert post(client, binary).status_code == 204
        assert post(client, to_structured_event(order("x-2", tenant="globex"))).status_code == 204
    assert [(ce["id"], ce["tenant"]) for ce in cloudevents] == [("x-1", "acme"), ("x-2", "globex")]
    assert binary.headers["ce-subject"] == "carts/1%2050%25"  # percent-encoded, and decoded
    assert cloudevents[0]["subject"] == "carts/1 50%"
    assert set(shop.handled) == {"x-1", "x-2"}


def test_eventarc_message_published_is_unwrapped(client: TestClient, shop: Shop) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    event = Event(name="order.placed", payload={"n": 1}, trace_context={"traceparent": traceparent})
    envelope = CloudEvent(
        attributes={
            "type": PUBLISHED,
            "source": "//pubsub.googleapis.com/projects/shop-project/topics/orders",
            "id": "m-1",
            "datacontenttype": "application/json",
        },
        data=push_envelope(event),
    )
    assert post(client, to_binary_event(envelope)).status_code == 204
    assert post(client, to_structured_event(envelope)).status_code == 204  # delivered again
    as_bytes = CloudEvent(
        attributes={**envelope.get_attributes(), "datacontenttype": "application/octet-stream"},
        data=json.dumps(push_envelope(event)).encode(),
    )
    assert "data_base64" in json.loads(to_structured_event(as_bytes).body)
    assert post(client, to_structured_event(as_bytes)).status_code == 204
    assert shop.attempts == {event.id: 3}
    assert shop.handled[event.id].payload == {"n": 1}
    assert shop.handled[event.id].trace_context["traceparent"] == traceparent


def test_a_push_envelope_is_handled(client: TestClient, shop: Shop) -> None:
    event = Event(name="order.placed", payload={"n": 2})
    response = client.post("/events/pubsub", json=push_envelope(event))
    assert response.status_code == 204
    assert shop.attempts == {event.id: 1}
    assert shop.seen[event.id]["path"] == "/events/pubsub"


def test_failures_answer_500_so_the_message_comes_again(client: TestClient, shop: Shop) -> None:
    event = order("f-1", {"fail_once": True})
    first = post(client, to_binary_event(event))
    assert first.status_code == 500
    assert "f-1" in first.json()["detail"]
    assert "f-1" not in shop.handled
    assert post(client, to_binary_event(event)).status_code == 204
    assert shop.attempts == {"f-1": 2}


def test_what_is_not_an_event_follows_on_undecodable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "fastapi_eventbus.worker")
    batched = {"content-type": "application/cloudevents-batch+json"}
    with TestClient(Shop().app) as retry, TestClient(Shop(on_undecodable="delete").app) as delete:
        assert retry.post("/events/cloudevents", content=b"[]", headers=batched).status_code == 415
        assert retry.post("/events/cloudevents", json={"no": "headers"}).status_code == 400
        assert retry.post("/events/pubsub", content=b"{").status_code == 400
        assert retry.post("/events/pubsub", json={"message": {"data": "%%%"}}).status_code == 400
        assert delete.post("/events/pubsub", content=b"{").status_code == 204
        assert delete.post("/events/cloudevents", json={"no": "headers"}).status_code == 204
    assert len([line for line in caplog.messages if "giving it back" in line]) == 4
    assert len([line for line in caplog.messages if "deleting it" in line]) == 2


def test_a_deleted_message_that_is_not_an_event_is_reported_to_on_discard() -> None:
    shop = Shop(on_undecodable="delete")
    with TestClient(shop.app) as client:
        junk = {"message": {"data": "%%%", "messageId": "m-7"}}
        assert client.post("/events/pubsub", json=junk).status_code == 204
    # Found: deleted with a log line only; the app's hook never heard of it.
    (report,) = shop.discards
    assert (report.events, report.message_ids) == ((), ("m-7",))
    assert report.reason.startswith("message m-7 from Pub/Sub push is not an event; ")
    assert report.reason.endswith("it is deleted (on_undecodable='delete')")
    assert report.exception is not None


def test_a_message_over_max_message_bytes_is_answered_413(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, "fastapi_eventbus.worker")
    shop = Shop(max_message_bytes=300)
    event = Event(name="order.placed", payload={"padding": "x" * 400})
    huge = to_binary_event(order("l-2", "y" * 1_500_000, datacontenttype="text/plain"))
    with TestClient(shop.app) as client:
        assert client.post("/events/pubsub", json=push_envelope(event)).status_code == 413
        assert post(client, huge).status_code == 413  # not even read whole
        assert post(client, to_binary_event(order("s-3"))).status_code == 204
    assert list(shop.handled) == ["s-3"]
    assert len([line for line in caplog.messages if "too large" in line]) == 1
    assert len([line for line in caplog.messages if "l-2" in line and "too long" in line]) == 1


def test_an_event_no_handler_matches_follows_on_unhandled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "fastapi_eventbus.worker")
    other = CloudEvent(attributes={"type": "cat.fed", "source": "//zoo", "id": "u-1"}, data={})
    with TestClient(Shop().app) as retry, TestClient(Shop(on_unhandled="delete").app) as delete:
        response = post(retry, to_binary_event(other))
        assert response.status_code == 500
        assert "cat.fed" in response.json()["detail"]
        assert post(delete, to_binary_event(other)).status_code == 204
    assert len([line for line in caplog.messages if "u-1" in line]) == 2


def test_a_hung_handler_is_cancelled_at_the_timeout_and_answered_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "fastapi_eventbus")
    shop = Shop(timeout=0.5)
    with TestClient(shop.app) as client:
        started = time.monotonic()
        response = post(client, to_binary_event(order("h-1", {"stubborn": 60})))
        elapsed = time.monotonic() - started
    assert response.status_code == 500
    assert "0.5s" in response.json()["detail"]
    assert elapsed < 3  # the time limit, and a second for cancelled handlers to stop
    assert any("h-1" in line and "still running" in line for line in caplog.messages)
    # The handler swallowed the cancellation and finished later: too late to count.
    assert any("h-1" in line and "not acknowledged" in line for line in caplog.messages)


def test_a_handler_that_swallows_the_time_limit_s_cancellation_is_no_success() -> None:
    """Found: a handler cut off at the request's time limit that caught the cancellation and
    returned was recorded as a success (``error=None`` to `capture`; with an inbox, a success
    that a redelivery would skip), while the request was answered 500."""
    bus, app = EventBus(), FastAPI()
    bus.install(app)
    app.include_router(push_router(timeout=0.3))

    @bus.on("order.*")
    async def swallows(event: Event) -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            return  # a library cleaning up, and returning

    with capture(bus, raise_failures=False) as seen, TestClient(app) as client:
        response = client.post("/pubsub", json=push_envelope(Event(name="order.placed")))
    assert response.status_code == 500
    assert [call.error for call in seen.handled if call.error is None] == []


def test_by_default_the_handlers_time_limits_bound_the_request() -> None:
    shop = Shop(handler_timeout=0.3)
    with TestClient(shop.app) as client:
        started = time.monotonic()
        response = post(client, to_binary_event(order("h-2", {"sleep": 60})))
        elapsed = time.monotonic() - started
    assert response.status_code == 500
    assert "h-2" in response.json()["detail"]
    assert elapsed < 2
    assert shop.attempts == {"h-2": 1}
    assert shop.handled == {}


def test_handlers_see_the_apps_dependency_overrides(client: TestClient, shop: Shop) -> None:
    shop.app.dependency_overrides[get_db] = lambda: "test database"
    assert post(client, to_binary_event(order("o-1"))).status_code == 204
    assert shop.seen["o-1"]["db"] == "test database"


def test_bad_arguments_are_refused() -> None:
    for options in (
        {"path": "events"},
        {"path": "/events/"},
        {"timeout": 0},
        {"on_undecodable": "drop"},
        {"on_unhandled": None},
        {"decode": "json"},
        {"verify": "yes"},
        {"max_message_bytes": 0},
    ):
        with pytest.raises(ConfigurationError):
            push_router(**options)


# -- OIDC ------------------------------------------------------------------------------------

AUDIENCE = "https://orders-abc123-ew.a.run.app/events/cloudevents"
PUSHER = "pusher@shop-project.iam.gserviceaccount.com"


class Keys:
    """A signing key, published as a JWKS by a local HTTP server (counting its fetches)."""

    def __init__(self) -> None:
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        self.jwks = json.dumps({"keys": [{**jwk, "kid": "key-1", "alg": "RS256", "use": "sig"}]})
        self.fetches = 0

    def token(self, private: Any = None, **claims: Any) -> str:
        now = int(time.time())
        base = {
            "iss": "https://accounts.google.com",
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 3600,
        }
        base |= {"email": PUSHER, "email_verified": True, "sub": "1234"}
        signed = {key: value for key, value in (base | claims).items() if value is not None}
        return jwt.encode(signed, private or self.private, "RS256", headers={"kid": "key-1"})


@pytest.fixture(scope="module")
def keys() -> Iterator[tuple[Keys, str]]:
    published = Keys()

    class JWKS(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            published.fetches += 1
            body = published.jwks.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), JWKS)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield published, f"http://127.0.0.1:{server.server_address[1]}/certs"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_oidc_tokens_are_verified_and_no_handler_runs_for_a_refused_one(
    keys: tuple[Keys, str],
) -> None:
    published, certs_url = keys
    fetched_before = published.fetches  # the fixture is the module's: count from here
    shop = Shop(verify=GoogleOIDC(AUDIENCE, email=PUSHER, certs_url=certs_url))
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused = {
        "wrong audience": (published.token(aud="https://elsewhere.example"), 401),
        "expired": (published.token(exp=int(time.time()) - 3600), 401),
        "wrong signature": (published.token(other_key), 401),
        "wrong issuer": (published.token(iss="https://evil.example"), 401),
        "no expiry": (published.token(exp=None), 401),
        "another account": (published.token(email="intruder@example.com"), 403),
        "unverified email": (published.token(email_verified=False), 403),
        "not a JWT": ("not-a-token", 401),
    }
    with TestClient(shop.app) as client:
        binary = to_binary_event(order("ok-1"))

        def push(token: str | None) -> Any:
            auth = {} if token is None else {"Authorization": f"Bearer {token}"}
            return client.post(
                "/events/cloudevents", headers={**binary.headers, **auth}, content=binary.body
            )

        statuses = {why: push(token).status_code for why, (token, _) in refused.items()}
        missing = push(None)
        assert shop.attempts == {}  # no handler ran for any of them
        assert push(published.token()).status_code == 204
        assert push(published.token()).status_code == 204  # delivered again: handled again
    assert statuses == {why: status for why, (_, status) in refused.items()}
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert shop.attempts == {"ok-1": 2}
    assert published.fetches - fetched_before == 1  # the keys are fetched once and kept


def test_oidc_keys_that_cannot_be_fetched_answer_503() -> None:
    verify = GoogleOIDC(AUDIENCE, certs_url="http://127.0.0.1:9/certs")
    shop = Shop(verify=verify)
    with TestClient(shop.app) as client:
        token = Keys().token()
        response = client.post(
            "/events/pubsub", headers={"Authorization": f"Bearer {token}"}, json={}
        )
    assert response.status_code == 503
    with pytest.raises(ConfigurationError):
        GoogleOIDC("")


# -- the docs' example -----------------------------------------------------------------------

EXAMPLE = ROOT / "docs/examples/push_app.py"


def test_the_docs_example_handles_a_push_and_an_eventarc_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PUSH_AUDIENCE", raising=False)
    example = load_module(EXAMPLE, monkeypatch)
    pushed = push_envelope(Event(name="order.placed", payload={"order": 7}))
    eventarc = CloudEvent(
        attributes={"type": PUBLISHED, "source": "//pubsub.googleapis.com/x", "id": "m-2"},
        data=push_envelope(Event(name="order.placed", payload={"order": 8})),
    )
    with TestClient(example.app) as client:
        assert client.post("/events/pubsub", json=pushed).status_code == 204
        assert post(client, to_binary_event(eventarc)).status_code == 204
    assert example.shipped == ["7 from eu-1", "8 from eu-1"]


def test_the_docs_example_refuses_an_unsigned_push_on_cloud_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PUSH_AUDIENCE", AUDIENCE)
    monkeypatch.setenv("PUSH_SERVICE_ACCOUNT", PUSHER)
    example = load_module(EXAMPLE, monkeypatch)
    pushed = push_envelope(Event(name="order.placed", payload={"order": 9}))
    with TestClient(example.app) as client:
        assert client.post("/events/pubsub", json=pushed).status_code == 401
    assert example.shipped == []
    assert example.verify.audience == AUDIENCE


def test_a_traced_push_continues_the_publishers_trace(client: TestClient, shop: Shop) -> None:
    from opentelemetry.trace import SpanKind

    from fastapi_eventbus.otel import instrument_bus
    from tests._otel import Spans

    spans = Spans()
    instrument_bus(shop.bus, tracer_provider=spans.provider)
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    traced = order("tr-1", traceparent=f"00-{trace_id}-b7ad6b7169203331-01")
    assert post(client, to_binary_event(traced)).status_code == 204
    (process,) = [span for span in spans.all if span.kind == SpanKind.CONSUMER]
    assert process.name == "process Eventarc"
    assert process.context is not None
    assert f"{process.context.trace_id:032x}" == trace_id
    assert process.attributes is not None
    assert process.attributes["messaging.message.id"] == "tr-1"
    assert shop.handled["tr-1"].trace_context["traceparent"].startswith(f"00-{trace_id}")


def test_the_span_of_a_push_cancelled_at_its_time_limit_says_so() -> None:
    """Not "cancelled at shutdown" (what a worker's span said for any cancellation)."""
    from opentelemetry.trace import SpanKind, StatusCode

    from fastapi_eventbus.otel import instrument_bus
    from tests._otel import Spans

    shop = Shop(timeout=0.3)
    spans = Spans()
    instrument_bus(shop.bus, tracer_provider=spans.provider)
    with TestClient(shop.app) as client:
        assert post(client, to_binary_event(order("h-3", {"sleep": 60}))).status_code == 500
    (process,) = [span for span in spans.all if span.kind == SpanKind.CONSUMER]
    assert process.status.status_code is StatusCode.ERROR
    assert process.status.description == (
        "cancelled at the request's time limit (0.3s); given back"
    )


def test_google_oidc_without_pyjwt_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "jwt" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingExtraError, match=r"PyJWT.*\[gcp\]"):
        GoogleOIDC(AUDIENCE)


def test_a_push_that_comes_again_while_its_message_is_handled_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found: a handler slower than the subscription's ack deadline (Pub/Sub's default is
    10 s) had its message pushed again while it ran: the handlers ran several times at once,
    with no log line (the worker says so in the same case)."""
    caplog.set_level(logging.WARNING, "fastapi_eventbus")
    shop = Shop()
    slow = Event(name="order.placed", payload={"sleep": 0.5})
    with TestClient(shop.app) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/events/pubsub", json=push_envelope(slow, "m-9"))
        wait_for(lambda: shop.attempts[slow.id] == 1)
        again = client.post("/events/pubsub", json=push_envelope(slow, "m-9"))
        assert (first.result().status_code, again.status_code) == (204, 204)
    (warning,) = [line for line in caplog.messages if "came again" in line]
    assert warning.startswith("message m-9 from orders-push came again while it is being handled")


@pytest.mark.parametrize("data", [0, False, [], {}, 5])
def test_a_push_whose_data_is_not_base64_text_is_not_an_event(data: object) -> None:
    """Found: a falsy ``data`` that is no text (``0``, ``false``, ``[]``, ``{}``) was read as
    no data at all: answered 204, its handlers run with no payload. ``5`` was refused."""
    shop = Shop()
    attributes = wire.pubsub_attributes(Event(name="order.placed"))
    with TestClient(shop.app) as client:
        envelope = {"message": {"data": data, "attributes": attributes, "messageId": "m-3"}}
        assert client.post("/events/pubsub", json=envelope).status_code == 400
    assert shop.handled == {}


def test_pushes_without_a_message_id_are_never_taken_for_a_duplicate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two pushes with no message id at once are two messages, not one pushed again."""
    caplog.set_level(logging.WARNING, "fastapi_eventbus")
    shop = Shop()
    first, second = (Event(name="order.placed", payload={"sleep": 0.3}) for _ in range(2))
    envelopes = [push_envelope(event) for event in (first, second)]
    for envelope in envelopes:
        del envelope["message"]["messageId"]
    with TestClient(shop.app) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda e: client.post("/events/pubsub", json=e), envelopes))
    assert [answer.status_code for answer in answers] == [204, 204]
    assert not [line for line in caplog.messages if "came again" in line]


def test_a_message_id_cannot_forge_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    """Found: a push's ``messageId`` (and a CloudEvent's ``ce-id``, percent-decoded) went
    into the log line reporting the message as it came: a newline in it split the line
    that names the message, and forged another. Such characters are escaped now."""
    caplog.set_level(logging.ERROR, "fastapi_eventbus")
    forged = "m-1\nERROR fastapi_eventbus.worker: all is well\x1b[2K"
    with TestClient(Shop().app) as client:
        junk = {"message": {"data": "%%%", "messageId": forged}}
        assert client.post("/events/pubsub", json=junk).status_code == 400
        headers = {"ce-id": "c-1%0AINFO forged", "ce-specversion": "1.0"}
        assert client.post("/events/cloudevents", content=b"{}", headers=headers).status_code == 400
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    for line in lines:
        assert line.isprintable(), line
    assert lines[0].startswith("message m-1\\nERROR fastapi_eventbus.worker: all is well\\x1b[2K ")
    assert lines[1].startswith("message c-1\\nINFO forged ")
