"""Bad input is refused where it is given, with the reason: each of these was accepted, and
then failed later (at the first failure to report, the first nack, each invocation) or did
nothing at all."""

import base64
import math
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ClassVar

import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from fastapi_eventbus import ConfigurationError, Event, EventBus, Retry, wire
from fastapi_eventbus.spool import Spool
from fastapi_eventbus.testing import MemorySource, RecordingForwarder
from fastapi_eventbus.worker import Backoff, Worker


def no_argument() -> None:
    """A hook that cannot take the report it is given."""


@pytest.mark.parametrize(
    ("make", "error"),
    [
        # A truthy string turned the bus into a no-op, or kept what should be discarded.
        (lambda: EventBus(disabled="false"), "disabled must be a bool"),  # type: ignore[arg-type]
        (lambda: EventBus(keep_events_on_error="no"), "keep_events_on_error must be a bool"),  # type: ignore[arg-type]
        # Hooks were checked for being callable only: a wrong one failed at the first report.
        (lambda: EventBus(on_error=no_argument), "on_error is called with one argument"),  # type: ignore[arg-type]
        (lambda: EventBus(on_discard=no_argument), "on_discard is called with one argument"),  # type: ignore[arg-type]
        # SQLite counts it in milliseconds in an int: past that, it did not wait at all.
        (lambda: Spool("x.sqlite3", busy_timeout=math.inf), "busy_timeout must be"),
        (lambda: Spool("x.sqlite3", busy_timeout=3_000_000), "busy_timeout must be"),
        # NaN slipped through `min(...) < 0`; every nack then raised.
        (lambda: Backoff(maximum=math.nan), "Backoff needs"),
        # Accepted: every wait was the maximum (`--retry-delay 60 --max-retry-delay 30`).
        (lambda: Backoff(initial=60, maximum=30), "Backoff.initial"),
        (lambda: Retry(initial_delay=10, max_delay=5), "initial_delay"),
        # Every nack raised: the backoff never applied.
        (lambda: MemorySource(extend_interval=0), "extend_interval must be"),
        (lambda: MemorySource(extend_interval=-1), "extend_interval must be"),
    ],
    ids=[
        "disabled-str",
        "keep-str",
        "on_error-arity",
        "on_discard-arity",
        "busy-inf",
        "busy-huge",
        "backoff-nan",
        "backoff-initial-over-maximum",
        "retry-initial-over-maximum",
        "extend-0",
        "extend-negative",
    ],
)
def test_a_bad_argument_is_refused_where_it_is_given(make: Callable[[], Any], error: str) -> None:
    with pytest.raises(ConfigurationError, match=error):
        make()


@pytest.mark.parametrize("backoff", [30, Backoff], ids=["a number", "the class"])
def test_a_source_s_backoff_must_be_a_backoff(backoff: Any) -> None:
    from fastapi_eventbus.worker import PubSubSource, SQSSource

    with pytest.raises(ConfigurationError, match="visibility_backoff must be a Backoff"):
        SQSSource("https://sqs.eu-west-1.amazonaws.com/1/q", visibility_backoff=backoff)
    with pytest.raises(ConfigurationError, match="nack_backoff must be a Backoff"):
        PubSubSource("projects/my-shop/subscriptions/orders", nack_backoff=backoff)


def test_a_forwarder_s_dead_letter_must_take_the_letter() -> None:
    from fastapi_eventbus.forwarders.sqs import SQSForwarder

    with pytest.raises(ConfigurationError, match="dead_letter is called with one argument"):
        SQSForwarder("https://sqs.eu-west-1.amazonaws.com/1/q", dead_letter=no_argument)  # type: ignore[arg-type]


def test_message_size_limits_past_the_broker_s_are_refused() -> None:
    from fastapi_eventbus.forwarders.pubsub import PubSubForwarder
    from fastapi_eventbus.forwarders.sqs import SQSForwarder

    url = "https://sqs.eu-west-1.amazonaws.com/1/q"
    SQSForwarder(url, max_message_bytes=1_048_576)  # SQS's largest
    with pytest.raises(ConfigurationError, match="max_message_bytes"):
        SQSForwarder(url, max_message_bytes=2_000_000)
    with pytest.raises(ConfigurationError, match="max_message_bytes"):
        PubSubForwarder("projects/my-shop/topics/orders", max_message_bytes=50_000_000)
    PubSubForwarder(
        "projects/my-shop/topics/orders", max_message_bytes=None
    )  # no check at emit: documented


def test_a_worker_refuses_a_source_that_would_extend_in_a_busy_loop() -> None:
    source = MemorySource()
    source.extend_interval = 0  # a custom source's attribute, set without a check
    with pytest.raises(ConfigurationError, match="extend_interval must be"):
        Worker(EventBus(), source)


def test_a_lambda_time_margin_past_lambda_s_longest_time_is_refused() -> None:
    from fastapi_eventbus.serverless import lambda_sqs_handler

    app = FastAPI()
    EventBus().install(app)
    # Past Lambda's longest time limit, every record failed at once, at every invocation.
    for margin in (900, 1_000, math.inf):
        with pytest.raises(ConfigurationError, match="time_margin must be"):
            lambda_sqs_handler(app, time_margin=margin)


class SendReceipt:
    """A handler written as a class with its work in ``__call__``."""

    calls: ClassVar[list[str]] = []

    async def __call__(self, event: Event) -> None:
        self.calls.append(event.id)


@pytest.mark.anyio
async def test_a_class_with_call_is_refused_as_a_handler_and_its_instance_runs() -> None:
    bus = EventBus()
    # Found: accepted; each event built an instance, and __call__ never ran.
    with pytest.raises(ConfigurationError, match=r"register an instance of it|bus.on\(...\)"):
        bus.on("order.*")(SendReceipt)
    bus.on("order.*")(SendReceipt())
    event = await bus.publish("order.placed")
    assert SendReceipt.calls == [event.id]


class OrderPlacedV1(BaseModel):
    __event_name__: ClassVar[str] = "order.placed"
    order: int


class OrderPlacedV2(BaseModel):
    __event_name__: ClassVar[str] = "order.placed"
    order: int
    customer: str


def test_a_handler_s_model_that_conflicts_with_the_event_s_schema_is_refused() -> None:
    bus = EventBus()
    bus.register(OrderPlacedV1)

    async def send_mail(event: OrderPlacedV2) -> None:
        """Validated with V2 after the response, though emit validated with V1."""

    # Found: accepted; a payload V1 passed at emit then failed V2 in the handler.
    with pytest.raises(ConfigurationError, match="already has the schema OrderPlacedV1"):
        bus.on()(send_mail)


class CatPayload(BaseModel):
    id: int


@pytest.mark.parametrize("pattern", ["cat.*", "cat.?", "cat.[ab]"])
def test_a_schema_registered_for_a_pattern_is_refused(pattern: str) -> None:
    """Found: ``bus.register("cat.*", CatPayload)`` was accepted, and validated only events
    named ``cat.*`` itself: ``emit("cat.created", {"id": "not an int"})`` passed. A schema
    is for an event name; a pattern given to `register` is refused, saying so."""
    bus = EventBus()
    with pytest.raises(ConfigurationError, match="takes an event name, not a pattern"):
        bus.register(pattern, CatPayload)
    bus.register("cat.created", CatPayload)  # what to write instead


def generator_hook(report: object) -> Iterator[None]:
    """A hook written with ``yield`` by mistake: calling it only makes a generator."""
    yield


async def async_generator_hook(report: object) -> AsyncIterator[None]:
    yield


class GeneratorCallHook:
    def __call__(self, report: object) -> Iterator[None]:
        yield


@pytest.mark.parametrize("hook_name", ["on_error", "on_discard", "dead_letter"])
@pytest.mark.parametrize(
    "hook",
    [generator_hook, async_generator_hook, GeneratorCallHook()],
    ids=["generator", "async-generator", "instance-with-generator-call"],
)
def test_a_generator_function_as_a_hook_is_refused(hook_name: str, hook: Any) -> None:
    """Found: a generator function (sync or async) passed the hook's one-argument check;
    each report then only made a generator, and the hook's body (paging someone, writing the
    failure down) never ran, with nothing in the logs. Refused where it is given now."""
    from fastapi_eventbus.forwarders.sqs import SQSForwarder

    def given() -> object:
        if hook_name == "dead_letter":
            return SQSForwarder("https://sqs.eu-west-1.amazonaws.com/1/q", dead_letter=hook)
        return EventBus(**{hook_name: hook})

    with pytest.raises(ConfigurationError, match=f"{hook_name} is a generator function"):
        given()


def test_a_sync_verify_of_the_push_router_is_called_like_an_async_one() -> None:
    from fastapi_eventbus.serverless import push_router

    def verify(request: Request) -> None:  # FastAPI's usual style: raise HTTPException
        if request.headers.get("authorization") != "Bearer good":
            raise HTTPException(401, "bad token")

    app, bus = FastAPI(), EventBus()
    bus.install(app)
    handled: list[str] = []
    bus.on("order.*")(lambda event: handled.append(event.id))
    app.include_router(push_router(path="/events", verify=verify))
    event = Event(name="order.placed", source="//shop")
    data = base64.b64encode(wire.pubsub_data(event)).decode()
    envelope = {"message": {"data": data, "attributes": wire.pubsub_attributes(event)}}
    envelope["message"]["messageId"] = "m-1"
    with TestClient(app) as client:
        bad = client.post("/events/pubsub", json=envelope, headers={"authorization": "x"})
        good = client.post(
            "/events/pubsub", json=envelope, headers={"authorization": "Bearer good"}
        )
    # Found: a sync verify was accepted, and every good request was answered 500.
    assert (bad.status_code, good.status_code) == (401, 204)
    assert handled == [event.id]


def test_a_recording_forwarder_is_unaffected() -> None:
    """The checks above leave the defaults alone."""
    EventBus(disabled=False, keep_events_on_error=True, on_error=print, on_discard=print)
    RecordingForwarder()
    MemorySource(extend_interval=None)
    Backoff()
