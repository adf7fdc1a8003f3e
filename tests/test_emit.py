"""emit/publish: what is accepted, and every bad input rejected at the call site."""

from __future__ import annotations

import enum
import math
import re
from datetime import UTC, date, datetime
from typing import Any, ClassVar

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field, SecretStr, computed_field, model_serializer

from fastapi_eventbus import (
    BusNotInstalledError,
    ConfigurationError,
    DiscardedEvents,
    Event,
    EventBus,
    EventChainError,
    HandlerFailure,
    InvalidEventError,
    OutsideRequestError,
    get_bus,
)
from fastapi_eventbus.starlette import request_bus
from fastapi_eventbus.testing import capture
from tests.conftest import Hooks


class CatCreated(BaseModel):
    __event_name__: ClassVar[str] = "cat.created"
    id: int
    name: str = "Tom"


class NoName(BaseModel):
    id: int


def emit_endpoint(app: FastAPI, *args: Any) -> None:
    """Add ``POST /emit`` that emits *args* and reports the error, if any, as JSON."""

    @app.post("/emit")
    def endpoint(bus: EventBus = Depends(get_bus)) -> dict[str, str]:
        try:
            event = bus.emit(*args)
        except Exception as exc:
            return {"error": type(exc).__name__, "message": str(exc)}
        return {"id": event.id}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("",), "non-empty"),
        ((" cat",), "whitespace"),
        ((42,), "must be a str, got int"),
        ((None,), "must be a str, got NoneType"),
        (("cat.created", {"when": object()}), "cannot be serialised to JSON"),
        (("cat.created", {"nan": math.nan}), "nan"),
        (("cat.created", [math.inf]), "inf"),
        ((NoName(id=1),), "NoName has no __event_name__"),
        ((CatCreated(id=1), {"id": 2}), "model and a payload"),
        ((CatCreated,), "the class CatCreated, not an instance"),
        (("x" * 257,), "is 257 characters long; the longest allowed is 256"),
        (("order.placed\nfake.row",), "control character '\\n' at position 12"),
        (("order.\x1b[31mplaced",), "control character '\\x1b' at position 6"),
        (("order.\x9bplaced",), "control character '\\x9b'"),
        (("order\u2028placed",), "'\\u2028'"),
        (("cat.created", {1: "a", "1": "b"}), "the keys 1 and '1', which are both '1' in JSON"),
    ],
)
def test_bad_emit_raises_in_the_endpoint(
    app: FastAPI, client: TestClient, args: tuple[Any, ...], message: str
) -> None:
    emit_endpoint(app, *args)
    body = client.post("/emit").json()
    assert body["error"] == "InvalidEventError"
    assert message in body["message"]


def test_payload_failing_its_registered_schema(app: FastAPI, bus: EventBus) -> None:
    bus.register(CatCreated)
    emit_endpoint(app, "cat.created", {"id": "not a number"})
    body = TestClient(app).post("/emit").json()
    assert body["error"] == "InvalidEventError"
    assert "does not match its schema CatCreated" in body["message"]
    assert "id" in body["message"]


@pytest.mark.anyio
async def test_schema_normalises_the_payload(bus: EventBus) -> None:
    bus.register("cat.created", CatCreated)
    event = await bus.publish("cat.created", {"id": "7"})
    assert event.payload == {"id": 7, "name": "Tom"}


class CatBorn(BaseModel):
    """Aliased, as a camelCase API's models are."""

    __event_name__: ClassVar[str] = "cat.born"
    born_on: date = Field(alias="bornOn")


class CatVaccinated(BaseModel):
    __event_name__: ClassVar[str] = "cat.vaccinated"
    model_config = ConfigDict(strict=True)
    on: date


class CatWeighed(BaseModel):
    __event_name__: ClassVar[str] = "cat.weighed"
    model_config = ConfigDict(extra="forbid")
    grams: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def kilograms(self) -> float:
        return self.grams / 1000


class CatChipped(BaseModel):
    __event_name__: ClassVar[str] = "cat.chipped"
    chip: SecretStr


@pytest.mark.anyio
async def test_typed_events_with_aliases_or_strict_types_reach_their_handlers(
    bus: EventBus,
) -> None:
    """Found: accepted at emit, then every handler failed: the payload was written with
    field names (the handler read aliases), and a strict model's date came back as text."""
    got: list[BaseModel] = []

    async def born(event: CatBorn) -> None:
        got.append(event)

    async def vaccinated(event: CatVaccinated) -> None:
        got.append(event)

    bus.on()(born)
    bus.on()(vaccinated)
    with capture(bus):
        await bus.publish(CatBorn(bornOn=date(2020, 5, 1)))
        await bus.publish("cat.born", {"bornOn": "2020-05-02"})
        await bus.publish(CatVaccinated(on=date(2021, 1, 1)))
    assert got == [
        CatBorn(bornOn=date(2020, 5, 1)),
        CatBorn(bornOn=date(2020, 5, 2)),
        CatVaccinated(on=date(2021, 1, 1)),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "payload",
    [{"pin": SecretStr("4242")}, [SecretStr("4242")], {"card": {"pin": SecretStr("4242")}}],
    ids=["flat-dict", "list", "nested"],
)
async def test_a_secret_in_a_payload_is_refused_not_masked(bus: EventBus, payload: Any) -> None:
    """Found: accepted, and the handler got ``'**********'``, with no word anywhere."""
    with pytest.raises(InvalidEventError, match="masked"):
        await bus.publish("card.issued", payload)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (CatWeighed(grams=4200), "would not validate"),
        (CatChipped(chip=SecretStr("250269604123456")), "masked"),
    ],
    ids=["computed-field-extra-forbid", "secret"],
)
async def test_a_typed_event_its_handlers_could_not_read_is_refused_at_emit(
    bus: EventBus, payload: BaseModel, error: str
) -> None:
    """Found: accepted; then every handler failed (a computed field written into a model that
    forbids extras), or got a secret as ``'**********'``, with no error anywhere."""
    got: list[BaseModel] = []

    async def handler(event: BaseModel) -> None:
        got.append(event)

    handler.__annotations__["event"] = type(payload)
    bus.on()(handler)
    with pytest.raises(InvalidEventError, match=error):
        await bus.publish(payload)
    assert got == []
    web = EventBus()  # no handler: it forwards to a worker, whose handlers would fail
    with pytest.raises(InvalidEventError, match=error):
        await web.publish(payload)


class UserRenamed(BaseModel):
    __event_name__: ClassVar[str] = "user.renamed"
    id: int
    nickname: str | None  # required, may be null

    @model_serializer(mode="wrap")  # a common "drop the nulls" serializer
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class CatOwned(BaseModel):
    __event_name__: ClassVar[str] = "cat.owned"
    id: int
    owner: str | None = Field(default=None, serialization_alias="ownerName")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("readable", "unreadable", "error"),
    [
        (UserRenamed(id=1, nickname="bob"), UserRenamed(id=2, nickname=None), "not validate"),
        (CatOwned(id=1), CatOwned(id=2, owner="ann"), "owner"),
    ],
    ids=["serializer-drops-a-required-field", "alias-the-model-does-not-read"],
)
async def test_each_typed_event_is_read_back_as_its_handlers_read_it(
    bus: EventBus, readable: BaseModel, unreadable: BaseModel, error: str
) -> None:
    """Found: the read-back check ran for a model's first event only. A later one whose
    values its model would not read back (a serializer dropping a null required field)
    was accepted and then failed every handler; one whose value its model reads back as
    another (written under a serialization alias the model does not read) reached the
    handler changed, a success. Each is refused at emit now."""
    got: list[BaseModel] = []

    async def handler(event: BaseModel) -> None:
        got.append(event)

    handler.__annotations__["event"] = type(readable)
    bus.on()(handler)
    await bus.publish(readable)
    with pytest.raises(InvalidEventError, match=error):
        await bus.publish(unreadable)
    assert got == [readable]


@pytest.mark.parametrize(
    "fields",
    [
        {"name": ""},
        {"name": "order.placed\nERROR forged log line"},
        {"name": "x" * 300},
        {"name": "order.placed", "id": ""},
        {"name": "order.placed", "id": "1\nERROR forged log line"},
        {"name": "order.placed", "source": "//shop\x1b[2J"},
    ],
    ids=["empty-name", "name-line-break", "long-name", "empty-id", "id-line-break", "source"],
)
def test_an_event_built_by_hand_is_held_to_what_emit_accepts(fields: dict[str, Any]) -> None:
    """Found: `Event(...)` took a name, an id or a source that `emit` refuses, and
    `bus.handle` ran the handlers with it (an id with a line break forged the log line
    that reports the event)."""
    with pytest.raises(ValueError, match=r"event|name|id|source"):
        Event(**fields)


def test_payload_is_converted_to_json_data(app: FastAPI, bus: EventBus) -> None:
    received: list[Any] = []
    bus.on("x")(lambda event: received.append(event.payload))
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    emit_endpoint(app, "x", {"when": when, "tags": ("a", "b"), "model": CatCreated(id=1)})
    assert "id" in TestClient(app).post("/emit").json()
    assert received == [
        {"when": "2026-01-02T03:04:05Z", "tags": ["a", "b"], "model": {"id": 1, "name": "Tom"}}
    ]


def test_emit_on_the_application_bus_points_to_publish(bus: EventBus) -> None:
    with pytest.raises(OutsideRequestError, match=r"await bus.publish"):
        bus.emit("cat.created")


def test_get_bus_without_an_installed_bus() -> None:
    app = FastAPI()

    @app.get("/")
    def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        raise AssertionError("not reached")

    with pytest.raises(BusNotInstalledError, match=r"bus.install\(app\)"):
        TestClient(app).get("/")


def test_install_twice(app: FastAPI, bus: EventBus) -> None:
    with pytest.raises(ConfigurationError, match="already installed on this app"):
        bus.install(app)
    with pytest.raises(ConfigurationError, match="already installed on this app"):
        EventBus().install(app)
    other = FastAPI()
    bus.install(other)  # one bus, several apps (app factories): tests/test_handler_edges.py
    assert EventBus.of(other) is bus


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_chain_depth": 0}, "max_chain_depth"),
        ({"max_chain_depth": True}, "max_chain_depth"),
        ({"shutdown_timeout": -1}, "shutdown_timeout"),
        ({"shutdown_timeout": "10"}, "shutdown_timeout"),
        ({"on_error": "log"}, "on_error must be callable"),
        ({"on_discard": 3}, "on_discard must be callable"),
        ({"source": ""}, "source"),
    ],
)
def test_bad_settings_fail_in_the_constructor(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        EventBus(**kwargs)


@pytest.mark.parametrize(
    "source",
    [
        "/orders",
        "urn:shop:orders",
        "https://shop.example/orders?region=eu#v2",
        "my-shop",  # a relative-path reference
        "//fastapi-eventbus/host-1",
        "//[2001:db8::1]:8080/shop",
        "mailto:orders@shop.example",
        "/caf%C3%A9",
        "./a/b;c=d/~e!$&'()*+,=@",
    ],
)
@pytest.mark.anyio
async def test_source_may_be_any_uri_reference(source: str) -> None:
    assert (await EventBus(source=source).publish("order.placed")).source == source


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("my shop", "' ' at position 2"),
        ("/café", "'é' at position 4"),
        ("/orders\n", "'\\n' at position 7"),
        ("/100%", "a '%' not followed by two hex digits at position 4"),
        ("/a%4", "a '%' not followed by two hex digits at position 2"),
        ("/a%zz", "a '%' not followed by two hex digits at position 2"),
        ("/a#b#c", "'#' at position 4"),
        ("/a<b>", "'<' at position 2"),
        ("1shop:orders", "the scheme '1shop', which is not one"),
        ("/a[1]", "'[' at position 2, where a URI cannot"),
        ("//[::1/", "the host '[::1', which is not an IP literal"),
        ("//sh{op/", "'{' at position 4, which a URI cannot hold"),
        ("https://shop example/", "' ' at position 12"),
        ("//shop:port/", "the port 'port', which is not a number"),
        ("//shop:80:80/", "the port '80:80', which is not a number"),
        ("//a b@shop/", "' ' at position 3"),
    ],
)
def test_source_must_be_a_uri_reference(source: str, why: str) -> None:
    """CloudEvents' ``source`` is a URI-reference (RFC 3986): caught in the constructor."""
    with pytest.raises(ConfigurationError, match="source must be a URI-reference") as caught:
        EventBus(source=source)
    assert why in str(caught.value)


def test_register_rejects_bad_schemas(bus: EventBus) -> None:
    with pytest.raises(ConfigurationError, match="needs a schema"):
        bus.register("cat.created")
    with pytest.raises(ConfigurationError, match="__event_name__"):
        bus.register(NoName)
    with pytest.raises(ConfigurationError, match="pydantic model class"):
        bus.register("cat.created", dict)  # type: ignore[arg-type]
    bus.register(CatCreated)
    with pytest.raises(ConfigurationError, match="already has the schema CatCreated"):
        bus.register("cat.created", NoName)


def test_emit_returns_the_event(app: FastAPI, bus: EventBus) -> None:
    ids: list[str] = []

    @app.post("/")
    def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        event = bus.emit("cat.created", {"id": 1})
        assert isinstance(event, Event)
        assert event.name == "cat.created"
        assert event.time.tzinfo is not None
        ids.append(event.id)

    client = TestClient(app)
    with capture(bus) as seen:
        client.post("/")
        client.post("/")
    assert [event.id for event in seen.emitted] == ids
    assert len(set(ids)) == 2


def test_event_is_immutable() -> None:
    event = Event(name="x", payload={"a": 1})
    with pytest.raises(ValueError, match="frozen"):
        setattr(event, "name", "y")  # noqa: B010 - the assignment mypy would refuse


@pytest.mark.anyio
async def test_publish_validates_like_emit(bus: EventBus) -> None:
    bus.register(CatCreated)
    with pytest.raises(InvalidEventError):
        await bus.publish("cat.created", {"id": "x"})
    with pytest.raises(InvalidEventError):
        await bus.publish("")


@pytest.mark.anyio
async def test_disabled_bus_validates_but_delivers_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTAPI_EVENTBUS_DISABLED", "1")
    bus = EventBus()
    assert bus.disabled
    calls: list[Event] = []
    bus.on("*")(lambda event: calls.append(event))
    with capture(bus) as seen:
        await bus.publish("cat.created", {"id": 1})
    assert seen.names == ["cat.created"]
    assert calls == []
    with pytest.raises(InvalidEventError):
        await bus.publish("cat.created", {"bad": object()})
    monkeypatch.setenv("FASTAPI_EVENTBUS_DISABLED", "0")
    assert not EventBus().disabled
    assert EventBus(disabled=True).disabled


def test_disabled_bus_in_an_app() -> None:
    bus = EventBus(disabled=True)
    app = FastAPI()
    bus.install(app)
    calls: list[Event] = []
    bus.on("*")(lambda event: calls.append(event))

    @app.post("/")
    def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("cat.created", {"id": 1})

    assert TestClient(app).post("/").status_code == 200
    assert calls == []


@pytest.mark.anyio
async def test_emitted_events_are_complete_envelopes(bus: EventBus) -> None:
    import uuid

    events = [await bus.publish("x", {"n": i}) for i in range(600)]  # ids come 256 at a time
    assert len({event.id for event in events}) == 600
    for event in events:
        assert str(uuid.UUID(event.id)) == event.id
        assert uuid.UUID(event.id).version == 4
        assert uuid.UUID(event.id).variant == uuid.RFC_4122
        assert Event.model_validate_json(event.model_dump_json()) == event
        assert event.model_fields_set == set(Event.model_fields)


class UserEvents(enum.StrEnum):
    SIGNED_UP = "user.signed_up"


@pytest.mark.anyio
async def test_a_str_enum_name_becomes_its_plain_value(bus: EventBus) -> None:
    # Log lines, spans and messages carry "user.signed_up", not <UserEvents.SIGNED_UP: ...>.
    handled: list[Event] = []

    @bus.on(UserEvents.SIGNED_UP)
    def record(event: Event) -> None:
        handled.append(event)

    bus.register(UserEvents.SIGNED_UP, Signup)
    event = await bus.publish(UserEvents.SIGNED_UP, {"email": "ada@example.com"})
    assert type(event.name) is str
    assert event.name == "user.signed_up"
    assert [type(e.name) for e in handled] == [str]
    with pytest.raises(InvalidEventError, match="does not match its schema"):
        await bus.publish(UserEvents.SIGNED_UP, {"email": 1})


class Signup(BaseModel):
    email: str


# -- limits: names, and keys that JSON would merge ------------------------------------------


@pytest.mark.anyio
async def test_names_up_to_the_documented_length_and_printable_text_are_accepted(
    bus: EventBus,
) -> None:
    for name in ("x" * 256, "é" * 256, "order placed", "caf\u00e9.créé", "emoji.\U0001f408\u200d"):
        assert (await bus.publish(name)).name == name


@pytest.mark.anyio
async def test_a_megabyte_name_is_refused_without_being_echoed(bus: EventBus) -> None:
    with pytest.raises(InvalidEventError) as caught:
        await bus.publish("x" * 1_000_000)
    assert "1,000,000 characters long" in str(caught.value)
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize("pattern", ["order.\n*", "*\x1b*", "x" * 257])
def test_a_pattern_no_name_could_match_is_refused(bus: EventBus, pattern: str) -> None:
    with pytest.raises(ConfigurationError, match="can never match"):
        bus.on(pattern)


def test_a_long_pattern_that_can_match_is_accepted(bus: EventBus) -> None:
    bus.on("x" * 250 + "*" * 20)  # matches "x" * 250, within the limit
    bus.on("*" + "x" * 255)


@pytest.mark.parametrize(
    ("payload", "keys"),
    [
        ({1: "a", "1": "b"}, "1 and '1'"),
        ({"items": [{"n": 1}, {True: 1, "true": 2}]}, "True and 'true'"),
        ({"by_id": {None: 0, "None": 1}}, "None and 'None'"),
        ((({2.5: 1, "2.5": 2},),), "2.5 and '2.5'"),
        (CatCreated(id=1), None),
        ({"1": "a", 2: "b"}, None),
        ({"deep": [[{"a": {"b": {1: 1, 2: 2}}}]]}, None),
    ],
)
@pytest.mark.anyio
async def test_keys_that_json_would_merge_are_refused_at_emit(
    bus: EventBus, payload: Any, keys: str | None
) -> None:
    if keys is None:
        await bus.publish("x", payload)  # distinct keys, however deep: accepted
        return
    with pytest.raises(InvalidEventError, match=f"has the keys {re.escape(keys)}, which are"):
        await bus.publish("x", payload)


class Inventory(BaseModel):
    __event_name__: ClassVar[str] = "inventory.counted"
    counts: dict[Any, int]


@pytest.mark.anyio
async def test_keys_merged_inside_a_typed_event_are_refused_too(bus: EventBus) -> None:
    with pytest.raises(InvalidEventError, match="has the keys 7 and '7'"):
        await bus.publish(Inventory(counts={7: 1, "7": 2}))
    bus.register(Inventory)  # validated against its schema: model_dump would merge them
    with pytest.raises(InvalidEventError, match="has the keys 7 and '7'"):
        await bus.publish("inventory.counted", Inventory(counts={7: 1, "7": 2}))
    event = await bus.publish(Inventory(counts={7: 1, "8": 2}))
    assert event.payload == {"counts": {"7": 1, "8": 2}}


@pytest.mark.parametrize(
    ("extensions", "message"),
    [
        ({"Tenant": "acme"}, "attribute name 'Tenant'"),
        ({"my-ext": "x"}, "lower-case ASCII letters and digits only"),
        ({"": "x"}, "attribute name ''"),
        ({1: "x"}, "attribute name 1"),
        ({"id": "x"}, "'id' is not an extension attribute"),
        ({"traceparent": "x"}, "see Event.trace_context"),
        ({"ratio": 0.5}, "is 0.5: a value is a str, a bool or a 32-bit int"),
        ({"big": 2**31}, "a 32-bit int"),
        ({"none": None}, "is None"),
        ({"text": "\ud800"}, "UTF-8 cannot encode"),
        ([("subject", "x")], "must be a mapping"),
    ],
)
def test_bad_extensions_raise_in_the_endpoint(
    app: FastAPI, client: TestClient, extensions: Any, message: str
) -> None:
    @app.post("/emit")
    def endpoint(bus: EventBus = Depends(get_bus)) -> dict[str, str]:
        try:
            bus.emit("order.placed", {"id": 1}, extensions=extensions)
        except InvalidEventError as exc:
            return {"error": str(exc)}
        return {}

    assert message in client.post("/emit").json()["error"]


@pytest.mark.anyio
async def test_extensions_are_kept_as_given_and_read_only(bus: EventBus) -> None:
    class Tier(enum.StrEnum):
        GOLD = "gold"

    given: dict[str, Any] = {"subject": "orders/1", "tier": Tier.GOLD, "n": -(2**31), "ok": False}
    handled: list[Event] = []
    bus.on("order.*")(lambda event: handled.append(event))
    event = await bus.publish("order.placed", extensions=given)
    given["subject"] = "changed later"
    assert handled == [event]
    assert event.extensions == {"subject": "orders/1", "tier": "gold", "n": -(2**31), "ok": False}
    assert type(event.extensions["tier"]) is str
    with pytest.raises(TypeError, match="immutable"):
        event.extensions["subject"] = "x"  # type: ignore[index]
    assert (await bus.publish("order.placed")).extensions == {}
    assert Event.model_validate_json(event.model_dump_json()) == event
    with pytest.raises(ValueError, match="'type' is not an extension attribute"):
        Event(name="x", extensions={"type": "y"})


@pytest.mark.anyio
async def test_an_event_with_extensions_can_be_copied_and_pickled(bus: EventBus) -> None:
    """Its read-only extensions (and shared empty trace context) copy as themselves; they
    used to refuse the item-by-item rebuild `copy.deepcopy` and pickle do."""
    import copy
    import pickle

    event = await bus.publish("order.placed", {"id": 1}, extensions={"subject": "orders/1"})
    for copied in (copy.copy(event), copy.deepcopy(event), pickle.loads(pickle.dumps(event))):
        assert copied == event
        assert copied.extensions == {"subject": "orders/1"}
        with pytest.raises(TypeError, match="immutable"):
            copied.extensions["subject"] = "x"  # type: ignore[index]
    assert copy.deepcopy(event).payload is not event.payload


@pytest.mark.parametrize("first", ["installed", "other"])
def test_a_second_bus_in_a_request_gets_its_own_events(first: str) -> None:
    """Found: with the app's bus already in the request, ``Depends(other.dependency)`` (the
    documented way to use a bus that is not installed) returned the app bus's view: the
    other bus's handlers never ran, and nothing said so. Resolved first, the other bus's
    view was what ``get_bus`` then returned. Each bus gets its own view now, in a request
    and in a handler bridging to the other bus."""
    app_bus, audit_bus = EventBus(), EventBus()
    app = FastAPI()
    app_bus.install(app)
    seen: list[tuple[str, str]] = []

    @app_bus.on("*")
    async def everything(event: Event, audit: EventBus = Depends(audit_bus.dependency)) -> None:
        seen.append(("app", event.name))
        if event.name == "order.placed":
            audit.emit("audit.bridged")

    @audit_bus.on("audit.*")
    async def write_audit(event: Event) -> None:
        seen.append(("audit", event.name))

    async def endpoint(bus: EventBus, audit: EventBus) -> None:
        assert audit is not bus
        bus.emit("order.placed")
        audit.emit("audit.recorded")

    if first == "installed":

        @app.post("/")
        async def installed_first(
            bus: EventBus = Depends(get_bus), audit: EventBus = Depends(audit_bus.dependency)
        ) -> None:
            await endpoint(bus, audit)
    else:

        @app.post("/")
        async def other_first(
            audit: EventBus = Depends(audit_bus.dependency), bus: EventBus = Depends(get_bus)
        ) -> None:
            await endpoint(bus, audit)

    with TestClient(app) as client:
        assert client.post("/").status_code == 200
    assert sorted(seen) == [
        ("app", "order.placed"),
        ("audit", "audit.bridged"),
        ("audit", "audit.recorded"),
    ]


@pytest.mark.parametrize("swallowed", [False, True], ids=["raises", "a yield dep swallows it"])
def test_what_a_failed_handler_emitted_on_another_bus_is_discarded(
    hooks: Hooks, swallowed: bool
) -> None:
    """Found: a handler emitting on another bus (``Depends(other.dependency)``) and then
    failing had those events handled, with a WARNING that "a dependency's exit code failed";
    what it emitted on its own bus was discarded, as documented for a failed handler."""
    app_bus = EventBus(on_discard=hooks.discards.append)
    audit_bus = EventBus(on_discard=hooks.discards.append)
    app = FastAPI()
    app_bus.install(app)
    seen: list[str] = []

    async def rolling_back() -> Any:
        try:
            yield
        except ValueError:
            if not swallowed:
                raise

    @app_bus.on("order.placed")
    async def bridge(
        event: Event,
        audit: EventBus = Depends(audit_bus.dependency),
        session: None = Depends(rolling_back),
    ) -> None:
        audit.emit("audit.recorded")
        raise ValueError("the order could not be placed")

    @audit_bus.on("audit.*")
    async def write_audit(event: Event) -> None:
        seen.append(event.name)

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("order.placed")

    with TestClient(app) as client:
        assert client.post("/").status_code == 200
    assert seen == []
    assert [d.events[0].name for d in hooks.discards] == ["audit.recorded"]


@pytest.mark.parametrize("scope", ["request", "function"])
def test_a_handler_s_commit_that_fails_in_its_exit_code(hooks: Hooks, scope: str) -> None:
    """The handler returns, then its session dependency fails to commit in its exit code, so
    the call failed (``on_error``) and its own bus's follow-up is discarded. What it emitted
    on another bus (``Depends(other.dependency)``) is that bus's background task, which runs
    before a request-scoped dependency exits, as in an endpoint: handled before the commit
    (documented in docs/handlers.md). With ``scope="function"``, the commit comes first and
    its failure discards those events too."""
    failures: list[HandlerFailure] = []
    app_bus = EventBus(on_discard=hooks.discards.append, on_error=failures.append)
    audit_bus = EventBus(on_discard=hooks.discards.append)
    app = FastAPI()
    app_bus.install(app)
    seen: list[str] = []

    async def committing() -> Any:
        yield
        seen.append("commit")
        raise ConnectionError("the commit failed")

    @app_bus.on("order.placed")
    async def place(
        event: Event,
        bus: EventBus = Depends(get_bus),
        session: None = Depends(committing, scope=scope),  # type: ignore[arg-type]
        audit: EventBus = Depends(audit_bus.dependency),
    ) -> None:
        audit.emit("audit.recorded")
        bus.emit("order.confirmed")

    @app_bus.on("order.confirmed")
    @audit_bus.on("audit.*")
    async def record(event: Event) -> None:
        seen.append(event.name)

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("order.placed")

    with TestClient(app) as client:
        assert client.post("/").status_code == 200
    assert [type(f.exception).__name__ for f in failures] == ["ConnectionError"]
    discarded = sorted(e.name for d in hooks.discards for e in d.events)
    if scope == "request":
        assert seen == ["audit.recorded", "commit"]
        assert discarded == ["order.confirmed"]
    else:
        assert seen == ["commit"]
        assert discarded == ["audit.recorded", "order.confirmed"]


@pytest.mark.parametrize("failing", ["an endpoint", "a handler"])
def test_a_call_that_succeeds_in_a_failed_call_s_exit_code_keeps_its_events(failing: str) -> None:
    """A yield dependency reports a failure with ``publish`` in its exit code; the handler it
    runs succeeds, and emits on another bus. Those events are handled: the failure being
    handled meanwhile is the outer call's (found: they were discarded, with the reason that
    a yield dependency had caught an exception)."""
    discards: list[DiscardedEvents] = []
    app_bus, audit_bus = EventBus(on_discard=discards.append), EventBus()
    app = FastAPI()
    app_bus.install(app)
    seen: list[str] = []

    async def session() -> Any:
        try:
            yield
        finally:
            await app_bus.publish("order.failed")

    async def audit_trail(audit: EventBus = Depends(audit_bus.dependency)) -> Any:
        yield
        audit.emit("audit.recorded")

    @app_bus.on("order.placed")
    async def place(event: Event, s: None = Depends(session)) -> None:
        raise ValueError("the order could not be placed")

    @app_bus.on("order.failed")
    async def report(event: Event, trail: None = Depends(audit_trail)) -> None:
        seen.append(event.name)

    @audit_bus.on("audit.*")
    async def write_audit(event: Event) -> None:
        seen.append(event.name)

    @app.post("/")
    async def endpoint(
        bus: EventBus = Depends(get_bus),
        s: None = Depends(session if failing == "an endpoint" else report_nothing),
    ) -> None:
        if failing == "an endpoint":
            raise ValueError("the order could not be placed")
        bus.emit("order.placed")

    with TestClient(app, raise_server_exceptions=False) as client:
        client.post("/")
    assert seen == ["order.failed", "audit.recorded"]
    assert [e.name for d in discards for e in d.events] == []


async def report_nothing() -> None:
    """A dependency that does nothing (the endpoint's, when a handler fails)."""


class UserTagged(BaseModel):
    __event_name__: ClassVar[str] = "user.tagged"
    id: int
    tags: set[str]
    codes: frozenset[int]


@pytest.mark.anyio
async def test_a_typed_event_with_sets_is_read_back_in_any_order(bus: EventBus) -> None:
    """A set comes back from JSON in another order: the same set, not another value."""
    got: list[UserTagged] = []

    @bus.on(UserTagged)
    async def tagged(event: UserTagged) -> None:
        got.append(event)

    sent = [
        UserTagged(
            id=n,
            tags={f"role-{(n * 7 + j) % 40}" for j in range(8)},
            codes=frozenset(range(n, n + 20, 3)),
        )
        for n in range(60)
    ]
    for event in sent:
        await bus.publish(event)
    assert got == sent


def test_a_bus_standing_in_for_get_bus_is_the_request_s_bus() -> None:
    """``app.dependency_overrides[get_bus] = other.dependency`` (the documented test override)
    makes *other*'s view the request's: `request_bus` finds it, and every ``get_bus`` of the
    request (cached by FastAPI or not) is that one view."""
    app_bus, test_bus = EventBus(), EventBus()
    app = FastAPI()
    app_bus.install(app)
    seen: list[str] = []
    test_bus.on("*")(lambda event: seen.append(event.name))

    @app.post("/")
    async def endpoint(
        request: Request,
        bus: EventBus = Depends(get_bus),
        again: EventBus = Depends(get_bus, use_cache=False),
    ) -> None:
        assert request_bus(request) is bus
        assert again is bus
        bus.emit("order.placed")

    app.dependency_overrides[get_bus] = test_bus.dependency
    with TestClient(app) as client:
        assert client.post("/").status_code == 200
    assert seen == ["order.placed"]


@pytest.mark.anyio
async def test_handlers_bridging_two_buses_stop_at_the_depth_limit(hooks: Hooks) -> None:
    """Events going back and forth between two buses (each handler emitting on the other
    through ``Depends(other.dependency)``) are one chain: it stops at ``max_chain_depth``."""
    ping_bus = EventBus(max_chain_depth=4, on_error=hooks.failures.append)
    pong_bus = EventBus(max_chain_depth=4, on_error=hooks.failures.append)
    app = FastAPI()
    ping_bus.install(app)
    hops: list[str] = []

    @ping_bus.on("ping")
    async def ping(event: Event, other: EventBus = Depends(pong_bus.dependency)) -> None:
        hops.append("ping")
        other.emit("pong")

    @pong_bus.on("pong")
    async def pong(event: Event, other: EventBus = Depends(ping_bus.dependency)) -> None:
        hops.append("pong")
        other.emit("ping")

    await ping_bus.publish("ping")
    await ping_bus.close()
    await pong_bus.close()
    assert hops == ["ping", "pong"] * 2 + ["ping"]
    assert [type(failure.exception) for failure in hooks.failures] == [EventChainError]
