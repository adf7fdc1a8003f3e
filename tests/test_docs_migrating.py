"""docs/migrating.md: both sides of every example, run and checked.

Each example under ``docs/examples/migrating/`` comes in a pair:
``<feature>_fastapi_events.py``, the fastapi-events code, and ``<feature>_eventbus.py``,
ours. Our side always runs here. The fastapi-events side runs too, against fastapi-events
0.12 (the ``dev`` extra installs it), except ``pubsub_fastapi_events.py``: it needs
google-cloud-pubsub, which is not installed, so it is only parsed and compiled. The
tests marked "the page says" check what docs/migrating.md claims about either library.
"""

import ast
import asyncio
import importlib.util
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from enum import Enum, StrEnum
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import pydantic
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient
from fastapi_events.dispatcher import dispatch
from fastapi_events.handlers.local import LocalHandler
from fastapi_events.middleware import EventHandlerASGIMiddleware
from opentelemetry.trace import SpanKind

from fastapi_eventbus import (
    DiscardedEvents,
    Event,
    EventBus,
    HandlerFailure,
    InvalidEventError,
    OutsideRequestError,
    get_bus,
)
from fastapi_eventbus.testing import capture
from fastapi_eventbus.wire import decode_message
from fastapi_eventbus.worker import PubSubSource, Worker, WorkerStats
from tests._pubsub import PROJECT, Emulator
from tests._support import ROOT, ASGIApp, load_module, on_response_sent, until, wait_for
from tests.forwarders._moto import KEY_ID, REGION, SECRET, Moto, running_moto

EXAMPLES = ROOT / "docs/examples/migrating"
Loader = Callable[[str], ModuleType]


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch) -> Loader:
    """Import ``docs/examples/migrating/<stem>.py`` afresh, so its module state starts empty."""

    def _load(stem: str) -> ModuleType:
        return load_module(EXAMPLES / f"{stem}.py", monkeypatch)

    return _load


def noting_at_response(app: Any, probe: Callable[[], object]) -> tuple[ASGIApp, list[object]]:
    """Wrap *app*: note ``probe()`` at the moment a response's last body chunk is sent."""
    noted: list[object] = []
    return on_response_sent(app, lambda: noted.append(probe())), noted


# -- the middleware -> bus.install(app) ------------------------------------------------------


@pytest.mark.parametrize("side", ["setup_fastapi_events", "setup_eventbus"])
def test_setup_handles_the_event_after_the_response(load: Loader, side: str) -> None:
    mod = load(side)
    app, noted = noting_at_response(mod.app, lambda: list(mod.WELCOMED))
    with TestClient(app) as client:
        assert client.post("/cats").status_code == 201
    assert noted == [[]]  # nothing handled yet when the response went out
    assert mod.WELCOMED == [1]


# -- dispatch() -> bus.emit() ----------------------------------------------------------------


@pytest.mark.parametrize("side", ["dispatch_fastapi_events", "dispatch_eventbus"])
def test_service_code_emits_through_the_request(load: Loader, side: str) -> None:
    mod = load(side)
    app, noted = noting_at_response(mod.app, lambda: list(mod.SEEN))
    with TestClient(app) as client:
        assert client.post("/cats/7/adopt").status_code == 200
    assert noted == [[]]
    assert mod.SEEN == [("cat.adopted", {"cat_id": 7}), ("cat.spotted", None)]


def test_the_page_says_emit_needs_the_requests_bus(load: Loader) -> None:
    mod = load("dispatch_eventbus")
    with pytest.raises(OutsideRequestError):
        mod.bus.emit("cat.spotted")


# -- local_handler.register -> @bus.on -------------------------------------------------------


def test_eventbus_handlers_get_yield_dependencies(load: Loader) -> None:
    mod = load("handlers_eventbus")
    with TestClient(mod.app) as client:
        assert client.post("/cats").status_code == 201
    [session] = mod.SESSIONS
    assert session.connection.dsn == "postgresql://shop"  # the sub-dependency
    assert session.rows == ["cat.created 1"]
    assert session.committed  # after the handler returned
    assert session.closed
    assert mod.LOG == ["cat.created"]


def test_eventbus_handlers_see_dependency_overrides(load: Loader) -> None:
    mod = load("handlers_eventbus")
    mod.test_cat_events_go_to_the_test_session()
    [session] = mod.SESSIONS  # get_db_session itself never ran
    assert session.connection.dsn == "sqlite://"
    assert session.rows == ["cat.created 1"]
    assert mod.app.dependency_overrides == {}


def test_fastapi_events_handlers_get_their_dependencies(load: Loader) -> None:
    mod = load("handlers_fastapi_events")
    with TestClient(mod.app) as client:
        assert client.post("/cats").status_code == 201
    [session] = mod.SESSIONS
    assert session.connection.dsn == "postgresql://shop"
    assert session.rows == ["cat.created 1"]
    assert mod.LOG == ["cat.created"]


def test_the_page_says_fastapi_events_ignores_dependency_overrides(load: Loader) -> None:
    mod = load("handlers_fastapi_events")
    replacement = mod.Session(mod.Connection("sqlite://"))
    mod.app.dependency_overrides[mod.get_db_session] = lambda: replacement
    with TestClient(mod.app) as client:
        client.post("/cats")
    assert replacement.rows == []
    assert [s.rows for s in mod.SESSIONS] == [[], ["cat.created 1"]]  # a real session got it


def test_the_page_says_fastapi_events_has_no_yield_or_sync_dependencies(load: Loader) -> None:
    mod = load("handlers_fastapi_events")
    got: list[object] = []

    def get_name() -> Iterator[str]:
        yield "Tom"

    async def from_generator(event: Any, name: str = Depends(get_name)) -> None:
        got.append(name)

    def sync_handler(event: Any, conn: Any = Depends(mod.get_db_conn)) -> None:
        got.append(conn)

    mod.local_handler.register(from_generator, event_name="dog.*")
    mod.local_handler.register(sync_handler, event_name="bird.*")

    app: FastAPI = mod.app

    @app.post("/pets/{kind}")
    async def create_pet(kind: str) -> None:
        dispatch(f"{kind}.created", {"id": 1})

    with TestClient(app) as client:
        client.post("/pets/dog")
        client.post("/pets/bird")
    generator, depends = got
    assert type(generator).__name__ == "generator"  # not the value it yields
    assert type(depends).__name__ == "Depends"  # the marker itself, not the connection


def test_the_page_says_eventbus_sync_handlers_get_dependencies(load: Loader) -> None:
    mod = load("handlers_eventbus")
    bus: EventBus = mod.bus
    got: list[object] = []

    @bus.on("cat.*")
    def sync_handler(conn: Annotated[Any, Depends(mod.get_db_conn)]) -> None:
        got.append(conn.dsn)

    with TestClient(mod.app) as client:
        client.post("/cats")
    assert got == ["postgresql://shop"]


# -- payload schemas -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("side", "error"),
    [
        ("schemas_fastapi_events", pydantic.ValidationError),
        ("schemas_eventbus", InvalidEventError),
    ],
)
def test_a_schema_mismatch_raises_in_the_endpoint(
    load: Loader, side: str, error: type[Exception]
) -> None:
    mod = load(side)
    year = datetime.now(UTC).year
    with TestClient(mod.app) as client:
        assert client.post("/users", json={"plan": "pro"}).status_code == 201
        with pytest.raises(error) as raised:
            client.post("/users", json={"plan": "gold"})
    assert "sign_up" in [entry.name for entry in raised.traceback]  # raised by the endpoint
    # The bad one was not handled; the good one's created_at was a datetime to the handler.
    assert mod.WELCOMED in ([("pro", year)], [("pro", datetime.now(UTC).year)])


def test_the_page_says_payloads_become_json_data(load: Loader) -> None:
    mod = load("schemas_eventbus")
    with TestClient(mod.app) as client, capture(mod.bus) as events:
        client.post("/users", json={"plan": "free"})
    [event] = events.emitted
    assert event.name == "USER_SIGNED_UP"  # the StrEnum's value
    assert isinstance(event.payload["created_at"], str)
    assert isinstance(event.payload["user_id"], str)
    assert datetime.fromisoformat(event.payload["created_at"]).tzinfo is not None


@pytest.mark.anyio
async def test_the_page_says_a_plain_enum_is_not_an_event_name() -> None:
    class PlainEvents(Enum):
        SIGNED_UP = "USER_SIGNED_UP"

    class StrEvents(StrEnum):
        SIGNED_UP = "USER_SIGNED_UP"

    bus = EventBus()
    with pytest.raises(InvalidEventError, match="event name must be a str"):
        await bus.publish(PlainEvents.SIGNED_UP)  # type: ignore[call-overload]
    assert (await bus.publish(StrEvents.SIGNED_UP)).name == "USER_SIGNED_UP"


def test_the_page_says_fastapi_events_matches_str_of_a_plain_enum(load: Loader) -> None:
    mod = load("schemas_fastapi_events")
    seen: list[str] = []

    async def by_class_name(event: Any) -> None:
        seen.append(str(event[0]))

    mod.local_handler.register(by_class_name, event_name="UserEvents.*")
    with TestClient(mod.app) as client:
        client.post("/users", json={"plan": "free"})
    assert seen == ["UserEvents.SIGNED_UP"]


def test_the_page_says_fastapi_events_leaves_unset_defaults_out() -> None:
    from fastapi_events.registry.payload_schema import registry

    class Renamed(pydantic.BaseModel):
        name: str
        reason: str = "none given"

    name = f"cat.renamed.{uuid.uuid4().hex}"  # the registry is global: a name of its own
    registry.register(Renamed, event_name=name)  # type: ignore[no-untyped-call]
    peer, register = peer_app()
    payloads: list[object] = []

    async def record(event: Any) -> None:
        payloads.append(event[1])

    register("*", record)

    @peer.post("/rename")
    async def rename() -> None:
        dispatch(name, {"name": "Tom"})

    bus = EventBus()
    bus.register(name, Renamed)
    with TestClient(peer) as client, capture(bus) as events:
        client.post("/rename")
        asyncio.run(bus.publish(name, {"name": "Tom"}))
    assert payloads == [{"name": "Tom"}]
    assert events.emitted[0].payload == {"name": "Tom", "reason": "none given"}


# -- pydantic models as events ---------------------------------------------------------------


@pytest.mark.parametrize("side", ["models_fastapi_events", "models_eventbus"])
def test_a_model_is_the_event(load: Loader, side: str) -> None:
    mod = load(side)
    cat_id = uuid.uuid4()
    with TestClient(mod.app) as client:
        assert client.post(f"/cats/{cat_id}/fish").status_code == 202
    assert [cat_id] == mod.FED  # a UUID on both sides


@pytest.mark.anyio
async def test_the_page_says_on_model_registers_its_schema(load: Loader) -> None:
    mod = load("models_eventbus")
    with pytest.raises(InvalidEventError, match="does not match its schema"):
        await mod.bus.publish("cat-requested-a-fish", {"cat_id": "not a uuid"})
    cat_id = uuid.uuid4()
    await mod.bus.publish("cat-requested-a-fish", {"cat_id": str(cat_id)})
    assert [cat_id] == mod.FED


@pytest.mark.anyio
async def test_the_page_says_an_event_handler_gets_json_and_a_model_can_be_renamed(
    load: Loader,
) -> None:
    mod = load("models_eventbus")
    bus: EventBus = mod.bus
    seen: list[tuple[str, Any]] = []

    @bus.on("*")
    async def envelope(event: Event) -> None:
        seen.append((event.name, event.payload))

    cat_id = uuid.uuid4()
    await bus.publish(mod.CatRequestedAFishEvent(cat_id=cat_id))
    await bus.publish("cat.fed", mod.CatRequestedAFishEvent(cat_id=cat_id))
    assert seen == [
        ("cat-requested-a-fish", {"cat_id": str(cat_id)}),
        ("cat.fed", {"cat_id": str(cat_id)}),
    ]
    assert [cat_id] == mod.FED  # feed_cat matched the first one only


def test_the_page_says_fastapi_events_ignores_event_name_for_a_model(load: Loader) -> None:
    mod = load("models_fastapi_events")
    seen: list[str] = []

    async def record(event: Any) -> None:
        seen.append(event[0])

    mod.local_handler.register(record, event_name="cat.fed")
    app: FastAPI = mod.app

    @app.post("/fed")
    async def fed() -> None:
        dispatch(mod.CatRequestedAFishEvent(cat_id=uuid.uuid4()), event_name="cat.fed")

    with TestClient(app) as client:
        client.post("/fed")
    assert seen == []  # its docstring says event_name= wins; 0.12.2 uses __event_name__
    assert len(mod.FED) == 1


# -- SQS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with running_moto() as server:
        yield server


@pytest.fixture
def sqs_queue(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh queue on moto, and the environment both examples read."""
    queue_url = moto.queue("migrating")
    monkeypatch.setenv("EVENTS_QUEUE_URL", queue_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", moto.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return queue_url


def test_fastapi_events_sends_a_json_array_to_sqs(load: Loader, moto: Moto, sqs_queue: str) -> None:
    mod = load("sqs_fastapi_events")
    with TestClient(mod.app) as client:
        assert client.post("/orders").status_code == 201
    [message] = moto.receive(sqs_queue, 1)
    assert json.loads(message["Body"]) == ["order.placed", {"order_id": 1}]


def test_eventbus_sends_a_cloudevent_to_sqs(load: Loader, moto: Moto, sqs_queue: str) -> None:
    mod = load("sqs_eventbus")
    with TestClient(mod.app) as client:
        assert client.post("/orders").status_code == 201
    [message] = moto.receive(sqs_queue, 1)
    assert json.loads(message["Body"])["specversion"] == "1.0"
    event = decode_message(message)
    assert (event.name, event.payload) == ("order.placed", {"order_id": 1})


def test_eventbus_worker_handles_what_the_app_forwarded(
    load: Loader, moto: Moto, sqs_queue: str
) -> None:
    mod = load("sqs_eventbus")
    with TestClient(mod.app) as client:
        client.post("/orders")
    assert mod.RECEIPTS == []  # the web app handles nothing itself

    async def work() -> WorkerStats:
        async with Worker(mod.worker_app, moto.source(sqs_queue)) as worker:
            await until(lambda: worker.stats.handled == 1, timeout=20)
        return worker.stats

    assert asyncio.run(work()).handled == 1
    assert mod.RECEIPTS == [1]
    assert moto.receive(sqs_queue, 0, timeout=0.5) == []  # deleted once handled


def test_the_sqs_worker_command_finds_the_worker_app(sqs_queue: str) -> None:
    """The comment in sqs_eventbus.py names ``sqs_eventbus:worker_app``: it loads."""
    command = [sys.executable, "-m", "fastapi_eventbus", "handlers", "sqs_eventbus:worker_app"]
    command += ["--app-dir", str(EXAMPLES)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "sqs_eventbus.send_receipt" in done.stdout


# -- Google Pub/Sub --------------------------------------------------------------------------


def test_fastapi_events_pubsub_side_is_only_compiled() -> None:
    """Not executed: GoogleCloudSimplePubSubHandler needs google-cloud-pubsub, not installed."""
    path = EXAMPLES / "pubsub_fastapi_events.py"
    source = path.read_text()
    compile(ast.parse(source, str(path)), str(path), "exec")
    with pytest.raises(ImportError, match="google"):  # google-cloud-pubsub is missing
        import fastapi_events.handlers.gcp  # noqa: F401
    # The comment on batch_settings_kwargs, checked against the handler's source.
    spec = importlib.util.find_spec("fastapi_events.handlers.gcp")
    assert spec is not None
    assert spec.origin is not None
    handler_source = Path(spec.origin).read_text()
    assert "batch_settings_kwargs: Optional[Dict[str, Any]] = None" in handler_source
    assert "**batch_settings_kwargs" in handler_source


@pytest.mark.slow
def test_eventbus_pubsub_forwards_and_the_worker_handles(
    load: Loader, pubsub_emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel = pubsub_emulator.channel()
    monkeypatch.setenv("EVENTS_TOPIC", channel.topic)
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator.host)
    mod = load("pubsub_eventbus")
    with TestClient(mod.app) as client:
        assert client.post("/orders").status_code == 201
    assert mod.RECEIPTS == []

    async def work() -> WorkerStats:
        subscription = f"projects/{PROJECT}/subscriptions/{channel.subscription}"
        async with Worker(mod.worker_app, PubSubSource(subscription)) as worker:
            await until(lambda: worker.stats.handled == 1, timeout=20)
        return worker.stats

    assert asyncio.run(work()).handled == 1
    assert mod.RECEIPTS == [1]


# -- OpenTelemetry ---------------------------------------------------------------------------

PEER_OTEL_DRIVER = """
import importlib.util, json, sys
from fastapi.testclient import TestClient

spec = importlib.util.spec_from_file_location("otel_fastapi_events", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
with TestClient(mod.app) as client:
    client.post("/orders")
spans = [(s.name, s.kind.name) for s in mod.exporter.get_finished_spans()]
print(json.dumps({"spans": spans, "payloads": mod.PAYLOADS}))
"""


def test_fastapi_events_traces_with_the_global_provider() -> None:
    """In a process of its own: the example sets the global tracer provider."""
    path = EXAMPLES / "otel_fastapi_events.py"
    command = [sys.executable, "-c", PEER_OTEL_DRIVER, str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert ["Event order.placed dispatched", "PRODUCER"] in result["spans"]
    assert ["handling event order.placed with LocalHandler", "CONSUMER"] in result["spans"]
    [payload] = result["payloads"]
    assert payload["order_id"] == 1
    assert "traceparent" in payload  # the page says: fastapi-events writes it into the payload


def test_eventbus_traces_emit_and_handler(load: Loader) -> None:
    mod = load("otel_eventbus")
    with TestClient(mod.app) as client:
        client.post("/orders")
    spans = {span.name: span for span in mod.exporter.get_finished_spans()}
    emit, process = spans["emit order.placed"], spans["process order.placed"]
    assert (emit.kind, process.kind) == (SpanKind.PRODUCER, SpanKind.CONSUMER)
    assert emit.context is not None
    assert process.parent is not None
    assert process.parent.span_id == emit.context.span_id
    assert [link.context.span_id for link in process.links] == [emit.context.span_id]
    [event] = mod.EVENTS
    assert event.payload == {"order_id": 1}  # the trace context is not in the payload...
    assert f"{emit.context.span_id:016x}" in event.trace_context["traceparent"]  # ...but here


# -- turning events off ----------------------------------------------------------------------


def test_fastapi_events_disable_env_var(load: Loader, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = load("disable_fastapi_events")
    mod.test_sign_up_without_events(monkeypatch)
    monkeypatch.delenv("FASTAPI_EVENTS_DISABLE_DISPATCH")
    with TestClient(mod.app) as client:
        client.post("/users")
    assert mod.WELCOMED == [1]  # read at every dispatch(): on again


def test_eventbus_capture_without_handlers(load: Loader) -> None:
    mod = load("disable_eventbus")
    mod.test_sign_up_without_events()
    with TestClient(mod.app) as client:
        client.post("/users")
    assert mod.WELCOMED == [1]  # outside the capture block, handled


def test_the_page_says_the_env_var_is_read_when_the_bus_is_created(
    load: Loader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTAPI_EVENTBUS_DISABLED", "1")
    mod = load("disable_eventbus")
    assert mod.bus.disabled
    with TestClient(mod.app) as client, capture(mod.bus) as events:
        client.post("/users")
    assert events.names == ["user.signed_up"]
    assert mod.WELCOMED == []
    with pytest.raises(InvalidEventError):  # still validated
        asyncio.run(mod.bus.publish("user.signed_up", float("nan")))

    monkeypatch.delenv("FASTAPI_EVENTBUS_DISABLED")
    assert mod.bus.disabled  # unsetting it later changes nothing for this bus
    assert not load("disable_eventbus").bus.disabled  # a new bus reads it again


def test_the_page_says_setting_the_env_var_after_the_bus_is_created_is_too_late(
    load: Loader, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = load("disable_eventbus")
    monkeypatch.setenv("FASTAPI_EVENTBUS_DISABLED", "1")
    with TestClient(mod.app) as client:
        client.post("/users")
    assert mod.WELCOMED == [1]


# -- outside a request -----------------------------------------------------------------------


def test_fastapi_events_dispatches_at_startup_in_a_task(load: Loader) -> None:
    mod = load("outside_fastapi_events")
    with TestClient(mod.app):
        wait_for(lambda: mod.STARTS == [{"version": "1.0"}], timeout=10)


def test_the_page_says_fastapi_events_needs_the_middleware_id_outside_requests() -> None:
    with pytest.raises(LookupError):
        dispatch("app.started", payload={"version": "1.0"})


def test_eventbus_publishes_at_startup_and_waits(load: Loader) -> None:
    mod = load("outside_eventbus")
    with TestClient(mod.app):
        assert mod.STARTS == [{"version": "1.0"}]  # handled before startup finished


def test_eventbus_publishes_from_a_script(load: Loader) -> None:
    mod = load("outside_eventbus")
    asyncio.run(mod.main())
    assert mod.STARTS == [{"version": "script"}]


# -- custom handlers -> Forwarder ------------------------------------------------------------


@pytest.mark.parametrize("side", ["custom_fastapi_events", "custom_eventbus"])
def test_a_custom_sink_gets_the_requests_events_in_one_call(load: Loader, side: str) -> None:
    mod = load(side)
    app, noted = noting_at_response(mod.app, lambda: list(mod.AUDIT_SERVICE))
    with TestClient(app) as client:
        assert client.post("/orders").status_code == 201
    assert noted == [[]]
    assert mod.AUDIT_SERVICE == [
        [("order.placed", {"order_id": 1}), ("order.paid", {"order_id": 1})]
    ]


# -- differences in behaviour ------------------------------------------------------------------
#
# Small apps of both kinds, one per claim of the page's last section.

Register = Callable[[str, Callable[..., Any]], None]


def peer_app() -> tuple[FastAPI, Register]:
    """A fastapi-events app and a function that registers a local handler on it."""
    handler = LocalHandler()  # type: ignore[no-untyped-call]  # fastapi-events is partly typed
    app = FastAPI()
    app.add_middleware(EventHandlerASGIMiddleware, handlers=[handler])

    def register(pattern: str, func: Callable[..., Any]) -> None:
        handler.register(func, event_name=pattern)  # type: ignore[no-untyped-call]

    return app, register


def test_the_page_says_a_failed_requests_events_are_discarded() -> None:
    discarded: list[DiscardedEvents] = []
    handled: list[str] = []
    bus, app = EventBus(on_discard=discarded.append), FastAPI()
    bus.install(app)
    bus.on("*")(lambda event: handled.append(event.name))

    @app.post("/fail")
    async def fail(bus: Annotated[EventBus, Depends(get_bus)]) -> None:
        bus.emit("order.placed")
        raise HTTPException(409)

    peer, register = peer_app()
    register("*", lambda event: handled.append(f"fastapi-events {event[0]}"))

    @peer.post("/fail")
    async def peer_fail() -> None:
        dispatch("order.placed")
        raise HTTPException(409)

    for target in (app, peer):
        with TestClient(target) as client:
            assert client.post("/fail").status_code == 409
    assert handled == ["fastapi-events order.placed"]  # ours: discarded
    assert [d.events[0].name for d in discarded] == ["order.placed"]


def test_the_page_says_where_handlers_run_among_background_tasks_and_dependencies() -> None:
    timeline: list[str] = []

    def session() -> Iterator[None]:
        yield
        timeline.append("session closed")

    bus, app = EventBus(), FastAPI()
    bus.install(app)
    bus.on("*")(lambda event: timeline.append("handled"))

    @app.post("/orders")
    async def place(
        _: Annotated[None, Depends(session)],
        bus: Annotated[EventBus, Depends(get_bus)],
        tasks: BackgroundTasks,
    ) -> None:
        tasks.add_task(timeline.append, "earlier background task")
        bus.emit("order.placed")
        tasks.add_task(timeline.append, "later background task")

    peer, register = peer_app()
    register("*", lambda event: timeline.append("handled"))

    @peer.post("/orders")
    async def peer_place(_: Annotated[None, Depends(session)], tasks: BackgroundTasks) -> None:
        tasks.add_task(timeline.append, "earlier background task")
        dispatch("order.placed")
        tasks.add_task(timeline.append, "later background task")

    with TestClient(app) as client:
        client.post("/orders")
    assert timeline == [
        "earlier background task",
        "handled",
        "later background task",
        "session closed",
    ]
    timeline.clear()
    with TestClient(peer) as client:
        client.post("/orders")
    assert timeline == [
        "earlier background task",
        "later background task",
        "session closed",
        "handled",
    ]


def test_the_page_says_events_are_handled_one_at_a_time() -> None:
    async def slow(event: Any) -> None:
        name = event.name if isinstance(event, Event) else event[0]
        steps.append(f"start {name}")
        await asyncio.sleep(0.01)
        steps.append(f"end {name}")

    steps: list[str] = []
    bus, app = EventBus(), FastAPI()
    bus.install(app)
    bus.on("*")(slow)

    @app.post("/orders")
    async def place(bus: Annotated[EventBus, Depends(get_bus)]) -> None:
        bus.emit("a")
        bus.emit("b")

    peer, register = peer_app()
    register("*", slow)

    @peer.post("/orders")
    async def peer_place() -> None:
        dispatch("a")
        dispatch("b")

    with TestClient(app) as client:
        client.post("/orders")
    assert steps == ["start a", "end a", "start b", "end b"]
    steps.clear()
    with TestClient(peer) as client:
        client.post("/orders")
    assert steps == ["start a", "start b", "end a", "end b"]  # gathered


def test_the_page_says_a_failing_handler_does_not_stop_the_others() -> None:
    failures: list[HandlerFailure] = []
    handled: list[str] = []

    def broken(event: Any) -> None:
        raise RuntimeError("mail server down")

    bus, app = EventBus(on_error=failures.append), FastAPI()
    bus.install(app)
    bus.on("*")(broken)
    bus.on("*")(lambda event: handled.append("ours"))

    @app.post("/orders")
    async def place(bus: Annotated[EventBus, Depends(get_bus)]) -> None:
        bus.emit("order.placed")

    async def async_broken(event: Any) -> None:
        broken(event)

    peer, register = peer_app()
    register("*", async_broken)
    register("*", lambda event: handled.append("fastapi-events"))

    @peer.post("/orders")
    async def peer_place() -> None:
        dispatch("order.placed")

    with TestClient(app) as client:
        assert client.post("/orders").status_code == 200
    assert [type(f.exception) for f in failures] == [RuntimeError]
    with TestClient(peer) as client, pytest.raises(RuntimeError, match="mail server down"):
        client.post("/orders")  # out of the middleware, to the server
    assert handled == ["ours"]  # fastapi-events' second handler never ran


def test_the_page_says_payloads_are_checked_and_converted_at_emit() -> None:
    at = datetime(2025, 6, 1, 12, tzinfo=UTC)
    received: list[object] = []
    bus, app = EventBus(), FastAPI()
    bus.install(app)
    bus.on("*")(lambda event: received.append(event.payload["at"]))

    @app.post("/orders/{what}")
    async def place(what: str, bus: Annotated[EventBus, Depends(get_bus)]) -> None:
        bus.emit("order.placed", {"at": at if what == "date" else object()})

    async def peer_record(event: Any) -> None:
        received.append(event[1]["at"])

    peer, register = peer_app()
    register("*", peer_record)

    @peer.post("/orders/{what}")
    async def peer_place(what: str) -> None:
        dispatch("order.placed", {"at": at if what == "date" else object()})

    with TestClient(app) as client:
        client.post("/orders/date")
        with pytest.raises(InvalidEventError, match="cannot be serialised to JSON"):
            client.post("/orders/object")  # raised by the emit call in the endpoint
    assert received == ["2025-06-01T12:00:00Z"]  # JSON data
    received.clear()
    with TestClient(peer) as client:
        client.post("/orders/date")
        client.post("/orders/object")
    assert received[0] == at  # the datetime object itself
    assert type(received[1]) is object  # anything goes
