"""The security requirements, each checked against the real thing.

- Nothing in the package unpickles or evaluates what it receives: an AST scan of its
  source finds no pickle-like module and no ``eval``/``exec``.
- The worker bounds what it decodes: a message over ``max_message_bytes`` is never
  decoded (moto's SQS), and `fastapi_eventbus.wire.message_size` counts a message as
  the forwarders do and never raises.
- Message attributes are read for tracing only: forged or huge ``traceparent`` values
  do not stop a message from being handled, and no other attribute changes an event.
- Credentials never reach our logs, exceptions, dead letters or reprs: SQS against a
  server that denies access and against a closed port, Pub/Sub with a service-account
  file whose key is invalid, refused by the token endpoint, or unusable for lack of one.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import inspect
import json
import logging
import socket
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import fastapi_eventbus
from fastapi_eventbus import ConfigurationError, Event, EventBus, MessageDecodeError, SourceError
from fastapi_eventbus.forwarders import DeadLetter, Retry
from fastapi_eventbus.forwarders import pubsub as pubsub_forwarder
from fastapi_eventbus.forwarders.pubsub import PubSubForwarder
from fastapi_eventbus.forwarders.sqs import SQSForwarder
from fastapi_eventbus.otel import instrument_bus
from fastapi_eventbus.wire import (
    decode_message,
    message_size,
    pubsub_attributes,
    pubsub_data,
    sqs_body,
)
from fastapi_eventbus.worker import Backoff, PubSubSource, SQSSource, Worker
from tests._otel import Spans
from tests._support import until
from tests.conftest import serve
from tests.forwarders._moto import REGION, Moto, running_moto
from tests.worker._helpers import counts, create_queue, send_raw

PACKAGE = Path(fastapi_eventbus.__file__).parent
UNSAFE_MODULES = frozenset(
    {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "jsonpickle", "marshal", "shelve"}
)
"""Modules that turn bytes into arbitrary objects (or code): never for what arrives."""
UNSAFE_CALLS = frozenset({"eval", "exec"})

ACCESS_KEY_ID = "AKIAEXAMPLESECRETID"
SECRET_ACCESS_KEY = "s3cr3t-Do-Not-Log-wJalrXUtnFEMI/K7MDENG/bPxRfiCY"
FAKE_PRIVATE_KEY = (
    "-----BEGIN PRIVATE KEY-----\nNOT-A-KEY-s3cr3t-Do-Not-Log\n-----END PRIVATE KEY-----\n"
)


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with running_moto() as server:
        yield server


# -- no pickle, no eval ---------------------------------------------------------------------


def unsafe_uses(source: str, filename: str = "<source>") -> list[str]:
    """Imports of `UNSAFE_MODULES` and calls of `UNSAFE_CALLS` in *source*, as "file:line: what"."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call):
            names = _called(node)
        for name in names:
            if name.split(".")[0] in UNSAFE_MODULES or name in UNSAFE_CALLS:
                found.append(f"{filename}:{getattr(node, 'lineno', '?')}: {name}")
    return found


def _called(call: ast.Call) -> list[str]:
    """``eval``/``exec``, or the module a dynamic import names with a literal."""
    name = getattr(call.func, "id", None) or getattr(call.func, "attr", "")  # f() or m.f()
    if name in UNSAFE_CALLS:
        return [name]
    first = call.args[0] if call.args else None
    if name in {"__import__", "import_module"} and isinstance(first, ast.Constant):
        return [str(first.value)]
    return []


def test_the_scan_finds_what_it_looks_for() -> None:
    source = (
        "import pickle\nfrom marshal import loads\nimport shelve as s\nimport dill.settings\n"
        "eval('1')\nbuiltins.exec('x = 1')\n__import__('cloudpickle')\n"
        "importlib.import_module('_pickle')\nimport json\nimportlib.import_module(name)\n"
    )
    assert [hit.split(": ")[1] for hit in unsafe_uses(source)] == [
        "pickle",
        "marshal",
        "shelve",
        "dill.settings",
        "eval",
        "exec",
        "cloudpickle",
        "_pickle",
    ]


def test_no_module_of_the_package_can_unpickle_or_evaluate() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the scan covers the package: forwarders, worker, spool...
    found = [hit for path in files for hit in unsafe_uses(path.read_text(), str(path))]
    assert found == []


# -- message size ---------------------------------------------------------------------------


def traced_event() -> Event:
    trace_context = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=é",
    }
    return Event(name="order.placed", payload={"item": "kettle €"}, trace_context=trace_context)


def received_sqs(event: Event) -> dict[str, Any]:
    """*event* as ``ReceiveMessage`` returns what an `SQSForwarder` sent."""
    attributes = {
        name: {"DataType": "String", "StringValue": value}
        for name, value in event.trace_context.items()
    }
    return {"MessageId": "m-1", "Body": sqs_body(event), "MessageAttributes": attributes}


def test_message_size_counts_an_sqs_message_as_the_forwarder_does() -> None:
    event = traced_event()
    forwarder = SQSForwarder("https://sqs.us-east-1.amazonaws.com/1/orders")
    assert message_size(received_sqs(event)) == forwarder.encoded_size(event)
    body = "é" * 10
    attributes = {"k": {"DataType": "Binary", "BinaryValue": b"\x00\x01"}}
    assert message_size({"Body": body, "MessageAttributes": attributes}) == 20 + 1 + 6 + 2


def test_message_size_counts_a_pubsub_message_as_the_forwarder_does() -> None:
    event = traced_event()
    forwarder = PubSubForwarder("projects/p/topics/orders", emulator_host="localhost:1")
    data, attributes = pubsub_data(event), pubsub_attributes(event)
    expected = forwarder.encoded_size(event)
    assert message_size({"data": data, "attributes": attributes}) == expected
    as_pulled = {"data": base64.b64encode(data).decode(), "attributes": attributes}
    assert message_size({"ackId": "a-1", "message": as_pulled}) == expected


@pytest.mark.parametrize("length", range(7))
def test_message_size_counts_base64_data_decoded(length: int) -> None:
    data = base64.b64encode(b"x" * length).decode()
    assert message_size({"data": data}) == length


@pytest.mark.parametrize(
    ("message", "size"),
    [
        (None, 0),
        ("a string", 0),
        ([{"Body": "x"}], 0),
        ({}, 0),
        ({"Body": None}, 0),
        ({"Body": {"nested": "x" * 100}, "MessageAttributes": "x" * 100}, 0),
        ({"Body": "ab", "MessageAttributes": {"k": "not a mapping", 7: {"StringValue": 1}}}, 3),
        ({"Body": "\ud800"}, 3),  # a lone surrogate: counted, not an error
        ({"data": 12345, "attributes": ["k", "v"]}, 0),
        ({"data": b"abc", "attributes": {"k": None, None: "v", "ab": "c"}}, 3 + 1 + 1 + 3),
        ({"message": {"data": "!!not base64!!"}}, 10),  # counted as base64; decoding refuses it
        ({"message": "not a mapping", "data": b"ab"}, 2),
    ],
)
def test_message_size_never_raises(message: Any, size: int) -> None:
    assert message_size(message) == size


def test_the_default_limit_takes_whatever_the_forwarders_send() -> None:
    default = inspect.signature(Worker).parameters["max_message_bytes"].default
    sqs_maximum = 1_048_576  # what SQS allows a queue's MaximumMessageSize, and SQSForwarder
    assert default >= max(pubsub_forwarder.MAX_MESSAGE_BYTES, sqs_maximum)


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "1000", None])
def test_max_message_bytes_must_be_a_positive_int(value: Any) -> None:
    source = SQSSource("http://127.0.0.1:1/1/orders", region_name=REGION)
    with pytest.raises(ConfigurationError, match="max_message_bytes must be an int >= 1"):
        Worker(EventBus(), source, max_message_bytes=value)


def recorded(bus: EventBus) -> list[Event]:
    """The events *bus*'s handler of every name receives."""
    events: list[Event] = []

    @bus.on("*")
    def record(event: Event) -> None:
        events.append(event)

    return events


def sqs_source(moto: Moto, queue_url: str, **options: Any) -> SQSSource:
    options.setdefault("visibility_backoff", Backoff(initial=60))
    return moto.source(queue_url, **options)


@pytest.mark.anyio
@pytest.mark.parametrize(("policy", "left"), [("delete", (0, 0)), ("retry", (0, 1))])
async def test_a_message_over_the_limit_is_never_decoded(
    moto: Moto, policy: Any, left: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    queue_url = await create_queue(moto, "sizes")
    small = Event(name="order.placed", payload={"size": "small"})
    large = Event(name="order.placed", payload={"size": "large", "padding": "x" * 1000})
    large_id = await send_raw(moto, queue_url, sqs_body(large))  # a valid event, just too large
    await send_raw(moto, queue_url, sqs_body(small))
    bus = EventBus()
    spans = Spans()
    instrument_bus(bus, tracer_provider=spans.provider)
    handled = recorded(bus)
    source = sqs_source(moto, queue_url)
    async with Worker(bus, source, max_message_bytes=500, on_undecodable=policy) as worker:
        await until(
            lambda: worker.stats.received == 2 and len(spans.named("process " + source.name)) == 2
        )
    assert [event.id for event in handled] == [small.id]
    assert (worker.stats.handled, worker.stats.undecodable) == (1, 1)
    (record,) = [r for r in caplog.records if large_id in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert record.name == "fastapi_eventbus.worker"
    size = len(sqs_body(large))
    assert (
        f"is too large to decode ({size} bytes, over max_message_bytes=500)" in record.getMessage()
    )
    assert await counts(moto, queue_url) == left
    (refused,) = [
        span
        for span in spans.named("process " + source.name)
        if (span.attributes or {}).get("messaging.message.id") == large_id
    ]
    assert refused.status.description == "too large to decode"
    assert "fastapi_eventbus.event.id" not in (refused.attributes or {})


# -- attributes are for tracing only --------------------------------------------------------


FORGED_TRACEPARENTS = {
    "malformed": "not-a-traceparent",
    "huge hex": "00-" + "f" * 100_000 + "-b7ad6b7169203331-01",
    "huge": "x" * 100_000,
    "zero ids": "00-00000000000000000000000000000000-0000000000000000-01",
}
FORGED_ATTRIBUTES = {
    "ce-type": "admin.drop_tables",
    "ce-id": "forged-id",
    "ce-source": "//attacker",
    "type": "admin.drop_tables",
    "payload": '{"forged": true}',
    "ce-data": '{"forged": true}',
    "datacontenttype": "application/octet-stream",
}


def string_attributes(values: dict[str, str]) -> dict[str, Any]:
    return {name: {"DataType": "String", "StringValue": value} for name, value in values.items()}


@pytest.mark.anyio
@pytest.mark.parametrize("traced", [False, True], ids=["untraced", "traced"])
@pytest.mark.parametrize("traceparent", FORGED_TRACEPARENTS.values(), ids=FORGED_TRACEPARENTS)
async def test_forged_attributes_change_nothing_but_the_trace(
    moto: Moto, traceparent: str, traced: bool
) -> None:
    queue_url = await create_queue(moto, "forged")
    event = Event(name="order.placed", payload={"n": 1}, source="//shop")
    forged = {**FORGED_ATTRIBUTES, "traceparent": traceparent, "tracestate": "k=" + "v" * 50_000}
    async with moto.client() as sqs:
        await sqs.send_message(
            QueueUrl=queue_url,
            MessageBody=sqs_body(event),
            MessageAttributes=string_attributes(forged),
        )
    bus = EventBus()
    spans = Spans()
    if traced:
        instrument_bus(bus, tracer_provider=spans.provider)
    handled = recorded(bus)
    source = sqs_source(moto, queue_url)
    async with Worker(bus, source) as worker:
        await until(lambda: worker.stats.handled == 1)
    assert worker.stats.failed == worker.stats.undecodable == 0
    (received,) = handled
    assert (received.name, received.payload, received.id) == (event.name, event.payload, event.id)
    assert received.source == "//shop"
    assert set(received.trace_context) <= {"traceparent", "tracestate"}
    if traced:  # the forged context is not continued: the message starts a trace of its own
        process = spans.one(f"process {source.name}")
        assert process.parent is None
        assert not process.links


def test_pubsub_attributes_other_than_the_binding_change_nothing() -> None:
    event = Event(name="order.placed", payload={"n": 1}, source="//shop")
    attributes = {
        **pubsub_attributes(event),
        "payload": '{"forged": true}',
        "ce-data": '{"forged": true}',
        "type": "admin.drop_tables",
        "traceparent": "x" * 1000,
    }
    received = decode_message({"data": pubsub_data(event), "attributes": attributes})
    assert (received.name, received.payload, received.id) == (event.name, event.payload, event.id)
    assert dict(received.trace_context) == {}  # longer than any traceparent: ignored


def test_sqs_attributes_never_make_an_event() -> None:
    attributes = string_attributes({"ce-specversion": "1.0", "ce-id": "1", "ce-type": "a.b"})
    with pytest.raises(MessageDecodeError):
        decode_message({"Body": "", "MessageAttributes": attributes})


# -- credentials stay out of logs and errors ------------------------------------------------


@dataclass
class Evidence:
    """Everything a failure left behind that a person or a log pipeline could read."""

    caplog: pytest.LogCaptureFixture
    texts: list[str] = field(default_factory=list)

    def error(self, exc: BaseException) -> None:
        """An exception: its chain's messages and reprs, and the formatted traceback."""
        self.texts.append("".join(traceback.format_exception(exc)))
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            self.texts += [str(current), repr(current)]
            current = current.__cause__ or current.__context__

    def dead_letters(self, letters: Iterable[DeadLetter]) -> None:
        for letter in letters:
            self.texts += [repr(letter), letter.reason]
            if letter.exception is not None:
                self.error(letter.exception)

    def ours(self) -> list[str]:
        """Our log records (message and traceback), and the texts collected."""
        records = [r for r in self.caplog.records if r.name.split(".")[0] == "fastapi_eventbus"]
        assert records, "our loggers said nothing: the failure was not exercised"
        return [*map(_record_text, records), *self.texts]

    def everything(self) -> list[str]:
        """Every log record of every logger (botocore's, aiohttp's...), and the texts collected."""
        return [*map(_record_text, self.caplog.records), *self.texts]


def _record_text(record: logging.LogRecord) -> str:
    return logging.Formatter("%(name)s %(levelname)s %(message)s").format(record)


def assert_absent(secrets: Iterable[str], texts: list[str]) -> None:
    for secret in secrets:
        leaks = [text[:300] for text in texts if secret in text]
        assert not leaks, f"{secret!r} leaked into: {leaks}"


@pytest.fixture
def evidence(caplog: pytest.LogCaptureFixture) -> Evidence:
    caplog.set_level(logging.DEBUG)  # the root logger: every library's DEBUG records too
    return Evidence(caplog)


def closed_port() -> int:
    """A port nothing listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class DenyingServer:
    """An SQS endpoint that refuses every call with AccessDenied, and records what it got."""

    requests: list[str] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/{path:path}")
        async def deny(request: Request) -> JSONResponse:
            self.requests.append(f"{request.headers!r} {(await request.body()).decode()}")
            return JSONResponse(
                {
                    "__type": "com.amazon.coral.service#AccessDeniedException",
                    "message": "Access to the resource https://sqs.us-east-1.amazonaws.com/ "
                    "is denied.",
                },
                status_code=403,
                headers={"x-amzn-query-error": "AccessDenied;Sender"},
            )

        return app


async def sqs_failures(endpoint: str, evidence: Evidence) -> None:
    """Publish through an `SQSForwarder` and receive through an `SQSSource`, both failing."""
    queue_url = f"{endpoint}/123456789012/orders"
    letters: list[DeadLetter] = []
    forwarder = SQSForwarder(
        queue_url,
        endpoint_url=endpoint,
        region_name=REGION,
        retry=Retry(attempts=2, initial_delay=0.01, max_delay=0.01),
        dead_letter=letters.append,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
    )
    bus = EventBus()
    bus.forward("order.*", forwarder)
    await bus.publish("order.placed", {"n": 1})
    await bus.close()
    assert len(letters) == 1
    evidence.dead_letters(letters)
    source = SQSSource(
        queue_url,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
    )
    async with source:
        with pytest.raises(SourceError) as caught:
            await source.receive(1)
    evidence.error(caught.value)
    evidence.texts += [repr(forwarder), repr(source), repr(Worker(EventBus(), source))]


@pytest.mark.anyio
async def test_sqs_credentials_stay_out_of_errors_when_access_is_denied(
    evidence: Evidence,
) -> None:
    server = DenyingServer()
    with serve(server.app()) as endpoint:
        await sqs_failures(endpoint, evidence)
        worker = Worker(
            EventBus(),
            SQSSource(
                f"{endpoint}/1/orders",
                endpoint_url=endpoint,
                region_name=REGION,
                aws_access_key_id=ACCESS_KEY_ID,
                aws_secret_access_key=SECRET_ACCESS_KEY,
            ),
        )
        with pytest.raises(SourceError, match="AccessDenied") as caught:
            await worker.run()  # a denied permission stops the worker
        evidence.error(caught.value)
    assert "AccessDenied (HTTP 403)" in "\n".join(evidence.ours())
    assert_absent([SECRET_ACCESS_KEY, ACCESS_KEY_ID], evidence.ours())
    # botocore logs the signed request at DEBUG: its Authorization header names the key
    # id (botocore's logging, not ours). The secret itself is never sent, so it is in no
    # log record of any library, nor in anything the server received.
    assert_absent([SECRET_ACCESS_KEY], evidence.everything() + server.requests)
    assert any(ACCESS_KEY_ID in request for request in server.requests)


@pytest.mark.anyio
async def test_sqs_credentials_stay_out_of_errors_when_the_endpoint_is_unreachable(
    evidence: Evidence,
) -> None:
    await sqs_failures(f"http://127.0.0.1:{closed_port()}", evidence)
    assert "cannot reach SQS" in "\n".join(evidence.ours())
    assert_absent([SECRET_ACCESS_KEY, ACCESS_KEY_ID], evidence.ours())
    assert_absent([SECRET_ACCESS_KEY], evidence.everything())


# -- Pub/Sub: a service-account file ----------------------------------------------------------


def private_key_pem() -> str:
    """A real RSA private key in PEM (gcloud-aio signs its token requests with it)."""
    serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
    rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem.decode()


def token_endpoint() -> FastAPI:
    """Google's token endpoint as it answers a service account it does not accept."""
    app = FastAPI()

    @app.post("/token")
    async def token() -> JSONResponse:
        body = {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        return JSONResponse(body, status_code=400)

    return app


def service_file(path: Path, private_key: str, token_uri: str) -> str:
    fields = {
        "type": "service_account",
        "project_id": "shop",
        "private_key_id": "0123456789abcdef",
        "private_key": private_key,
        "client_email": "worker@shop.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(fields))
    return str(path)


async def pubsub_failures(file: str, evidence: Evidence) -> None:
    """Publish through a `PubSubForwarder` and pull through a `PubSubSource` with *file*.

    ``api_root`` is https (not an emulator), so both need an access token first, which
    gcloud-aio gets with the file's private key, retrying for several seconds: the two
    run at once.
    """
    api_root = f"https://127.0.0.1:{closed_port()}/v1"
    await asyncio.gather(
        publish_with(file, api_root, evidence), pull_with(file, api_root, evidence)
    )


async def publish_with(file: str, api_root: str, evidence: Evidence) -> None:
    letters: list[DeadLetter] = []
    forwarder = PubSubForwarder(
        "projects/shop/topics/orders",
        api_root=api_root,
        service_file=file,
        retry=Retry(attempts=1),
        dead_letter=letters.append,
    )
    bus = EventBus()
    bus.forward("order.*", forwarder)
    await bus.publish("order.placed", {"n": 1})
    await bus.close()
    assert len(letters) == 1
    evidence.dead_letters(letters)
    evidence.texts.append(repr(forwarder))


async def pull_with(file: str, api_root: str, evidence: Evidence) -> None:
    source = PubSubSource(
        "projects/shop/subscriptions/orders-worker", api_root=api_root, service_file=file
    )
    async with source:
        # Whatever fails (the SDK's own error when the key is invalid: not translated),
        # it must not carry the key.
        with pytest.raises(Exception) as caught:
            await source.receive(1)
    evidence.error(caught.value)
    evidence.texts.append(repr(source))


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_service_account_key_stays_out_of_logs_and_errors(
    evidence: Evidence, tmp_path: Path
) -> None:
    pem = private_key_pem()
    with serve(token_endpoint()) as base:
        files = [
            service_file(tmp_path / "invalid.json", FAKE_PRIVATE_KEY, f"{base}/token"),
            service_file(tmp_path / "refused.json", pem, f"{base}/token"),
            service_file(
                tmp_path / "no-endpoint.json", pem, f"http://127.0.0.1:{closed_port()}/token"
            ),
        ]
        await asyncio.gather(*(pubsub_failures(file, evidence) for file in files))
    ours = "\n".join(evidence.ours())
    assert "invalid_grant" in ours  # the three failures were all exercised
    assert "Cannot connect" in ours
    assert "Could not parse" in ours
    key_lines = [line for line in pem.splitlines() if not line.startswith("-----")]
    marker = "NOT-A-KEY-s3cr3t-Do-Not-Log"
    assert_absent([marker, *key_lines], evidence.everything())
