"""``fastapi-eventbus worker``: run APP's handlers on what a source receives, in a process
that stops cleanly.

The command builds an `SQSSource` or a `PubSubSource` and a `Worker` from its options and
runs it under ``asyncio.run``. The rest is process hygiene: the first SIGTERM or SIGINT
stops the worker gracefully and a second one at once; the library's loggers are enabled
again if APP's logging configuration disabled them; and a handler that ignores its time
limit (a task that swallows cancellation, a thread that does not return) is reported and
left behind after `_EXIT_GRACE` seconds, with exit status 1, instead of keeping the
process alive forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

import click
from click.core import ParameterSource

from fastapi_eventbus._deadline import cancel_the_rest
from fastapi_eventbus._hooks import LOG_FORMAT, ensure_readable_logs
from fastapi_eventbus.exceptions import ConfigurationError, EventBusError
from fastapi_eventbus.worker import Backoff, PubSubSource, Source, SQSSource, Worker

from ._app import app_options, bus_of, load

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
"""The choices of ``--log-level``, most severe first."""
_EXIT_GRACE = 3.0
"""Seconds the worker command waits, once the worker has stopped, for the tasks and threads
it leaves (handlers that ignore their time limit) before it exits without them."""
_BLOCKED_AFTER = 5.0
"""Seconds the event loop may go without running before `_LoopWatch` says so at ERROR."""


@click.command(short_help="Consume SQS or Pub/Sub and run APP's handlers.")
@app_options
@click.option("--sqs", "queue_url", metavar="QUEUE_URL", help="Receive from this SQS queue.")
@click.option("--endpoint-url", metavar="URL", help="SQS endpoint (LocalStack, moto).")
@click.option("--region", metavar="REGION", help="AWS region (default: botocore's).")
@click.option(
    "--wait-time",
    type=click.IntRange(0, 20),
    default=20,
    show_default=True,
    help="SQS long polling: seconds one receive call waits for messages.",
)
@click.option(
    "--retry-delay",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="SQS: visibility timeout after a first failure; doubles with each delivery.",
)
@click.option(
    "--max-retry-delay",
    type=click.FloatRange(min=0),
    default=900.0,
    show_default=True,
    help="SQS: the longest visibility timeout after a failure.",
)
@click.option(
    "--visibility-timeout",
    type=click.IntRange(1, 43_200),
    metavar="SECONDS",
    help="SQS: receive with this visibility timeout, extended while handlers run.",
)
@click.option(
    "--pubsub",
    "subscription",
    metavar="SUBSCRIPTION",
    help="Pull from this Pub/Sub subscription: projects/PROJECT/subscriptions/NAME.",
)
@click.option(
    "--emulator-host",
    metavar="HOST:PORT",
    help="Pub/Sub emulator (default: $PUBSUB_EMULATOR_HOST).",
)
@click.option(
    "--ack-deadline",
    type=click.IntRange(10, 600),
    metavar="SECONDS",
    help="Pub/Sub: give pulled messages this ack deadline, extended while handlers run.",
)
@click.option(
    "--ordered/--unordered",
    "ordered",
    default=None,
    help="Pub/Sub: whether the subscription orders messages (a key's messages are then "
    "handled in order); default: read from the subscription.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Messages handled at once.",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds to finish in-flight messages after SIGTERM/SIGINT.",
)
@click.option(
    "--on-undecodable",
    type=click.Choice(["retry", "delete"]),
    default="retry",
    show_default=True,
    help="A message that is not an event: give it back (to reach the DLQ), or delete it.",
)
@click.option(
    "--on-unhandled",
    type=click.Choice(["retry", "delete"]),
    default="retry",
    show_default=True,
    help="An event no handler of APP matches: give it back (to reach the DLQ), or delete it.",
)
@click.option(
    "--max-message-bytes",
    type=click.IntRange(min=1),
    default=10_000_000,
    show_default=True,
    help="Larger messages (body plus attributes) are not decoded: see --on-undecodable.",
)
@click.option(
    "--log-level",
    type=click.Choice(_LOG_LEVELS),
    default="info",
    show_default=True,
    help="The least level logged (to stderr, each line with time, level and logger).",
)
def worker(
    app: str,
    factory: bool,
    app_dir: str,
    queue_url: str | None,
    endpoint_url: str | None,
    region: str | None,
    wait_time: int,
    retry_delay: float,
    max_retry_delay: float,
    visibility_timeout: int | None,
    subscription: str | None,
    emulator_host: str | None,
    ack_deadline: int | None,
    ordered: bool | None,
    concurrency: int,
    shutdown_timeout: float,
    on_undecodable: str,
    on_unhandled: str,
    max_message_bytes: int,
    log_level: str,
) -> None:
    """Receive the events forwarded to an SQS queue (--sqs) or a Pub/Sub subscription
    (--pubsub) and run APP's handlers on them. SIGTERM or SIGINT stops receiving,
    finishes the messages in flight (up to --shutdown-timeout), gives back the rest and
    exits 0; if a handler still runs a few seconds later (it ignores cancellation, or
    blocks its thread), it is reported and left behind, and the exit status is 1."""
    if (queue_url is None) == (subscription is None):
        raise click.UsageError("pass exactly one of --sqs QUEUE_URL and --pubsub SUBSCRIPTION")
    _refuse_the_other_brokers_options("--sqs" if queue_url is not None else "--pubsub")
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)  # time, level, logger
    target = load(app, factory=factory, app_dir=app_dir)
    bus_of(target)
    ensure_readable_logs("APP")
    threads = set(threading.enumerate())
    try:  # what the options make: a bad value is a usage error (exit 2)
        source: Source
        if queue_url is not None:
            backoff = Backoff(initial=retry_delay, maximum=max_retry_delay)
            source = SQSSource(
                queue_url,
                endpoint_url=endpoint_url,
                region_name=region,
                wait_time_seconds=wait_time,
                visibility_backoff=backoff,
                visibility_timeout=visibility_timeout,
            )
        else:
            assert subscription is not None
            source = PubSubSource(
                subscription,
                emulator_host=emulator_host,
                ack_deadline=ack_deadline,
                ordered=ordered,
            )
        runner = Worker(
            target,
            source,
            concurrency=concurrency,
            shutdown_timeout=shutdown_timeout,
            on_undecodable="delete" if on_undecodable == "delete" else "retry",
            on_unhandled="delete" if on_unhandled == "delete" else "retry",
            max_message_bytes=max_message_bytes,
        )
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        finished = asyncio.run(_serve(runner))
    except EventBusError as exc:
        raise click.ClickException(str(exc)) from exc  # (the worker logged it)
    finally:  # stopped by an error too: the interpreter's exit would wait for the threads
        _leave_no_thread_behind(threads)
    if not finished:
        raise click.ClickException(
            "stopped by a second signal; unfinished messages were given back"
        )


_BROKER_OPTIONS = {
    "--sqs": (
        "endpoint_url",
        "region",
        "wait_time",
        "retry_delay",
        "max_retry_delay",
        "visibility_timeout",
    ),
    "--pubsub": ("emulator_host", "ack_deadline", "ordered"),
}
"""The options that apply to one broker's source only, by the option that chooses it."""


def _refuse_the_other_brokers_options(chosen: str) -> None:
    """A usage error for an option given on the command line that the other broker's source
    takes (``--ack-deadline`` with ``--sqs``): it would be ignored without a word."""
    context = click.get_current_context()
    for broker, names in _BROKER_OPTIONS.items():
        for param in context.command.params:
            if (
                broker != chosen
                and param.name in names
                and context.get_parameter_source(param.name) is ParameterSource.COMMANDLINE
            ):
                raise click.UsageError(f"{param.opts[0]} applies to {broker} only, not {chosen}")


async def _serve(runner: Worker) -> bool:
    """Run *runner*; the first SIGTERM/SIGINT stops it gracefully, a second one at once.

    Returns whether it stopped gracefully.
    """
    task = asyncio.current_task()
    assert task is not None
    stopping: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        if stopping:
            logging.getLogger("fastapi_eventbus.worker").warning("second signal: stopping now")
            task.cancel()
            return
        logging.getLogger("fastapi_eventbus.worker").info(
            "%s: stopping (finishing in-flight messages)", signal.Signals(signum).name
        )
        stopping.append(asyncio.create_task(runner.stop()))

    loop = asyncio.get_running_loop()
    loop.set_default_executor(_UnjoinedExecutor())
    watch = _LoopWatch(loop, runner)
    restore = _on_signals(on_signal, watch)
    watch.start()
    try:
        await runner.run()
    except asyncio.CancelledError:
        if not stopping:
            raise
        return False
    finally:
        restore()
        await _leave_no_task_behind()
        watch.done.set()
    return True


class _LoopWatch(threading.Thread):
    """Watches from a thread that the worker's event loop runs. A handler that blocks it
    (``time.sleep`` or CPU work in an ``async def``) stops every time limit, the heartbeat,
    receiving and the signals' handling: past `_BLOCKED_AFTER` seconds, an ERROR names the
    messages in flight; once a stop signal came and the loop has not run for
    ``shutdown_timeout`` plus `_EXIT_GRACE` seconds, the process exits (status 1) without it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, runner: Worker) -> None:
        super().__init__(name="fastapi-eventbus-loop-watch", daemon=True)
        self.loop, self.runner = loop, runner
        self.done = threading.Event()
        self.beat = time.monotonic()
        self.signalled: float | None = None
        """When the first stop signal came (set by the signal handler, which Python runs
        in the main thread even while the loop is blocked)."""

    def _beat(self) -> None:
        self.beat = time.monotonic()

    def run(self) -> None:
        logger, reported = logging.getLogger("fastapi_eventbus.worker"), False
        while not self.done.wait(0.5):
            try:
                self.loop.call_soon_threadsafe(self._beat)
            except RuntimeError:  # the loop is closed
                return
            # The worker's state is read only while the loop is stuck: nothing changes it then.
            now = time.monotonic()
            if now - self.beat < _BLOCKED_AFTER:
                reported = False
            elif not reported and (held := self.runner.in_flight()):  # not startup: a handler
                reported = True
                logger.error(
                    "the event loop has not run for %.0fs: a handler blocks it (time.sleep, "
                    "or CPU work, in an async def?), and no time limit, heartbeat or signal "
                    "can act meanwhile; messages in flight: %s",
                    now - self.beat,
                    "; ".join(held),
                )
            if self.signalled is not None:
                stuck = now - max(self.beat, self.signalled)
                if stuck > self.runner.shutdown_timeout + _EXIT_GRACE:
                    listed = "; ".join(self.runner.in_flight()) or "none"
                    _exit_now(
                        f"stopping, but the event loop has not run for {stuck:.0f}s (a "
                        "handler blocks it): exiting without waiting for it; in flight, to "
                        f"come again when their visibility timeout ends: {listed}"
                    )


class _UnjoinedExecutor(ThreadPoolExecutor):
    """The event loop's default executor (``asyncio.to_thread``): ``asyncio.run`` does not wait
    for its threads at exit; `_leave_no_thread_behind` reports those still running."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=cancel_futures)


async def _leave_no_task_behind() -> None:
    """Cancel the tasks left when the worker has stopped; exit at once if some ignore that,
    rather than wait for them forever (as ``asyncio.run`` would)."""
    running = await cancel_the_rest(_EXIT_GRACE)
    if running:
        _exit_now(
            f"{len(running)} task(s) still running after the worker stopped, ignoring "
            "cancellation (a handler that catches asyncio.CancelledError): exiting "
            "without them"
        )


def _leave_no_thread_behind(before: set[threading.Thread]) -> None:
    """Exit at once if threads started since *before* still run (a sync handler that does not
    return), rather than wait for them forever (as the interpreter would at exit)."""
    deadline = time.monotonic() + _EXIT_GRACE
    running = 0
    for thread in threading.enumerate():
        if thread in before or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        running += thread.is_alive()
    if running:
        _exit_now(
            f"{running} thread(s) still running after the worker stopped (a sync handler "
            "or dependency that has not returned): exiting without them"
        )


def _exit_now(message: str) -> NoReturn:
    """Log *message* at ERROR and exit with status 1 now, without waiting for anything."""
    logging.getLogger("fastapi_eventbus.worker").error("%s", message)
    click.echo(f"Error: {message}", err=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _on_signals(callback: Callable[[int], None], watch: _LoopWatch) -> Callable[[], None]:
    """Call *callback* on the event loop for SIGTERM and SIGINT; returns what undoes it.

    A plain signal handler, not the loop's (``add_signal_handler``): Python runs it in the
    main thread even while a handler blocks the loop, so *watch* learns of the signal."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.getsignal(signum) for signum in signals}

    def on_signal(number: int, _: object) -> None:
        watch.signalled = watch.signalled or time.monotonic()
        loop.call_soon_threadsafe(callback, number)

    for signum in signals:
        signal.signal(signum, on_signal)

    def restore() -> None:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)

    return restore
