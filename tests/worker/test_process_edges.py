"""The worker process (the CLI) at its edges, against moto's SQS server: an app that handles
nothing, handlers that hang or block, and an app that configures logging its own way.

The apps are `tests.worker.stuck`'s. Messages are counted by event id: in the dead-letter
queue, in the queue, and in the handlers' ``started <id>`` log lines.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import pytest

from fastapi_eventbus import EventBus
from fastapi_eventbus.wire import decode_message
from tests.forwarders._moto import Moto
from tests.worker._helpers import (
    create_queue,
    peek,
    queue_with_dlq,
    sqs_options,
    wait_for,
    worker_process,
)

pytestmark = pytest.mark.slow

LINE_START = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
"""How the worker command starts each log line: the time, then the level and the logger."""
EXIT_GRACE = 3.0
"""`fastapi_eventbus.cli._worker._EXIT_GRACE`: the wait for handlers still running, at exit."""


async def forward(moto: Moto, queue_url: str, *names: str) -> list[str]:
    """Forward one event per name to *queue_url*, as a web app would; their ids."""
    bus = EventBus()
    bus.forward("order.*", moto.forwarder(queue_url))
    ids = [(await bus.publish(name, {})).id for name in names]
    await bus.close()
    return ids


def lines_with(log: str, *parts: str) -> list[str]:
    return [line for line in log.splitlines() if all(part in line for part in parts)]


def test_an_event_no_handler_matches_is_given_back_until_the_dead_letter_queue_takes_it(
    moto: Moto, tmp_path: Path
) -> None:
    queue_url, dlq_url = asyncio.run(queue_with_dlq(moto, "unhandled", max_receive_count=1))
    options = sqs_options(moto, queue_url)
    with worker_process(
        "tests.worker.stuck:forward_only_app", *options, log=tmp_path / "w.log"
    ) as worker:
        (event_id,) = asyncio.run(forward(moto, queue_url, "order.placed"))
        (dead,) = wait_for(lambda: asyncio.run(peek(moto, dlq_url)), what="the dead letter")
        assert worker.terminate() == 0, worker.output()
    assert decode_message(dead).id == event_id
    log = worker.output()
    (warning,) = lines_with(log, "the bus has no handlers")
    assert re.match(
        LINE_START + "WARNING fastapi_eventbus.worker: the bus has no handlers", warning
    )
    (error,) = lines_with(log, f"id={event_id}", "matches no handler")
    assert re.match(LINE_START + "ERROR fastapi_eventbus.worker: message ", error)
    assert f"(event 'order.placed' id={event_id}) from {queue_url.rsplit('/', 1)[-1]}" in error
    assert error.endswith(
        f"giving it back (on_unhandled='retry'): {queue_url.rsplit('/', 1)[-1]} delivers it "
        "again, forever unless a dead-letter policy moves it"
    )
    assert "handled=0" in log
    assert "unhandled=1" in log


def test_hung_messages_reach_the_dead_letter_queue_and_the_worker_still_exits(
    moto: Moto, tmp_path: Path
) -> None:
    """``order.hangs`` is cancelled at its 1 s limit and fails; ``order.stubborn`` ignores that,
    and the worker gives its message up at 1 s + 5 s, though the heartbeat (every 1 s) runs."""
    queue_url, dlq_url = asyncio.run(queue_with_dlq(moto, "hung", max_receive_count=1))
    options = [*sqs_options(moto, queue_url), "--visibility-timeout", "2", "--concurrency", "2"]
    with worker_process("tests.worker.stuck:hung_app", *options, log=tmp_path / "w.log") as worker:
        sent = time.monotonic()
        hangs, stubborn = asyncio.run(forward(moto, queue_url, "order.hangs", "order.stubborn"))
        dead: dict[str, float] = {}

        def both_dead() -> bool:
            for message in asyncio.run(peek(moto, dlq_url)):
                dead.setdefault(decode_message(message).id, time.monotonic() - sent)
            return len(dead) == 2

        wait_for(both_dead, timeout=30, what="both messages in the dead-letter queue")
        stopping = time.monotonic()
        exit_code = worker.terminate(timeout=30)
        stopped_in = time.monotonic() - stopping
    log = worker.output()
    assert sorted(dead) == sorted([hangs, stubborn])
    assert dead[stubborn] < 12, dead  # given up after 6 s, dead-lettered at its next receive
    assert [len(lines_with(log, f"started {i}")) for i in (hangs, stubborn)] == [1, 1]
    assert lines_with(log, "ERROR", f"failed for event 'order.hangs' (id={hangs})")
    (abandoned,) = lines_with(log, f"id={stubborn}", "is still running")
    assert re.match(LINE_START + "ERROR fastapi_eventbus.worker: ", abandoned)
    assert "is still running 6s after its handlers started; giving it back" in abandoned
    # The stubborn handler still runs, ignoring cancellation: the command exits without it,
    # after the lifespan waited its 2 s (the bus's shutdown_timeout) and reported the event.
    assert exit_code == 1, log
    assert stopped_in < 2 + EXIT_GRACE + 4, log
    assert lines_with(log, "ERROR fastapi_eventbus: shutdown: 1 event(s)", stubborn)
    assert lines_with(log, "ERROR", "1 task(s) still running after the worker stopped")
    assert "worker stopped" in log


@pytest.mark.parametrize("stopped_by", ["sigterm", "a deleted queue"])
def test_a_worker_with_a_blocked_sync_handler_exits(
    moto: Moto, tmp_path: Path, stopped_by: str
) -> None:
    """SIGTERM with a sync handler blocking its thread: the message is given back, and the
    worker exits 1 without the thread. Found: the command waited for the handlers' threads
    only when stopped by a signal; stopped by an error a retry cannot fix (its queue
    deleted), it printed the error and then waited at exit for the blocked thread (an hour
    here, forever for some): a process that receives nothing, which no supervisor restarts."""
    # A 60 s visibility timeout: only the worker giving the message back makes it visible soon.
    queue_url = asyncio.run(create_queue(moto, "blocked", {"VisibilityTimeout": "60"}))
    options = [*sqs_options(moto, queue_url), "--shutdown-timeout", "1"]
    with worker_process(
        "tests.worker.stuck:blocking_app", *options, log=tmp_path / "w.log"
    ) as worker:
        (event_id,) = asyncio.run(forward(moto, queue_url, "order.blocks"))
        wait_for(lambda: f"started {event_id}" in worker.output(), what="the handler to block")
        stopping = time.monotonic()
        if stopped_by == "sigterm":
            exit_code = worker.terminate(timeout=30)
        else:
            asyncio.run(delete_queue(moto, queue_url))
            exit_code = worker.process.wait(timeout=60)
        stopped_in = time.monotonic() - stopping
    log = worker.output()
    assert exit_code == 1, log
    # shutdown_timeout, the exit grace, a margin (and a poll, to find the queue gone)
    assert stopped_in < 1 + EXIT_GRACE + (4 if stopped_by == "sigterm" else 10), log
    assert lines_with(log, "ERROR", "1 thread(s) still running after the worker stopped")
    if stopped_by != "sigterm":
        assert lines_with(log, "ERROR", "worker stopping")
        return
    (cancelled,) = lines_with(log, "cancelling 1 message(s); they go back for redelivery")
    assert f"(event 'order.blocks' id={event_id})" in cancelled
    assert "Error: 1 thread(s) still running" in log
    (message,) = asyncio.run(peek(moto, queue_url, wait=2))  # given back at once
    assert decode_message(message).id == event_id


async def delete_queue(moto: Moto, queue_url: str) -> None:
    async with moto.client() as sqs:
        await sqs.delete_queue(QueueUrl=queue_url)


def test_an_apps_logging_config_does_not_silence_the_worker(moto: Moto, tmp_path: Path) -> None:
    """``dictConfig`` disables loggers that exist and that it does not name: the worker's."""
    queue_url = asyncio.run(create_queue(moto, "logging"))
    options = sqs_options(moto, queue_url)
    with worker_process(
        "tests.worker.stuck:dict_config_app", *options, log=tmp_path / "w.log"
    ) as worker:
        assert worker.terminate() == 0, worker.output()
    log = worker.output()
    assert "WARNING [fastapi_eventbus] APP's logging configuration disabled" in log
    assert "INFO [fastapi_eventbus.worker] worker started" in log
    assert "INFO [fastapi_eventbus.worker] worker stopped" in log


def test_a_handler_blocking_the_event_loop_is_reported_and_sigterm_still_stops_the_worker(
    moto: Moto, tmp_path: Path
) -> None:
    """Found: an ``async def`` handler that blocks the event loop (``time.sleep``, CPU work)
    stopped its time limit, the heartbeat, receiving and the signal handlers: the worker
    hung with nothing logged, and SIGTERM did nothing; only SIGKILL ended it."""
    queue_url = asyncio.run(create_queue(moto, "loop-blocked", {"VisibilityTimeout": "60"}))
    options = [*sqs_options(moto, queue_url), "--shutdown-timeout", "1"]
    with worker_process(
        "tests.worker.stuck:loop_blocking_app", *options, log=tmp_path / "w.log"
    ) as worker:
        (event_id,) = asyncio.run(forward(moto, queue_url, "order.blocks"))
        wait_for(lambda: f"started {event_id}" in worker.output(), what="the handler to block")
        wait_for(
            lambda: "the event loop has not run for" in worker.output(),
            timeout=20,
            what="the ERROR about the blocked loop",
        )
        stopping = time.monotonic()
        exit_code = worker.terminate(timeout=30)
        stopped_in = time.monotonic() - stopping
    log = worker.output()
    (blocked,) = lines_with(log, "the event loop has not run for", "messages in flight")
    assert re.match(LINE_START + "ERROR fastapi_eventbus.worker: ", blocked)
    assert f"(event 'order.blocks' id={event_id})" in blocked
    assert exit_code == 1, log
    assert stopped_in < 1 + EXIT_GRACE + 4, log
    (exiting,) = lines_with(log, "ERROR", "exiting without waiting for it")
    assert f"id={event_id}" in exiting


def test_a_second_sigterm_still_gives_back_a_message_whose_handler_ignores_cancellation(
    moto: Moto, tmp_path: Path
) -> None:
    """Found: after a second SIGTERM, the worker abandoned such a message and started giving
    it back, but closed its source first: the give-back failed ("has not started"), and the
    message stayed invisible for the queue's whole visibility timeout (up to 12 hours)."""
    queue_url = asyncio.run(create_queue(moto, "stubborn", {"VisibilityTimeout": "120"}))
    options = [*sqs_options(moto, queue_url), "--shutdown-timeout", "1"]
    with worker_process("tests.worker.stuck:stubborn_app", *options, log=tmp_path / "w.log") as w:
        (event_id,) = asyncio.run(forward(moto, queue_url, "order.stubborn"))
        wait_for(lambda: f"started {event_id}" in w.output(), what="the handler to start")
        w.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        exit_code = w.terminate(timeout=30)  # the second signal: stop now
    log = w.output()
    assert exit_code == 1, log
    assert "could not give back" not in log
    (message,) = asyncio.run(peek(moto, queue_url, wait=2))  # given back before the exit
    assert decode_message(message).id == event_id


def test_a_slow_startup_is_not_blamed_on_a_handler(moto: Moto, tmp_path: Path) -> None:
    """Found: the event loop's watch started before the app's lifespan: a startup that
    blocked the loop for 6 s was reported at ERROR as a handler blocking it."""
    queue_url = asyncio.run(create_queue(moto, "slow-startup"))
    options = sqs_options(moto, queue_url)
    with worker_process(
        "tests.worker.stuck:slow_startup_app", *options, log=tmp_path / "w.log"
    ) as worker:
        assert worker.terminate() == 0, worker.output()
    assert "the event loop has not run" not in worker.output()
