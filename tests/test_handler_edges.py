"""Handlers at the edges: never silently skipped, failures never recorded as success, bounded
in time, retried when asked, loud in tests, visible mistakes, the envelope, lifespan state and
app factories.

Each test of a finding names it ("finding N" of the handlers issue) and failed on the code
before the fix. No ``from __future__ import annotations``: FastAPI resolves the annotations of
handlers defined inside tests against module globals.
"""

import asyncio
import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, ClassVar

import anyio
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel
from starlette.requests import HTTPConnection

from fastapi_eventbus import (
    ConfigurationError,
    DiscardedEvents,
    Event,
    EventBus,
    HandlerFailuresError,
    OutsideRequestError,
    Retry,
    _hooks,
    current_event,
    get_bus,
)
from fastapi_eventbus.exceptions import ForwarderError
from fastapi_eventbus.forwarders import Forwarder
from fastapi_eventbus.testing import capture
from tests._support import until
from tests.conftest import Hooks

pytestmark = pytest.mark.anyio


def portal(client: TestClient) -> Any:
    """The running ``with TestClient(app)`` block's portal: code on the app's event loop."""
    assert client.portal is not None
    return client.portal


def post_emitting(app: FastAPI, *names: str) -> TestClient:
    """Add ``POST /`` emitting *names* (payload ``{"id": 1}``) and return a client."""

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        for name in names:
            bus.emit(name, {"id": 1})

    return TestClient(app)


# -- finding 1: bodies that never ran, recorded as success --------------------------------


def sync_wrapper(func: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator written the usual way: a sync ``functools.wraps`` wrapper."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


class AsyncCallable:
    def __init__(self, ran: list[Any]) -> None:
        self.ran = ran

    async def __call__(self, event: Event) -> None:
        self.ran.append(event.name)


def marked(ran: list[Any]) -> Callable[..., Any]:
    """A sync def returning a coroutine, with asyncio's legacy ``_is_coroutine`` marker."""

    async def body(event: Event) -> None:
        ran.append(event.name)

    def handler(event: Event) -> Awaitable[None]:
        return body(event)

    handler._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
    return handler


@pytest.mark.filterwarnings("error::RuntimeWarning")  # "coroutine ... was never awaited"
@pytest.mark.parametrize("kind", ["functools.wraps", "partial of async __call__", "_is_coroutine"])
def test_finding_1_async_bodies_behind_wrappers_run(
    app: FastAPI, bus: EventBus, hooks: Hooks, kind: str
) -> None:
    ran: list[Any] = []
    handler: Callable[..., Any]
    if kind == "functools.wraps":

        async def wrapped(event: Event) -> None:
            ran.append(event.name)

        handler = sync_wrapper(wrapped)
    elif kind == "partial of async __call__":
        handler = functools.partial(AsyncCallable(ran))
    else:
        handler = marked(ran)
    bus.on("cat.*")(handler)
    with capture(bus) as seen:
        post_emitting(app, "cat.created").post("/")
    assert ran == ["cat.created"]
    assert len(seen.handled) == 1
    assert hooks.failures == []


def test_finding_1_a_failing_wrapped_body_is_a_failure(bus: EventBus, hooks: Hooks) -> None:
    async def broken(event: Event) -> None:
        raise LookupError("in the body")

    bus.on("x")(sync_wrapper(broken))
    with capture(bus, raise_failures=False) as seen:
        asyncio.run(bus.publish("x"))
    assert [type(call.error) for call in seen.handled] == [LookupError]
    assert [type(f.exception) for f in hooks.failures] == [LookupError]


def test_finding_1_a_marked_dependency_in_a_simple_graph_gives_its_value(bus: EventBus) -> None:
    async def value() -> int:
        return 42

    def dependency() -> Awaitable[int]:
        return value()

    dependency._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
    got: list[object] = []

    @bus.on("x")
    async def handler(event: Event, v: int = Depends(dependency)) -> None:
        got.append(v)

    with capture(bus):
        asyncio.run(bus.publish("x"))
    assert got == [42]


async def send_receipt(event: Event, sent: list[str]) -> None:
    """The work a handler forgot to await (``return send_receipt(...)``); fails for "bad"."""
    sent.append(event.name)
    if event.name == "bad":
        raise LookupError("in the coroutine the handler returned")


def yielded() -> Iterator[int]:
    yield 1


@pytest.mark.parametrize(
    "path", ["no dependency", "no time limit", "a dependency", "a yield dependency", "a retry"]
)
async def test_an_awaitable_an_async_handler_returns_is_awaited(
    bus: EventBus, hooks: Hooks, path: str
) -> None:
    """Found: an async handler that returned a coroutine instead of awaiting it (``return
    send_receipt(event)``) was recorded as a success; the coroutine was dropped (Python's
    "never awaited" warning aside): its work never done, its failure never reported. It is
    awaited now, within the call, on every path, as a sync handler's already was."""
    sent: list[str] = []
    tries: list[str] = []

    async def bare(event: Event) -> Awaitable[None]:
        tries.append(event.name)
        if path == "a retry" and tries.count(event.name) == 1:  # its second try returns it
            raise ConnectionError("try again")
        return send_receipt(event, sent)

    async def with_dependency(
        event: Event, d: int = Depends(yielded if path == "a yield dependency" else lambda: 1)
    ) -> Awaitable[None]:
        return send_receipt(event, sent)

    handler = with_dependency if "dependency" in path and path != "no dependency" else bare
    timeout = math.inf if path == "no time limit" else None
    retry = Retry(attempts=2, initial_delay=0.01) if path == "a retry" else None
    bus.on("ok", "bad", timeout=timeout, retry=retry)(handler)
    with capture(bus, raise_failures=False) as seen:
        await bus.publish("ok")
        await bus.publish("bad")
    assert sent == ["ok", "bad"]
    assert [type(call.error) for call in seen.handled] == [type(None), LookupError]
    assert [type(failure.exception) for failure in hooks.failures] == [LookupError]


@pytest.mark.anyio
async def test_a_task_or_future_a_handler_returns_runs_on_its_own(
    bus: EventBus, hooks: Hooks
) -> None:
    """A handler that starts work and returns its task (``return asyncio.create_task(...)``)
    or a future another handler resolves: they run on their own, as before awaiting returned
    coroutines (found in review: the flush waited for the task, cancelled it at the handler's
    time limit and reported the handler failed; a future a later handler resolves hung it)."""
    loop = asyncio.get_running_loop()
    resolved: asyncio.Future[str] = loop.create_future()
    done: list[str] = []

    async def background() -> None:
        await asyncio.sleep(0.5)
        done.append("background")

    @bus.on("x", timeout=0.2)
    async def kick_off(event: Event) -> asyncio.Task[None]:
        return asyncio.create_task(background())

    @bus.on("x", timeout=math.inf)
    async def waiting(event: Event) -> asyncio.Future[str]:
        return resolved

    @bus.on("x")
    async def resolving(event: Event) -> None:
        resolved.set_result("resolved")

    await asyncio.wait_for(bus.publish("x"), 2)
    assert hooks.failures == []
    await asyncio.sleep(0.6)
    assert done == ["background"]


# -- finding 2: a yield dependency that swallows the handler's exception -------------------


@pytest.mark.parametrize("scope", [None, "function"])
def test_finding_2_a_swallowed_exception_is_still_a_failure(
    bus: EventBus, hooks: Hooks, caplog: pytest.LogCaptureFixture, scope: Any
) -> None:
    def swallowing() -> Iterator[str]:
        with contextlib.suppress(RuntimeError):  # "handled", not re-raised: FastAPI fails here
            yield "session"

    dependency = Depends(swallowing) if scope is None else Depends(swallowing, scope=scope)

    @bus.on("x")
    async def handler(event: Event, session: str = dependency) -> None:
        raise RuntimeError("lost?")

    with capture(bus, raise_failures=False) as seen:
        asyncio.run(bus.publish("x"))
    [call] = seen.handled
    assert isinstance(call.error, RuntimeError)
    assert [type(f.exception) for f in hooks.failures] == [RuntimeError]
    assert "did not re-raise" in str(call.error.__notes__)
    assert any(
        r.levelno == logging.ERROR and "failed for event" in r.message for r in caplog.records
    )


@pytest.mark.parametrize("raised", [asyncio.CancelledError, SystemExit])
def test_a_yield_dependency_swallowing_any_exception_does_not_hide_the_failure(
    bus: EventBus, hooks: Hooks, raised: type[BaseException]
) -> None:
    """A dependency that rolls back on anything (``except BaseException``) and does not
    re-raise: a `SystemExit` or a `CancelledError` nothing asked for, which are the call's
    failures like any other, were recorded as a success."""

    async def session() -> AsyncIterator[str]:
        with contextlib.suppress(BaseException):  # rolls back on anything, and swallows it
            yield "session"

    @bus.on("x")
    async def handler(event: Event, session: Annotated[str, Depends(session)]) -> None:
        raise raised

    with capture(bus, raise_failures=False) as seen:
        asyncio.run(bus.publish("x"))
    [call] = seen.handled
    assert isinstance(call.error, raised)
    assert [type(f.exception) for f in hooks.failures] == [raised]


@pytest.mark.parametrize("scope", [None, "function"])
def test_a_failed_handler_s_background_tasks_do_not_run(
    bus: EventBus, hooks: Hooks, scope: Any
) -> None:
    """As FastAPI runs no background task of an endpoint that failed, even when a yield
    dependency swallowed its exception."""
    sent: list[str] = []

    def swallowing() -> Iterator[str]:
        with contextlib.suppress(RuntimeError):
            yield "session"

    dependency = Depends(swallowing) if scope is None else Depends(swallowing, scope=scope)

    @bus.on("payment.received")
    async def handler(event: Event, tasks: BackgroundTasks, session: str = dependency) -> None:
        tasks.add_task(sent.append, "receipt e-mail")
        raise RuntimeError("the payment could not be recorded")

    with capture(bus, raise_failures=False):
        asyncio.run(bus.publish("payment.received"))
    assert [type(f.exception) for f in hooks.failures] == [RuntimeError]
    assert sent == []


# -- finding 3: Request and HTTPConnection together ----------------------------------------


def test_finding_3_request_and_http_connection_are_both_given(bus: EventBus) -> None:
    got: list[object] = []

    @bus.on("x")
    def handler(event: Event, request: Request, conn: HTTPConnection) -> None:
        got.extend([request, conn])

    with capture(bus):
        asyncio.run(bus.publish("x"))
    request, conn = got
    assert isinstance(request, Request)
    assert isinstance(conn, HTTPConnection)


def test_finding_3_what_fastapi_cannot_fill_is_still_refused(bus: EventBus) -> None:
    def handler(event: Event, first: Request, second: Request) -> None: ...

    with pytest.raises(ConfigurationError, match="would never fill parameter 'first'"):
        bus.on("x")(handler)


# -- finding 4: overrides are read at each handler call ------------------------------------


def real_mailer() -> str:
    return "real"


def test_finding_4_overrides_are_read_at_each_handler_call(app: FastAPI, bus: EventBus) -> None:
    seen: list[str] = []

    @bus.on("x")
    async def first(event: Event) -> None:
        app.dependency_overrides[real_mailer] = lambda: "fake"

    @bus.on("x")
    async def second(event: Event, mailer: str = Depends(real_mailer)) -> None:
        seen.append(mailer)

    with capture(bus):
        asyncio.run(bus.publish("x"))
    assert seen == ["fake"]


# -- finding 5: silent no-ops ---------------------------------------------------------------


@pytest.mark.parametrize("pattern", [" user.*", "user.* ", "[ ]user", "user\ud800*"])
def test_finding_5_a_pattern_that_can_never_match_is_refused(bus: EventBus, pattern: str) -> None:
    with pytest.raises(ConfigurationError, match="can never match"):
        bus.on(pattern)
    with pytest.raises(ConfigurationError, match="can never match"):
        bus.forward(pattern, bus_forwarder())


def bus_forwarder() -> Any:
    from fastapi_eventbus.testing import RecordingForwarder

    return RecordingForwarder()


@pytest.mark.parametrize(
    "pattern", ["*", "user.*", "[ u]ser", "[!x]*", "?", "order.[!ax_0]", "[!a-z]*"]
)
def test_patterns_that_can_match_are_accepted(bus: EventBus, pattern: str) -> None:
    @bus.on(pattern)
    async def handler(event: Event) -> None: ...


def test_finding_5_an_event_nothing_handles_is_warned_about_once_per_name(
    app: FastAPI, bus: EventBus, caplog: pytest.LogCaptureFixture
) -> None:
    @bus.on("user.*")
    async def handler(event: Event) -> None: ...

    client = post_emitting(app, "usr.created", "usr.created", "user.created", "usr.deleted")
    client.post("/")
    client.post("/")
    warnings = [r for r in caplog.records if r.name == "fastapi_eventbus.unmatched"]
    assert [r.levelno for r in warnings] == [logging.WARNING] * 2
    assert "'usr.created'" in warnings[0].getMessage()
    assert "'usr.deleted'" in warnings[1].getMessage()
    assert "matches no handler and no forwarder" in warnings[0].getMessage()


async def test_every_event_nothing_handles_reaches_on_discard(
    bus: EventBus, hooks: Hooks, caplog: pytest.LogCaptureFixture
) -> None:
    """The WARNING comes once per name; each such event, by its id, reaches ``on_discard``
    (the second and later of a name were reported nowhere)."""
    first = await bus.publish("usr.created", {"n": 1})
    second = await bus.publish("usr.created", {"n": 2})
    assert [report.ids for report in hooks.discards] == [[first.id], [second.id]]
    assert all("matches no handler and no forwarder" in r.reason for r in hooks.discards)
    warnings = [r for r in caplog.records if r.name == "fastapi_eventbus.unmatched"]
    assert len(warnings) == 1


def test_an_event_only_forwarded_is_not_warned_about(
    app: FastAPI, bus: EventBus, caplog: pytest.LogCaptureFixture
) -> None:
    bus.forward("audit.*", bus_forwarder())
    post_emitting(app, "audit.login").post("/")
    assert [r for r in caplog.records if r.name == "fastapi_eventbus.unmatched"] == []


def test_finding_5_on_without_parentheses_says_so(bus: EventBus) -> None:
    with pytest.raises(ConfigurationError, match=r"@bus.on\(\"pattern\"\) with parentheses"):

        @bus.on  # type: ignore[arg-type]
        async def handler(event: Event) -> None: ...


# -- timeouts --------------------------------------------------------------------------------


async def test_a_hung_async_handler_times_out_and_the_others_still_run(
    bus: EventBus, hooks: Hooks, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    @bus.on("x", timeout=0.2)
    async def hung(event: Event) -> None:
        await asyncio.Event().wait()

    @bus.on("x")
    async def after(event: Event) -> None:
        ran.append("after")

    started = time.monotonic()
    with capture(bus, raise_failures=False) as seen:
        await bus.publish("x")
    assert 0.2 <= time.monotonic() - started < 2
    assert ran == ["after"]
    [failure] = seen.failures
    assert isinstance(failure.error, TimeoutError)
    assert "did not finish within 0.2s" in str(failure.error)
    assert [type(f.exception) for f in hooks.failures] == [TimeoutError]
    assert any(r.levelno == logging.ERROR for r in caplog.records)


def test_one_requests_events_each_get_their_own_time_limit() -> None:
    """A request's flush keeps one time-limit object for all its calls: each event's handler
    is bounded anew, after a call before it timed out or finished."""
    app, bus = FastAPI(), EventBus()
    bus.install(app)
    outcomes: list[tuple[str, str]] = []

    @bus.on("step.*", timeout=0.2)
    async def step(event: Event) -> None:
        if event.payload["hang"]:
            await asyncio.Event().wait()
        await asyncio.sleep(0.05)

    @app.post("/")
    async def endpoint(b: EventBus = Depends(get_bus)) -> None:
        for i, hang in enumerate([True, False, True, False]):
            b.emit(f"step.{i}", {"hang": hang})

    started = time.monotonic()
    with capture(bus, raise_failures=False) as seen:
        assert TestClient(app).post("/").status_code == 200
    for call in seen.handled:
        outcomes.append((call.event.name, type(call.error).__name__))
    assert outcomes == [
        ("step.0", "TimeoutError"),
        ("step.1", "NoneType"),
        ("step.2", "TimeoutError"),
        ("step.3", "NoneType"),
    ]
    assert 0.4 <= time.monotonic() - started < 3


async def test_the_timeout_covers_dependency_resolution(bus: EventBus) -> None:
    async def slow_pool() -> AsyncIterator[str]:
        await asyncio.sleep(30)
        yield "pool"

    @bus.on("x", timeout=0.1)
    async def handler(event: Event, pool: str = Depends(slow_pool)) -> None: ...

    with capture(bus, raise_failures=False) as seen:
        await bus.publish("x")
    assert [type(call.error) for call in seen.handled] == [TimeoutError]


async def test_a_blocked_sync_handler_is_reported_at_the_deadline(bus: EventBus) -> None:
    release = threading.Event()

    @bus.on("x", timeout=0.2)
    def blocked(event: Event) -> None:
        release.wait(10)  # a thread cannot be cancelled: it runs on, unwaited for

    started = time.monotonic()
    try:
        with capture(bus, raise_failures=False) as seen:
            await bus.publish("x")
        assert time.monotonic() - started < 2
        assert [type(call.error) for call in seen.handled] == [TimeoutError]
    finally:
        release.set()


@pytest.mark.parametrize("retried", [False, True], ids=["once", "retried"])
def test_what_a_timed_out_sync_handler_emits_later_is_refused(retried: bool) -> None:
    """Found: a sync handler past its time limit runs on in its thread; what it emitted
    after the deadline was handled, though its call had failed (with ``retry=``, the failed
    try's event and the successful try's were both handled)."""
    app, bus = FastAPI(), EventBus()
    bus.install(app)
    tries: list[int] = []
    late: list[BaseException] = []
    mails: list[int] = []
    done = threading.Event()
    retry = Retry(attempts=2, initial_delay=0.01) if retried else None

    @bus.on("order.placed", timeout=0.2, retry=retry)
    def charge(event: Event, events: EventBus = Depends(get_bus)) -> None:
        tries.append(len(tries) + 1)
        if len(tries) == 1:
            time.sleep(0.4)  # past the limit: the thread runs on
            try:
                events.emit("mail.send", {"try": 1})
            except BaseException as exc:
                late.append(exc)
            done.set()
            return
        events.emit("mail.send", {"try": len(tries)})

    @bus.on("mail.send")
    async def mail(event: Event) -> None:
        mails.append(event.payload["try"])

    @app.post("/")
    async def place(events: EventBus = Depends(get_bus)) -> None:
        events.emit("order.placed")

    with TestClient(app) as client:
        client.post("/")
        assert done.wait(5)
        client.portal.call(bus.drain)  # type: ignore[union-attr]
    assert mails == ([2] if retried else [])
    assert [type(exc) for exc in late] == [OutsideRequestError]
    assert "ran out of time" in str(late[0])


def test_what_a_timed_out_sync_handler_emits_while_its_failure_is_reported_is_refused() -> None:
    """Found: the call's batch was marked failed only after ``on_discard`` had heard of what
    it emitted before: an async hook that took a while let the thread's next emit in, and
    it was handled."""
    app = FastAPI()
    handled: list[str] = []
    outcome: list[str] = []

    async def slow_report(report: DiscardedEvents) -> None:
        await asyncio.sleep(0.5)  # writing the report somewhere

    bus = EventBus(on_discard=slow_report)
    bus.install(app)

    @bus.on("job.start", timeout=0.2)
    def slow(event: Event, events: EventBus = Depends(get_bus)) -> None:
        events.emit("job.step1")
        time.sleep(0.4)  # past its limit, while the hook for step1 runs
        try:
            events.emit("job.step2")
            outcome.append("accepted")
        except OutsideRequestError:
            outcome.append("refused")

    bus.on("job.step*")(lambda event: handled.append(event.name))

    @app.post("/")
    async def start(events: EventBus = Depends(get_bus)) -> None:
        events.emit("job.start")

    with TestClient(app) as client:
        client.post("/")
        client.portal.call(asyncio.sleep, 1.0)  # type: ignore[union-attr]
    assert (outcome, handled) == (["refused"], [])


async def test_a_task_an_async_handler_started_may_emit_after_the_handler_timed_out() -> None:
    """An async handler past its limit is cancelled: it does not run on. A task it started
    is like one of a handler that raised: what it emits later is handled (only a sync
    handler's own thread, which runs on, is refused)."""
    bus = EventBus()
    spawned: list[asyncio.Task[None]] = []
    handled: list[str] = []

    @bus.on("job.start", timeout=0.05)
    async def starts(event: Event, events: EventBus = Depends(get_bus)) -> None:
        async def later() -> None:
            await asyncio.sleep(0.1)
            events.emit("job.later")

        spawned.append(asyncio.create_task(later()))
        await asyncio.sleep(1)

    bus.on("job.later")(lambda event: handled.append(event.name))
    with capture(bus, raise_failures=False):
        await bus.publish("job.start")
    await spawned[0]
    await bus.drain(1)
    assert handled == ["job.later"]


async def test_the_bus_wide_default_and_no_limit() -> None:
    bus = EventBus(handler_timeout=0.1)
    finished: list[str] = []

    @bus.on("x")
    async def bounded(event: Event) -> None:
        await asyncio.sleep(0.3)
        finished.append("bounded")

    @bus.on("x", timeout=math.inf)
    async def unbounded(event: Event) -> None:
        await asyncio.sleep(0.3)
        finished.append("unbounded")

    with capture(bus, raise_failures=False) as seen:
        await bus.publish("x")
    assert finished == ["unbounded"]
    assert [type(call.error) for call in seen.handled] == [TimeoutError, type(None)]


def test_the_default_handler_timeout_is_sixty_seconds() -> None:
    bus = EventBus()

    @bus.on("x")
    async def handler(event: Event) -> None: ...

    assert bus.time_limit("x") == 60.0


async def test_an_outside_cancellation_is_not_turned_into_a_timeout(bus: EventBus) -> None:
    @bus.on("x", timeout=0.05)
    async def slow(event: Event) -> None:
        await asyncio.sleep(1)

    task = asyncio.create_task(bus.publish("x"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("bad", [0, -1, True, "1", float("nan")])
def test_a_bad_timeout_is_refused_where_it_is_given(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        EventBus(handler_timeout=bad)
    with pytest.raises(ConfigurationError, match="timeout"):
        EventBus().on("x", timeout=bad)


# -- retries ---------------------------------------------------------------------------------

QUICK = Retry(attempts=3, initial_delay=0.01, max_delay=0.02)


async def test_a_retried_handler_that_recovers_is_a_success(
    bus: EventBus, hooks: Hooks, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    @bus.on("x", retry=QUICK)
    async def flaky(event: Event) -> None:
        calls.append(len(calls))
        if len(calls) < 3:
            raise ConnectionError("try again")

    with capture(bus) as seen:
        await bus.publish("x")
    assert calls == [0, 1, 2]
    assert [call.error for call in seen.handled] == [None]
    assert hooks.failures == []
    levels = [r.levelno for r in caplog.records if r.name == "fastapi_eventbus"]
    assert levels == [logging.WARNING, logging.WARNING]
    assert "attempt 1 of 3" in caplog.records[0].getMessage()


async def test_a_handler_that_keeps_failing_is_reported_once_after_its_last_attempt(
    bus: EventBus, hooks: Hooks, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    @bus.on("x", retry=QUICK)
    async def broken(event: Event, chained: EventBus = Depends(get_bus)) -> None:
        calls.append(1)
        chained.emit("x.follow-up")  # discarded with each failed attempt
        raise ValueError("still broken")

    followed: list[str] = []

    @bus.on("x.follow-up")
    async def follow_up(event: Event) -> None:
        followed.append(event.id)

    with capture(bus, raise_failures=False) as seen:
        await bus.publish("x")
    assert len(calls) == 3
    assert followed == []
    assert [type(call.error) for call in seen.handled] == [ValueError]
    assert [type(f.exception) for f in hooks.failures] == [ValueError]
    levels = [r.levelno for r in caplog.records if r.name == "fastapi_eventbus"]
    assert levels.count(logging.ERROR) == 1
    assert levels.count(logging.WARNING) >= 2
    assert len(hooks.discards) == 3


async def test_handle_does_not_retry_the_broker_redelivers(bus: EventBus) -> None:
    calls: list[int] = []

    @bus.on("x", retry=QUICK)
    async def broken(event: Event) -> None:
        calls.append(1)
        raise ValueError("broken")

    failures = await bus.handle(Event(name="x"))
    assert len(calls) == 1
    assert len(failures) == 1


def test_retry_must_be_a_retry(bus: EventBus) -> None:
    with pytest.raises(ConfigurationError, match="retry must be a Retry"):
        bus.on("x", retry=3)  # type: ignore[arg-type]


# -- loud in tests ---------------------------------------------------------------------------


def test_capture_raises_when_a_handler_failed(app: FastAPI, bus: EventBus) -> None:
    @bus.on("cat.*")
    async def broken(event: Event) -> None:
        raise LookupError("no such shelter")

    client = post_emitting(app, "cat.created")
    with pytest.raises(HandlerFailuresError, match="no such shelter") as raised, capture(bus):
        assert client.post("/").status_code == 200
    assert isinstance(raised.value.__cause__, LookupError)
    assert len(raised.value.failures) == 1
    assert "broken failed for event 'cat.created'" in str(raised.value)


def test_capture_does_not_hide_the_blocks_own_exception(bus: EventBus) -> None:
    @bus.on("x")
    async def broken(event: Event) -> None:
        raise LookupError("handler")

    def the_tests_own_failure() -> None:
        asyncio.run(bus.publish("x"))
        raise KeyError("the test's own")

    with pytest.raises(KeyError), capture(bus):
        the_tests_own_failure()


# -- the envelope in typed handlers ----------------------------------------------------------


class OrderPlaced(BaseModel):
    __event_name__: ClassVar[str] = "order.placed"
    id: int


async def test_current_event_gives_the_envelope_to_a_typed_handler(
    app: FastAPI, bus: EventBus
) -> None:
    got: list[tuple[int, str]] = []

    @bus.on()
    async def typed(order: OrderPlaced, event: Event = Depends(current_event)) -> None:
        got.append((order.id, event.id))

    @bus.on("order.*")
    def sync_typed(
        order: OrderPlaced, event: Annotated[Event, Depends(current_event)], request: Request
    ) -> None:
        got.append((order.id, event.id))

    published = await bus.publish(OrderPlaced(id=1))
    handled = Event(name="order.placed", payload={"id": 2})
    assert await bus.handle(handled) == []

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> str:
        return bus.emit(OrderPlaced(id=3)).id

    emitted = await asyncio.to_thread(lambda: TestClient(app).post("/").json())
    assert got == [
        (1, published.id),
        (1, published.id),
        (2, handled.id),
        (2, handled.id),
        (3, emitted),
        (3, emitted),
    ]


def test_current_event_outside_a_handler_says_where_it_works(app: FastAPI) -> None:
    @app.get("/")
    async def endpoint(event: Event = Depends(current_event)) -> None: ...

    with pytest.raises(ConfigurationError, match="only available while a handler runs"):
        TestClient(app).get("/")


# -- lifespan state everywhere -----------------------------------------------------------------


def test_publish_and_handle_see_the_lifespan_state() -> None:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"sessionmaker": "the pool"}

    app = FastAPI(lifespan=lifespan)
    bus = EventBus()
    bus.install(app)
    seen: list[str] = []

    def get_session(request: Request) -> str:
        return str(request.state.sessionmaker)

    @bus.on("x")
    async def handler(event: Event, session: str = Depends(get_session)) -> None:
        seen.append(session)

    with TestClient(app) as client, capture(bus):
        portal(client).call(bus.publish, "x")
        portal(client).call(bus.handle, Event(name="x"))
    assert seen == ["the pool", "the pool"]


# -- app factories -------------------------------------------------------------------------------

FACTORY_BUS = EventBus()
FACTORY_LOG: list[tuple[str, str]] = []


def factory_greeting() -> str:
    return "hello"


@FACTORY_BUS.on("user.*")
async def factory_handler(event: Event, greeting: str = Depends(factory_greeting)) -> None:
    FACTORY_LOG.append((event.name, greeting))


def create_app() -> FastAPI:
    app = FastAPI()
    FACTORY_BUS.install(app)

    @app.post("/users")
    async def create(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("user.created")

    return app


@pytest.mark.parametrize("greeting", ["first app", "second app", "third app"])
def test_one_module_level_bus_serves_an_app_per_test(greeting: str) -> None:
    app = create_app()
    assert EventBus.of(app) is FACTORY_BUS
    app.dependency_overrides[factory_greeting] = lambda: greeting
    FACTORY_LOG.clear()
    with TestClient(app) as client, capture(FACTORY_BUS):
        client.post("/users")
        portal(client).call(FACTORY_BUS.publish, "user.published")
    assert [("user.created", greeting), ("user.published", greeting)] == FACTORY_LOG


def test_of_an_app_without_a_bus_says_what_to_call() -> None:
    from fastapi_eventbus import BusNotInstalledError

    with pytest.raises(BusNotInstalledError, match=r"bus.install\(app\)"):
        EventBus.of(FastAPI())


# -- a CancelledError nobody asked for --------------------------------------------------


async def test_what_a_retried_handler_emitted_is_reported_when_its_try_is_cancelled(
    hooks: Hooks,
) -> None:
    """Found: a handler with a `Retry` that emitted through ``Depends(get_bus)`` and was
    cancelled in its second try (a timeout middleware, ``wait_for`` around ``publish``,
    shutdown's deadline) lost that try's events without a word: only the first try's
    child batch was reported. They stayed pending, so the bus's shutdown waited its full
    ``shutdown_timeout`` for them. Each try's events are reported now."""
    bus = EventBus(on_discard=hooks.discards.append, shutdown_timeout=5)
    emitted: list[str] = []

    @bus.on("order.paid", retry=Retry(attempts=3, initial_delay=0.01))
    async def book(event: Event, events: EventBus = Depends(get_bus)) -> None:
        emitted.append(events.emit("shipment.booked").id)
        if len(emitted) == 1:
            raise ConnectionError("carrier down")
        await asyncio.sleep(10)  # the second try: still running when it is cancelled

    publishing = asyncio.ensure_future(bus.publish("order.paid"))
    await until(lambda: len(emitted) == 2)
    publishing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await publishing
    reported = [event_id for report in hooks.discards for event_id in report.ids]
    assert emitted[0] in reported
    assert emitted[1] in reported
    started = time.monotonic()
    await bus.close()
    assert time.monotonic() - started < 2  # nothing left pending to wait for


@pytest.mark.parametrize("raised", [asyncio.CancelledError, SystemExit, GeneratorExit])
def test_a_handler_raising_cancelled_error_or_system_exit_fails_alone(
    app: FastAPI, bus: EventBus, hooks: Hooks, raised: type[BaseException]
) -> None:
    """Found: `asyncio.CancelledError` that nothing asked for (the handler awaited a task
    someone else cancelled) was taken for the flush's own cancellation, and `SystemExit` (a
    library calling ``sys.exit``) went up through the flush: the request's other events were
    discarded ("the flush was cancelled"), the request's task ended with it, and the failure
    reached no ``on_error``. In a worker, `SystemExit` killed the process. Found later:
    `GeneratorExit` raised by a handler did the same (it was taken for the flush's coroutine
    being closed)."""
    ran: list[str] = []

    @bus.on("cat.lost")
    async def lost(event: Event) -> None:
        raise raised

    bus.on("cat.*")(lambda event: ran.append(event.id))
    emitted: list[Event] = []

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        emitted.extend(bus.emit(name) for name in ("cat.lost", "cat.fed", "cat.lost"))

    with TestClient(app) as client:
        assert client.post("/").status_code == 200
        assert client.post("/").status_code == 200  # the app goes on
    assert ran == [event.id for event in emitted]  # the other handler ran for each
    failed = [(f.event.id, type(f.exception)) for f in hooks.failures]
    assert failed == [(e.id, raised) for e in emitted if e.name == "cat.lost"]
    assert hooks.discards == []


async def test_a_handler_raising_cancelled_error_is_retried_like_any_failure(
    bus: EventBus, hooks: Hooks
) -> None:
    calls: list[str] = []

    @bus.on("cat.lost", retry=Retry(attempts=3, initial_delay=0.001, max_delay=0.001))
    async def flaky(event: Event) -> None:
        calls.append(event.id)
        if len(calls) < 3:
            raise asyncio.CancelledError

    event = await bus.publish("cat.lost")
    assert calls == [event.id] * 3
    assert hooks.failures == []


@pytest.mark.parametrize("raised", [asyncio.CancelledError, SystemExit, GeneratorExit])
def test_a_hook_raising_cancelled_error_or_system_exit_does_not_stop_the_flush(
    raised: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    """The ``on_error`` hook raised `asyncio.CancelledError` (nothing cancelled it) or
    `SystemExit`: it went up through the flush, and the request's later events were
    discarded. It is logged, and the flush goes on."""
    ran: list[str] = []

    def on_error(failure: Any) -> None:
        raise raised

    bus = EventBus(on_error=on_error)
    bus.install(app := FastAPI())

    @bus.on("cat.lost")
    async def broken(event: Event) -> None:
        raise LookupError("no cat")

    bus.on("cat.fed")(lambda event: ran.append(event.id))
    emitted: list[Event] = []

    @app.post("/")
    async def endpoint(bus: EventBus = Depends(get_bus)) -> None:
        emitted.extend(bus.emit(name) for name in ("cat.lost", "cat.fed"))

    with TestClient(app) as client:
        assert client.post("/").status_code == 200
    assert ran == [emitted[1].id]
    hook_lines = [r for r in caplog.records if r.getMessage().startswith("fastapi_eventbus hook")]
    assert [r.levelno for r in hook_lines] == [logging.ERROR]


@pytest.mark.parametrize("hook", ["on_error", "dead_letter"])
def test_an_async_hook_raising_system_exit_is_its_failure_like_a_sync_hook_s(
    hook: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: an async hook runs as a task, and asyncio re-raises a `SystemExit` raised in
    a task out of the event loop: a library calling ``sys.exit`` in an async ``on_error``
    or ``dead_letter`` hook stopped the application, where a sync hook's was logged and the
    bus went on. It is logged as the hook's failure, and the next event is reported."""
    seen: list[str] = []

    async def report(value: Any) -> None:
        seen.append(value.event.id if hook == "on_error" else value.ids[0])
        if len(seen) == 1:
            raise SystemExit(2)

    class Refusing(Forwarder):
        async def send(self, events: Any) -> None:
            raise ForwarderError("refused for good")

    bus = EventBus(on_error=report if hook == "on_error" else None)
    if hook == "on_error":

        @bus.on("cat.lost")
        async def broken(event: Event) -> None:
            raise LookupError("no cat")

    else:
        bus.forward("cat.*", Refusing(dead_letter=report, retry=Retry(attempts=1)))

    async def main() -> list[str]:
        return [(await bus.publish("cat.lost")).id for _ in range(2)]

    with capture(bus, raise_failures=False):
        ids = asyncio.run(main())
    assert seen == ids
    hook_lines = [r for r in caplog.records if r.getMessage().startswith("fastapi_eventbus hook")]
    assert [r.levelno for r in hook_lines] == [logging.ERROR]
    assert "SystemExit(2)" in caplog.text


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("where", ["handler", "hook"])
async def test_a_publish_whose_coroutine_is_closed_lets_it_close(where: str) -> None:
    """A coroutine closed while suspended (its task destroyed pending, ``coro.close()``)
    gets `GeneratorExit` at its ``await``: the bus lets it through instead of taking it for
    the handler's or the hook's failure and awaiting on ("coroutine ignored GeneratorExit")."""
    waiting = asyncio.get_running_loop().create_future()
    failures: list[Any] = []

    async def on_error(failure: Any) -> None:
        await waiting

    bus = EventBus(on_error=on_error if where == "hook" else failures.append)

    @bus.on("cat.*")
    async def handler(event: Event) -> None:
        if where == "handler":
            await waiting
        raise LookupError("no cat")

    publishing = bus.publish("cat.fed")
    suspended = publishing.send(None)  # in the handler, or waiting for on_error's task
    assert suspended is waiting if where == "handler" else not suspended.done()
    publishing.close()  # raises RuntimeError if the bus awaited again
    assert failures == []
    waiting.cancel()


@pytest.mark.parametrize("stubborn", [False, True])
async def test_a_hook_that_never_returns_does_not_hold_the_bus(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, stubborn: bool
) -> None:
    """Found: hooks had no time limit. An ``on_error`` or ``on_discard`` that never returned
    (an alerting call without a timeout) held `publish`, the request's flush and shutdown's
    `drain` forever: uvicorn then waited at "Waiting for background tasks" for good."""
    monkeypatch.setattr(_hooks, "HOOK_TIMEOUT", 0.2)

    released = False

    async def hangs(report: Any) -> None:
        while not released:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if not stubborn:
                    raise

    bus = EventBus(on_error=hangs, on_discard=hangs)
    handled: list[str] = []

    @bus.on("cat.lost")
    async def broken(event: Event) -> None:
        raise LookupError("no cat")

    bus.on("cat.*")(lambda event: handled.append(event.id))
    started = time.monotonic()
    with anyio.fail_after(10):
        event = await bus.publish("cat.lost")
        await bus.publish("dog.unknown")  # nothing matches: on_discard
    assert time.monotonic() - started < 2 * (0.2 + 1.0) + 1
    assert handled == [event.id]
    timed_out = [r for r in caplog.records if "did not return within 0.2s" in r.getMessage()]
    assert len(timed_out) == 2
    assert all(r.levelno == logging.ERROR for r in timed_out)
    released = True  # the stubborn hooks left running end with the test
    await asyncio.sleep(0.05)
