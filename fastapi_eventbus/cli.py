"""The ``fastapi-eventbus`` command line: run a worker, list what a bus will run, and
look after a spool.

```text
fastapi-eventbus worker myapp.main:app --sqs https://sqs.eu-west-1.amazonaws.com/123/orders
fastapi-eventbus worker myapp.main:app --pubsub projects/my-project/subscriptions/orders
fastapi-eventbus handlers myapp.main:app
fastapi-eventbus spool count /var/lib/myapp/events.sqlite3
fastapi-eventbus spool list /var/lib/myapp/events.sqlite3 --dead --json
fastapi-eventbus spool replay /var/lib/myapp/events.sqlite3 --id EVENT_ID
fastapi-eventbus spool purge /var/lib/myapp/events.sqlite3 --dead --forwarder orders
```

``APP`` is an import string like uvicorn's, ``module:attribute``, naming a
FastAPI app with an installed bus (or an `EventBus`); the current directory is
on ``sys.path``. Click is imported by this module only.

The ``spool`` commands take the path of a spool file (`fastapi_eventbus.spool.Spool`)
and work beside the running application, which may share the file: ``count``,
``list`` (``--json``: one JSON object per line), ``replay`` (dead-lettered events
back in line, sent by a running application within its ``resend_interval``) and
``purge`` (asks for confirmation unless ``--yes``). They never create a spool: a
missing file is a usage error (exit code 2), and so is a file that is not a spool.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from ._bus import EventBus, registered_forwarders, registered_handlers
from ._core import Handler
from ._hooks import LOG_FORMAT
from .exceptions import BusNotInstalledError, ConfigurationError, EventBusError, SpoolError
from .forwarders._base import Forwarder
from .spool import Spool, SpooledEvent
from .worker import Backoff, PubSubSource, Source, SQSSource, Worker

__all__ = [
    "count",
    "handlers",
    "list_events",
    "main",
    "purge",
    "replay",
    "spool_group",
    "worker",
]

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@click.group(name="fastapi-eventbus", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fastapi-eventbus", prog_name="fastapi-eventbus")
def main() -> None:
    """Run workers for fastapi-eventbus, list what a bus will run, and look after a spool."""


# -- loading the app ------------------------------------------------------------------


def _load(target: str, *, factory: bool = False, app_dir: str = ".") -> Any:
    """Import ``module:attribute`` (the attribute may be dotted), like uvicorn does.

    With *factory*, the attribute is called without arguments and its result
    is used. *app_dir* is put first on ``sys.path``. Whatever keeps APP from
    loading is a usage error (exit code 2); when the module's own code or the
    factory raised, its traceback is printed first.
    """
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(
            f"{target!r} is not of the form 'module:attribute'", param_hint="APP"
        )
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    try:
        value: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            _not_loaded(f"importing module {module_name!r} failed", exc)  # a missing import
        raise click.BadParameter(
            f"could not import module {module_name!r}", param_hint="APP"
        ) from exc
    except Exception as exc:
        _not_loaded(f"importing module {module_name!r} failed", exc)
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError as exc:
            message = f"module {module_name!r} has no attribute {attribute!r}"
            raise click.BadParameter(message, param_hint="APP") from exc
    if not factory:
        if inspect.isroutine(value) or inspect.isclass(value):
            kind = "a class" if inspect.isclass(value) else "a function"
            message = f"APP is {kind} ({target}): pass --factory if it builds the app"
            raise click.BadParameter(message, param_hint="APP")
        return value
    if not callable(value):
        raise click.BadParameter(f"--factory: {value!r} is not callable", param_hint="APP")
    try:
        return value()
    except Exception as exc:
        _not_loaded(f"the factory {target} failed", exc)


def _not_loaded(what: str, exc: Exception) -> NoReturn:
    """Print *exc*'s traceback, then fail as a usage error (exit code 2) that says *what*."""
    click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
    message = f"{what}: {type(exc).__name__}: {exc} (traceback above)"
    raise click.BadParameter(message, param_hint="APP") from exc


def _bus_of(target: Any) -> EventBus:
    """The `EventBus` of an app (installed with ``bus.install(app)``), or *target* itself."""
    if isinstance(target, EventBus):
        return target
    try:
        return EventBus.of(target)
    except BusNotInstalledError:
        raise click.BadParameter(
            f"{target!r} is neither an EventBus nor an app with one installed (bus.install(app))",
            param_hint="APP",
        ) from None


def _app_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--app-dir",
        metavar="DIR",
        default=".",
        show_default=True,
        help="Directory put first on sys.path to import APP from.",
    )(func)
    func = click.option(
        "--factory", is_flag=True, help="APP is a function returning the app: call it."
    )(func)
    return click.argument("app")(func)


# -- fastapi-eventbus handlers ------------------------------------------------------------


@main.command(short_help="List the handlers and forwarders of APP's bus.")
@_app_options
def handlers(app: str, factory: bool, app_dir: str) -> None:
    """List each event pattern of APP's bus, its handlers and their dependencies, and the
    forwarders with their patterns."""
    bus = _bus_of(_load(app, factory=factory, app_dir=app_dir))
    for line in _describe(bus):
        click.echo(line)


def _describe(bus: EventBus) -> Iterator[str]:
    """The lines ``fastapi-eventbus handlers`` prints for *bus*."""
    yield "Handlers"
    yield from _by_pattern(
        [(handler.patterns, handler) for handler in registered_handlers(bus)], _handler_lines
    )
    yield ""
    yield "Forwarders"
    yield from _by_pattern(registered_forwarders(bus), _forwarder_lines)


def _by_pattern(
    entries: list[tuple[tuple[str, ...], Any]], lines: Callable[[Any], Iterator[str]]
) -> Iterator[str]:
    grouped: dict[str, list[Any]] = {}
    for patterns, item in entries:
        for pattern in patterns:
            grouped.setdefault(pattern, []).append(item)
    if not grouped:
        yield "  (none)"
    for pattern, items in grouped.items():
        yield f"  {pattern}"
        for item in items:
            yield from lines(item)


def _handler_lines(handler: Handler) -> Iterator[str]:
    kind = "async" if handler.plan.is_async else "sync, in the threadpool"
    limit = "no time limit" if handler.timeout is None else f"timeout {handler.timeout:g}s"
    retry = handler.retry
    if retry is None:
        tries = ""
    elif retry.attempts is None:
        tries = f", retried for up to {retry.total_timeout:g}s"
    else:
        tries = f", up to {retry.attempts} tries"
    yield f"    {handler.name}  ({kind}, {limit}{tries})"
    for dependency in handler.plan.describe_dependencies():
        yield f"      depends on {dependency}"


def _forwarder_lines(forwarder: Forwarder) -> Iterator[str]:
    yield f"    {forwarder!r}"


# -- fastapi-eventbus worker ----------------------------------------------------------------


_EXIT_GRACE = 3.0
"""Seconds the worker command waits, once the worker has stopped, for the tasks and threads
it leaves (handlers that ignore their time limit) before it exits without them."""


@main.command(short_help="Consume SQS or Pub/Sub and run APP's handlers.")
@_app_options
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
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)  # time, level, logger
    target = _load(app, factory=factory, app_dir=app_dir)
    _bus_of(target)
    _enable_library_loggers()
    threads = set(threading.enumerate())
    try:
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
                subscription, emulator_host=emulator_host, ack_deadline=ack_deadline
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
        finished = asyncio.run(_serve(runner))
    except EventBusError as exc:
        raise click.ClickException(str(exc)) from exc
    _leave_no_thread_behind(threads)
    if not finished:
        raise click.ClickException(
            "stopped by a second signal; unfinished messages were given back"
        )


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

    asyncio.get_running_loop().set_default_executor(_UnjoinedExecutor())
    restore = _on_signals(on_signal)
    try:
        await runner.run()
    except asyncio.CancelledError:
        if not stopping:
            raise
        return False
    finally:
        restore()
        await _leave_no_task_behind()
    return True


def _enable_library_loggers() -> None:
    """Enable this library's loggers again if APP's logging configuration disabled them.

    ``logging.config.dictConfig`` disables every existing logger that its
    configuration does not name, unless ``disable_existing_loggers`` is false; APP
    is imported after this package, so that would silence the worker's reports.
    """
    disabled = sorted(
        name
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
        and logger.disabled
        and (name == "fastapi_eventbus" or name.startswith("fastapi_eventbus."))
    )
    for name in disabled:
        logging.getLogger(name).disabled = False
    if disabled:
        logging.getLogger("fastapi_eventbus.worker").warning(
            "APP's logging configuration disabled %s (disable_existing_loggers); "
            "enabled again: the worker reports through them",
            ", ".join(disabled),
        )


class _UnjoinedExecutor(ThreadPoolExecutor):
    """The event loop's default executor (``asyncio.to_thread``): ``asyncio.run`` does not wait
    for its threads at exit; `_leave_no_thread_behind` reports those still running."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=cancel_futures)


async def _leave_no_task_behind() -> None:
    """Cancel the tasks left when the worker has stopped; exit at once if some ignore that,
    rather than wait for them forever (as ``asyncio.run`` would)."""
    current = asyncio.current_task()
    tasks = {task for task in asyncio.all_tasks() if task is not current}
    for task in tasks:
        task.cancel()
    if tasks:
        _, running = await asyncio.wait(tasks, timeout=_EXIT_GRACE)
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


def _on_signals(callback: Callable[[int], None]) -> Callable[[], None]:
    """Call *callback* on the event loop for SIGTERM and SIGINT; returns what undoes it."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.getsignal(signum) for signum in signals}
    try:
        for signum in signals:
            loop.add_signal_handler(signum, callback, signum)
    except NotImplementedError:  # Windows: no event-loop signal handlers
        for signum in signals:
            signal.signal(signum, lambda number, _: loop.call_soon_threadsafe(callback, number))

    def restore() -> None:
        for signum, handler in previous.items():
            with suppress(NotImplementedError):
                loop.remove_signal_handler(signum)
            if handler is not None:
                signal.signal(signum, handler)

    return restore


# -- fastapi-eventbus spool ---------------------------------------------------------------

_SPOOL_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@main.group(name="spool", short_help="Count, list, replay and purge a spool's events.")
def spool_group() -> None:
    """Count, list, replay and purge the events of a spool file (EventBus(spool=PATH)):
    pending ones, waiting for their broker, and dead-lettered ones. The application
    may be running and share the file meanwhile. A PATH that does not exist or is
    not a spool is an error (exit code 2): these commands never create a spool."""


@contextmanager
def _opened(path: Path) -> Iterator[Spool]:
    """The spool at *path*, which must exist and be one; its errors as click errors."""
    _check_spool_file(path)
    try:
        spool = Spool(path)
    except EventBusError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        yield spool
    except EventBusError as exc:  # SpoolError, also for a row that is not an Event
        raise click.ClickException(str(exc)) from exc
    finally:
        spool.close()


def _check_spool_file(path: Path) -> None:
    """Raise a usage error unless *path* is a spool, before `Spool` touches it."""
    try:
        Spool.check_file(path)
    except ConfigurationError as exc:  # not a spool: a usage error (exit code 2)
        raise click.BadParameter(str(exc), param_hint="PATH") from exc
    except SpoolError as exc:  # locked, unreadable: a spool, maybe
        raise click.ClickException(str(exc)) from exc


def _forwarder_option(text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--forwarder", metavar="NAME", help=text)


def _ids_option(text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--id", "ids", metavar="EVENT_ID", multiple=True, help=text)


@spool_group.command(short_help="Print how many events are pending and dead-lettered.")
@click.argument("path", type=_SPOOL_FILE)
@click.option("--json", "as_json", is_flag=True, help='Print {"pending": N, "dead": N}.')
def count(path: Path, as_json: bool) -> None:
    """Print how many events of the spool at PATH are pending (waiting for their broker,
    or being sent) and dead-lettered."""
    with _opened(path) as spool:
        counts = spool.count()
    if as_json:
        click.echo(json.dumps({"pending": counts.pending, "dead": counts.dead}))
    else:
        click.echo(f"pending {counts.pending}\ndead {counts.dead}")


@spool_group.command(name="list", short_help="List pending (or dead-lettered) events.")
@click.argument("path", type=_SPOOL_FILE)
@click.option("--dead", is_flag=True, help="List the dead-lettered events instead.")
@_forwarder_option("Only the events of this forwarder.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="At most N events.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object per line: event, forwarder, attempts, created, error, readable.",
)
def list_events(
    path: Path, dead: bool, forwarder: str | None, limit: int | None, as_json: bool
) -> None:
    """List the pending events of the spool at PATH, or with --dead the dead-lettered
    ones, oldest first: one line per event with its id, forwarder, name, failed
    attempts, when it was spooled (UTC) and its last error (pending) or why it was
    dead-lettered (dead). Characters that are not printable (newlines, escape
    sequences) and backslashes are shown as Python escapes. A row that is not an
    event (damaged) is listed too, with what can be read of it and why."""
    with _opened(path) as spool:
        if dead:
            events = spool.dead(forwarder=forwarder, limit=limit)
        else:
            events = spool.pending(forwarder=forwarder, limit=limit)
    for spooled in events:
        click.echo(_json_line(spooled) if as_json else _text_line(spooled))


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _text_line(spooled: SpooledEvent) -> str:
    event = spooled.event
    created = _iso(int(spooled.created))
    fields = (event.id, spooled.forwarder, event.name)
    line = "  ".join(map(_shown, fields)) + f"  attempts={spooled.attempts}  {created}"
    if spooled.error:
        line += "  " + _shown(" ".join(spooled.error.split()))  # one line per event
    return line


def _shown(text: str) -> str:
    """*text* safe to print on a terminal: what is not printable (newlines, ESC and the
    other C0 and C1 controls, line separators, bidi controls) and backslashes are
    written as Python escapes, so a spooled name cannot forge rows or colours."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(
        c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def _json_line(spooled: SpooledEvent) -> str:
    return json.dumps(
        {
            "event": spooled.event.model_dump(mode="json"),
            "forwarder": spooled.forwarder,
            "attempts": spooled.attempts,
            "created": _iso(spooled.created),
            "error": spooled.error,
            "readable": spooled.readable,
        }
    )


@spool_group.command(short_help="Put dead-lettered events back in line to be sent.")
@click.argument("path", type=_SPOOL_FILE)
@_forwarder_option("Only the events of this forwarder.")
@_ids_option("Only this event (repeat for several). Default: every dead-lettered event.")
def replay(path: Path, forwarder: str | None, ids: tuple[str, ...]) -> None:
    """Move the dead-lettered events of the spool at PATH (all, or those chosen with
    --forwarder and --id) back to the pending ones, with their attempts reset, and
    print how many. A running application sends them within its resend interval
    (Spool(resend_interval=...), 1 s by default); otherwise the next one to start does."""
    with _opened(path) as spool:
        moved = spool.replay(forwarder=forwarder, ids=ids or None)
    click.echo(f"replayed {moved} event(s)")


@spool_group.command(short_help="Delete dead-lettered (or pending) events for good.")
@click.argument("path", type=_SPOOL_FILE)
@click.option("--dead", is_flag=True, help="Delete dead-lettered events.")
@click.option("--pending", is_flag=True, help="Delete pending events: they will never be sent.")
@_forwarder_option("Only the events of this forwarder.")
@_ids_option("Only this event (repeat for several). Default: every event of the kind.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def purge(
    path: Path,
    dead: bool,
    pending: bool,
    forwarder: str | None,
    ids: tuple[str, ...],
    yes: bool,
) -> None:
    """Delete events of the spool at PATH for good: the dead-lettered ones (--dead) or the
    pending ones (--pending), all or those chosen with --forwarder and --id; print how
    many. Asks for confirmation unless --yes. Pending events have not been delivered
    yet: purged, they are never sent."""
    if dead == pending:
        raise click.UsageError("pass exactly one of --dead and --pending")
    with _opened(path) as spool:
        if not yes:
            if dead:
                matching = len(spool.dead(forwarder=forwarder, ids=ids or None))
                prompt = f"Delete {matching} dead-lettered event(s) from {path} for good?"
            else:
                matching = sum(
                    1
                    for spooled in spool.pending(forwarder=forwarder)
                    if not ids or spooled.event.id in ids
                )
                prompt = (
                    f"{matching} pending event(s) in {path} have not been delivered yet: "
                    "delete them, so that they are never sent?"
                )
            if matching == 0:
                click.echo("purged 0 event(s)")
                return
            click.confirm(prompt, abort=True)
        deleted = spool.purge(dead=dead, forwarder=forwarder, ids=ids or None)
    click.echo(f"purged {deleted} event(s)")
