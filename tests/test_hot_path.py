"""What the performance work changed in behaviour users can see or rely on.

The speed itself is measured by ``python -m benchmarks`` (ratios against baselines in the
same run), never asserted here. These tests hold what the faster paths must keep or give:
no garbage per request, one serialisation of a payload however many forwarders and the
spool need it, the payload a handler gets still a JSON copy taken at ``emit``, and the
wildcard index agreeing with plain `fnmatch` on every name.
"""

from __future__ import annotations

import fnmatch
import gc
import json
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.types import ASGIApp

import fastapi_eventbus._events as events_module
import fastapi_eventbus._payloads as payloads_module
from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus._patterns import PatternIndex
from fastapi_eventbus.exceptions import InvalidEventError
from fastapi_eventbus.forwarders.sqs import SQSForwarder
from fastapi_eventbus.spool import Spool
from fastapi_eventbus.starlette import request_bus
from fastapi_eventbus.testing import RecordingForwarder, capture
from fastapi_eventbus.wire import pubsub_data, sqs_body


@pytest.fixture
def no_gc() -> Iterator[None]:
    """The collector off, so that what requests leave unreachable stays to be counted."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _post(app: ASGIApp) -> int:
    """One ``POST /`` straight through the ASGI app (a test client makes garbage of its own)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)
    return int(sent[0]["status"])


@pytest.mark.anyio
@pytest.mark.parametrize("own_background", [False, True], ids=["returns a dict", "background="])
@pytest.mark.parametrize("emits", [0, 1, 3])
async def test_a_request_leaves_no_garbage_for_the_collector(
    no_gc: None, emits: int, own_background: bool
) -> None:
    """A request's bus, its batch and its scope used to form a cycle (view -> batch ->
    scope -> view): every request left garbage, and the collector ran every ~50 requests.
    A response with its own ``background=`` (the events flushed at the request's end, where
    the bus looks for an exception a ``yield`` dependency caught) leaves none either."""
    app = FastAPI()
    bus = EventBus()
    bus.install(app)
    handled: list[str] = []

    @bus.on("order.*")
    async def record(event: Event) -> None:
        handled.append(event.id)

    async def own_task() -> None:
        pass

    @app.post("/")
    async def endpoint(b: EventBus = Depends(get_bus)) -> Any:
        for i in range(emits):
            b.emit(f"order.n{i}", {"i": i})
        if own_background:
            return JSONResponse({"ok": 1}, background=BackgroundTask(own_task))
        return {"ok": 1}

    for _ in range(5):  # warm up: first-use caches are not garbage
        assert await _post(app) == 200
    gc.collect()
    for _ in range(50):
        assert await _post(app) == 200
    unreachable = gc.collect()
    assert len(handled) == 55 * emits
    assert unreachable == 0


class _Counting:
    """Stands in for a JSON module: counts the serialisations of one payload object."""

    def __init__(self, real: Any, payload: object) -> None:
        self.real = real
        self.payload = payload
        self.count = 0

    def dumps(self, value: object, *args: Any, **kwargs: Any) -> Any:
        if value == self.payload:
            self.count += 1
        return self.real.dumps(value, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_payload_is_serialised_once_for_the_check_the_spool_and_every_forwarder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQS forwarder's emit-time check, the spool's row, the SQS body and the Pub/Sub
    data all reuse the JSON made at ``emit`` (the issue: json.dumps twice per forwarder,
    a regex scan, and the spool a third time)."""
    payload = {"order": 7, "lines": [{"sku": f"S{i}", "qty": i} for i in range(50)]}
    orjson_counter = _Counting(orjson, payload)
    json_counter = _Counting(json, payload)
    monkeypatch.setattr(events_module, "orjson", orjson_counter)
    monkeypatch.setattr(payloads_module, "orjson", orjson_counter)
    monkeypatch.setattr(events_module, "json", json_counter)
    spool = Spool(tmp_path / "spool.db")
    bus = EventBus(spool=spool)
    app = FastAPI()
    bus.install(app)
    sqs = bus.forward("order.*", SQSForwarder(queue_url="http://localhost:1/q", name="sqs"))
    recorder = bus.forward("order.*", RecordingForwarder(name="recorder"))
    emitted: list[Event] = []

    @app.post("/")
    async def endpoint(b: EventBus = Depends(get_bus)) -> None:
        emitted.append(b.emit("order.placed", payload))

    with capture(bus, handle=False):  # kept from delivery: only emit's own work is counted
        assert TestClient(app).post("/").status_code == 200
    (event,) = emitted
    assert json.loads(sqs_body(event))["data"] == payload
    assert json.loads(pubsub_data(event)) == payload
    assert sqs.encoded_size(event) > 0
    assert recorder.encoded_size(event) > 0
    assert orjson_counter.count + json_counter.count == 1
    spool.close()


def test_the_spool_stores_the_event_as_its_own_json(tmp_path: Path) -> None:
    """The spool's row (written with the reused payload JSON) reads back as the same event."""
    spool = Spool(tmp_path / "spool.db")
    event = events_module.make_event("order.placed", {"id": 1, "tags": ["a", "é"]}, "//shop")
    spool.add([("sqs", event)])
    (row,) = spool.pending()
    assert row.event == event
    spool.close()


@pytest.mark.anyio
async def test_a_handler_gets_the_payload_as_it_was_at_emit() -> None:
    """A copy is taken at emit: what the caller changes afterwards is not handled (nor sent),
    and what a handler changes is not seen by the caller."""
    app = FastAPI()
    bus = EventBus()
    bus.install(app)
    seen: list[Any] = []

    @bus.on("cart.updated")
    async def record(event: Event) -> None:
        seen.append(json.loads(json.dumps(event.payload)))
        event.payload["items"].append("from the handler")

    items = {"items": ["apple"]}

    @app.post("/")
    async def endpoint(b: EventBus = Depends(get_bus)) -> None:
        b.emit("cart.updated", items)
        items["items"].append("after emit")

    assert TestClient(app).post("/").status_code == 200
    assert seen == [{"items": ["apple"]}]
    assert items == {"items": ["apple", "after emit"]}


@pytest.mark.anyio
async def test_a_flat_payload_is_copied_too() -> None:
    """A small dict of scalars (copied without the JSON round trip) is a snapshot as well."""
    app = FastAPI()
    bus = EventBus()
    bus.install(app)
    seen: list[Any] = []

    @bus.on("cat.renamed")
    async def record(event: Event) -> None:
        seen.append(dict(event.payload))
        event.payload["name"] = "changed by the handler"

    cat = {"id": 1, "name": "tom"}

    @app.post("/")
    async def endpoint(b: EventBus = Depends(get_bus)) -> None:
        b.emit("cat.renamed", cat)
        cat["name"] = "after emit"

    assert TestClient(app).post("/").status_code == 200
    assert seen == [{"id": 1, "name": "tom"}]
    assert cat == {"id": 1, "name": "after emit"}


@pytest.mark.parametrize(
    "payload",
    [
        {"id": 1, "ok": True, "no": None, "price": 12.5, "neg": -0.0, "name": "cat"},
        {"big": 2**63, "bigger": 2**70, "small": -(2**63)},
        {"name": "chat noir é", "clé": "valeur"},
        {"when": 1.5e300, "tiny": 5e-324},
        {"nested": {"id": 1}, "list": [1, 2]},
        {1: "int key"},
    ],
)
def test_a_payload_is_the_data_its_json_carries(payload: dict[Any, Any]) -> None:
    """Whichever way it is copied, a handler's payload is what reading its JSON back gives."""
    data, _ = payloads_module.to_json_data(payload, "x", text=False)
    assert data == json.loads(json.dumps(payload))
    assert data is not payload


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_flat_payload_with_nan_is_refused(bad: float) -> None:
    with pytest.raises(InvalidEventError, match="JSON"):
        payloads_module.to_json_data({"id": 1, "value": bad}, "x", text=False)


def test_an_emitted_event_keeps_its_fields_without_a_dict_of_its_own() -> None:
    """A pending event's memory: its fields live in the object (keys shared by all events),
    not in a dict per event (272 bytes more or less, with seven fields)."""
    import tracemalloc

    events_module.make_event("warm.up", None, None)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        events = [events_module.make_event("x", None, None) for _ in range(2000)]
        per_event = (tracemalloc.get_traced_memory()[0] - before) / len(events)
    finally:
        tracemalloc.stop()
    # The object and its values (168), its id (85) and time (48); a dict of its own: 485.
    assert per_event < 400
    event = events[0]
    assert event.model_dump()["name"] == "x"
    assert Event.model_validate_json(event.model_dump_json()) == event


def test_an_untraced_events_trace_context_cannot_be_changed() -> None:
    """Untraced events share one empty trace context (no dict per event): it refuses changes."""
    event = events_module.make_event("x", None, None)
    assert event.trace_context == {}
    with pytest.raises(TypeError, match="immutable"):
        event.trace_context["traceparent"] = "00-..."  # type: ignore[index]
    assert events_module.make_event("y", None, None).trace_context == {}


PATTERNS = [
    "order.*",
    "order.created",
    "*",
    "*.created",
    "or?er.*",
    "user.[abc]*",
    "user.[!abc]*",
    "a*b*c",
    "[*]literal",
    "svc1.ev*",
    "svc10.ev*",
    "svc1",
    "",  # the empty literal prefix of "*": checked separately below
]
NAMES = [
    "order.created",
    "order.",
    "oxder.x",
    "user.alice",
    "user.dave",
    "abc",
    "a-b-c",
    "*literal",
    "svc1.event",
    "svc10.event",
    "svc1",
    "svc2.event",
    "created",
    "x.created",
    "",
]


@pytest.mark.parametrize("name", NAMES)
def test_the_pattern_index_agrees_with_fnmatch(name: str) -> None:
    """The index only tries the patterns whose literal prefix the name starts with; it
    still finds exactly what trying every pattern with `fnmatch` finds, in order."""
    index: PatternIndex[int] = PatternIndex()
    patterns = [p for p in PATTERNS if p]
    for position, pattern in enumerate(patterns):
        index.add([pattern], position)
    index.add(["nothing.*", "*.created"], len(patterns))  # one item under two patterns
    expected = [i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(name, p)]
    if fnmatch.fnmatchcase(name, "nothing.*") or fnmatch.fnmatchcase(name, "*.created"):
        expected.append(len(patterns))
    assert list(index.match(name)) == expected
    assert list(index.match(name)) == expected  # cached


def test_ten_thousand_patterns_find_the_right_handlers() -> None:
    index: PatternIndex[str] = PatternIndex()
    for i in range(10_000):
        index.add([f"svc{i}.ev*"], f"h{i}")
    index.add(["*.event"], "any")
    assert index.match("svc42.event") == ("h42", "any")
    assert index.match("svc4.events") == ("h4",)
    assert index.match("other.event") == ("any",)


@pytest.mark.anyio
async def test_the_requests_bus_is_still_there_for_code_that_runs_after_the_endpoint() -> None:
    """The request ending no longer leaves a cycle, yet code running after the endpoint (an
    ASGI middleware, here) still finds the request's bus, and what it emits is handled."""
    app = FastAPI()
    bus = EventBus()
    bus.install(app)
    handled: list[str] = []

    @bus.on("*")
    async def record(event: Event) -> None:
        handled.append(event.name)

    @app.post("/")
    async def endpoint(b: EventBus = Depends(get_bus)) -> dict[str, int]:
        b.emit("order.placed")
        return {"ok": 1}

    class Audit:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await self.app(scope, receive, send)
            request_bus(Request(scope)).emit("request.audited", {"path": scope["path"]})

    app.add_middleware(Audit)
    assert await _post(app) == 200
    assert await bus.drain(5) == []
    assert handled == ["order.placed", "request.audited"]


@pytest.mark.anyio
async def test_a_starlette_request_leaves_no_garbage_either(no_gc: None) -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from fastapi_eventbus.starlette import with_bus

    handled: list[str] = []
    bus = EventBus()

    @bus.on("order.*")
    async def record(event: Event) -> None:
        handled.append(event.id)

    @with_bus
    async def endpoint(request: Request, b: EventBus) -> JSONResponse:
        b.emit("order.placed", {"id": 1})
        return JSONResponse({"ok": 1})

    app = Starlette(routes=[Route("/", endpoint, methods=["POST"])])
    bus.install(app)
    for _ in range(5):
        assert await _post(app) == 200
    gc.collect()
    for _ in range(50):
        assert await _post(app) == 200
    assert gc.collect() == 0
    assert len(handled) == 55
