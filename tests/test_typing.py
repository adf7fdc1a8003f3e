"""Static typing as a user sees it, checked by ``mypy --strict`` (and run by pytest).

The ``type: ignore`` comments are assertions: mypy runs with ``warn_unused_ignores``,
so if ``@bus.on`` lost the handler's signature, or ``emit`` stopped rejecting a model
with a payload, the ignore would become unused and mypy would fail. ``assert_type``
fails mypy as soon as a type is not exactly the one written.
"""

import subprocess
import sys
import textwrap
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, assert_type

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from fastapi_eventbus import (
    ConfigurationError,
    Event,
    EventBus,
    InvalidEventError,
    get_bus,
)
from fastapi_eventbus.forwarders import Delivery, Forwarder
from fastapi_eventbus.testing import Capture, HandledEvent, capture

Bus = Annotated[EventBus, Depends(get_bus)]


class CatCreated(BaseModel):
    __event_name__: ClassVar[str] = "cat.created"
    id: int


def nine() -> int:
    return 9


def test_on_preserves_the_handler_signature() -> None:
    bus = EventBus()

    def retries() -> int:
        return 3

    @bus.on("cat.*")
    def handler(event: Event, retries: Annotated[int, Depends(retries)]) -> None: ...

    @bus.on(CatCreated)
    def typed(cat: CatCreated) -> str:
        return str(cat.id)

    assert_type(typed(CatCreated(id=1)), str)
    with pytest.raises(TypeError):
        handler(event=Event(name="x"), unknown=1)  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        typed("not a cat")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_on_returns_sync_and_async_handlers_unchanged() -> None:
    bus = EventBus()

    @bus.on("cat.*")
    async def on_cat(event: Event, lives: Annotated[int, Depends(nine)]) -> None: ...

    @bus.on("cat.*")
    def on_cat_sync(event: Event, lives: Annotated[int, Depends(nine)]) -> str:
        return event.name

    # mypy gives a def with named parameters a type of its own ("def on_cat(event: Event,
    # lives: int) -> ..."), which assert_type never finds equal to a Callable[...], and
    # handlers cannot be positional-only. So: assignable to the right Callable, not to a
    # wrong one (the ignores would go unused if `on` returned Callable[..., Any]), and the
    # calls keep their keyword names and exact return types.
    _right_async: Callable[[Event, int], Coroutine[Any, Any, None]] = on_cat
    _right_sync: Callable[[Event, int], str] = on_cat_sync
    _wrong_async: Callable[[Event, int], str] = on_cat  # type: ignore[assignment]
    _wrong_sync: Callable[[Event], str] = on_cat_sync  # type: ignore[assignment]

    await assert_type(on_cat(event=Event(name="cat.created"), lives=9), Coroutine[Any, Any, None])
    assert_type(on_cat_sync(Event(name="cat.created"), lives=9), str)
    with pytest.raises(TypeError):
        await on_cat(Event(name="cat.created"), 9, 10)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        on_cat_sync(Event(name="cat.created"), lifes=9)  # type: ignore[call-arg]


@pytest.mark.anyio
async def test_a_model_pattern_and_its_handler() -> None:
    bus = EventBus()
    seen: list[int] = []

    @bus.on(CatCreated)
    async def welcome(cat: CatCreated) -> None:
        seen.append(cat.id)

    _right: Callable[[CatCreated], Coroutine[Any, Any, None]] = welcome
    _wrong: Callable[[Event], Coroutine[Any, Any, None]] = welcome  # type: ignore[assignment]
    assert_type(welcome(CatCreated(id=0)), Coroutine[Any, Any, None]).close()
    welcome(Event(name="cat.created")).close()  # type: ignore[arg-type]
    await bus.publish(CatCreated(id=1))
    assert seen == [1]


def test_on_takes_patterns_and_models_only() -> None:
    bus = EventBus()
    with pytest.raises(ConfigurationError):
        bus.on(123)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        bus.on(b"cat.*")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        bus.on(dict)  # type: ignore[arg-type]


def test_emit_overloads() -> None:
    bus = EventBus()
    app = FastAPI()
    bus.install(app)

    @app.post("/")
    def endpoint(bus: Bus) -> list[str]:
        by_name = assert_type(bus.emit("cat.created", {"id": 1}), Event)
        no_payload = assert_type(bus.emit("cat.seen"), Event)
        by_model = assert_type(bus.emit(CatCreated(id=2)), Event)
        with pytest.raises(InvalidEventError, match="model and a payload"):
            bus.emit(CatCreated(id=3), {"id": 3})  # type: ignore[call-overload]
        with pytest.raises(InvalidEventError, match="must be a str"):
            bus.emit(123, {"id": 4})  # type: ignore[call-overload]
        with pytest.raises(InvalidEventError, match="must be a str"):
            bus.emit(b"cat.created")  # type: ignore[call-overload]
        return [by_name.name, no_payload.name, by_model.name]

    with capture(bus) as captured:
        response = TestClient(app).post("/")
    assert response.json() == ["cat.created", "cat.seen", "cat.created"]
    assert captured.names == response.json()


@pytest.mark.anyio
async def test_emit_and_publish_overloads() -> None:
    bus = EventBus()
    assert_type(await bus.publish("cat.created", {"id": 1}), Event)
    assert_type(await bus.publish("cat.seen"), Event)
    assert_type(await bus.publish(CatCreated(id=1)), Event)
    with pytest.raises(ValueError, match="model and a payload"):
        await bus.publish(CatCreated(id=1), {"id": 2})  # type: ignore[call-overload]
    with pytest.raises(InvalidEventError, match="must be a str"):
        await bus.publish(123)  # type: ignore[call-overload]
    with pytest.raises(InvalidEventError, match="must be a str"):
        await bus.publish(None, {"id": 1})  # type: ignore[call-overload]
    assert_type(await bus.publish("cat.seen", extensions={"subject": "cats/1"}), Event)
    assert_type(await bus.publish(CatCreated(id=1), extensions={"n": 1, "ok": True}), Event)
    with pytest.raises(InvalidEventError, match="a 32-bit int"):
        await bus.publish("cat.seen", extensions={"ratio": 0.5})  # type: ignore[dict-item]


def test_annotated_alias_for_the_bus() -> None:
    bus = EventBus()
    app = FastAPI()
    bus.install(app)

    @app.post("/")
    def endpoint(bus: Bus) -> str:
        return assert_type(bus.emit("cat.created", {"id": 1}), Event).name

    assert TestClient(app).post("/").json() == "cat.created"


def test_both_ways_to_ask_for_the_bus_in_endpoints_and_handlers() -> None:
    bus = EventBus()
    app = FastAPI()
    bus.install(app)

    @bus.on("cat.created")
    async def welcome(event: Event, bus: Bus) -> None:
        assert_type(bus, EventBus)
        assert_type(bus.emit("cat.welcomed", event.payload), Event)

    @bus.on("cat.welcomed")
    def feed(event: Event, bus: EventBus = Depends(get_bus)) -> None:
        assert_type(bus, EventBus)
        assert_type(bus.emit("cat.fed"), Event)

    @app.post("/alias")
    async def with_alias(bus: Bus) -> None:
        assert_type(bus, EventBus)
        bus.emit("cat.created", {"id": 1})

    @app.post("/default")
    def with_default(bus: EventBus = Depends(get_bus)) -> None:
        assert_type(bus, EventBus)
        bus.emit("cat.created", {"id": 2})

    with TestClient(app) as client, capture(bus) as captured:
        client.post("/alias")
        client.post("/default")
    assert captured.names == ["cat.created", "cat.welcomed", "cat.fed"] * 2
    assert captured.failures == []


def test_capture_is_typed() -> None:
    bus = EventBus()
    with capture(bus, handle=False) as captured:
        assert_type(captured, Capture)
    assert_type(captured.emitted, list[Event])
    assert_type(captured.names, list[str])
    assert_type(captured.handled, list[HandledEvent])
    assert_type(captured.failures, list[HandledEvent])
    assert_type(captured.handlers_for("cat.created"), list[str])
    capture("not a bus")  # type: ignore[arg-type]  # never entered: nothing runs
    with pytest.raises(TypeError):
        capture(bus, False)  # type: ignore[call-arg]


class Recorder(Forwarder):
    """A forwarder subclass as a user writes one: mypy checks the overrides."""

    def __init__(self) -> None:
        super().__init__(name="recorder")
        self.sent: list[str] = []

    async def send(self, events: Sequence[Event]) -> Delivery | None:
        self.sent.extend(event.name for event in events)
        return None

    async def start(self) -> None:
        self.sent.clear()


class NarrowForwarder(Forwarder):
    async def send(self, events: list[Event]) -> None:  # type: ignore[override]
        raise NotImplementedError


@pytest.mark.anyio
async def test_forwarder_subclasses_are_checked() -> None:
    bus = EventBus()
    recorder = Recorder()
    assert_type(bus.forward("cat.*", recorder), Recorder)  # returns what it was given
    with pytest.raises(TypeError):
        Forwarder(max_message_bytes="1 MB")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        bus.forward("cat.*", object())  # type: ignore[type-var]
    async with recorder:
        await bus.publish("cat.created", {"id": 1})
    assert recorder.sent == ["cat.created"]
    assert NarrowForwarder().name == "NarrowForwarder"


def test_mypy_sees_the_installed_package_types(tmp_path: Path) -> None:
    # Run from an empty directory, mypy finds fastapi_eventbus where pip put it, and reads
    # its types only because the package ships py.typed (else: "missing library stubs or
    # py.typed marker", and no error inside the call).
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        textwrap.dedent(
            """\
            from fastapi_eventbus import Event, EventBus

            bus = EventBus()


            @bus.on("cat.*")
            async def handler(event: Event) -> None: ...


            async def main() -> None:
                await bus.publish("cat.created", {"id": 1})
                await bus.publish(42)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", snippet.name],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=180,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(errors) == 1, result.stdout
    assert errors[0].startswith("snippet.py:12: error: No overload variant of ")
    assert errors[0].endswith("[call-overload]")
