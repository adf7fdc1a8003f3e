"""``fastapi-eventbus spool``: count, list, replay and purge the events of a spool file.

The commands take the path of a spool file (`fastapi_eventbus.spool.Spool`) and work
beside the running application, which may share the file: ``count``, ``list``
(``--json``: one JSON object per line), ``replay`` (dead-lettered events back in line,
sent by a running application within its ``resend_interval``) and ``purge`` (asks for
confirmation unless ``--yes``). They never create a spool: a missing file is a usage
error (exit code 2), and so is a file that is not a spool. What they print of an event
is escaped, so that a spooled name cannot forge lines or colours on a terminal.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from fastapi_eventbus._events import shown
from fastapi_eventbus.exceptions import ConfigurationError, EventBusError, SpoolError
from fastapi_eventbus.spool import Spool, SpooledEvent

_SPOOL_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
"""The ``PATH`` argument: an existing file (whether it is a spool, `_opened` checks)."""


@click.group(name="spool", short_help="Count, list, replay and purge a spool's events.")
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
    """The ``--forwarder NAME`` option, with the help *text* of the command using it."""
    return click.option("--forwarder", metavar="NAME", help=text)


def _ids_option(text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The repeatable ``--id EVENT_ID`` option, with the help *text* of its command."""
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
        click.echo(json_line(spooled) if as_json else text_line(spooled))


def _iso(timestamp: float) -> str:
    """*timestamp* (seconds since the epoch) in ISO 8601, UTC, with a ``Z``."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def text_line(spooled: SpooledEvent) -> str:
    """The line ``spool list`` prints for *spooled*: id, forwarder, name, attempts, when
    it was spooled (to the second) and its error, each `shown` safely."""
    event = spooled.event
    created = _iso(int(spooled.created))
    fields = (event.id, spooled.forwarder, event.name)
    line = "  ".join(map(shown, fields)) + f"  attempts={spooled.attempts}  {created}"
    if spooled.error:
        line += "  " + shown(" ".join(spooled.error.split()))  # one line per event
    return line


def confirm_purge(asked: list[str], prompt: str) -> tuple[str, ...] | None:
    """Ask *prompt* about purging the events *asked* (their ids); the ids to delete: those
    asked about, not what came meanwhile. None (and "purged 0") if there is none."""
    if not asked:
        click.echo("purged 0 event(s)")
        return None
    click.confirm(prompt, abort=True)
    return tuple(dict.fromkeys(asked))


def json_line(spooled: SpooledEvent) -> str:
    """The JSON object ``spool list --json`` prints for *spooled*, on one line."""
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
    (Spool(resend_interval=...), 1 s by default); otherwise the next one to start does.
    An event pending again for the same forwarder, and a row that cannot be read as an
    event, stay dead-lettered: each is listed with why, and the exit code is 1."""
    left: list[SpooledEvent] = []
    with _opened(path) as spool:
        moved = spool.replay(forwarder=forwarder, ids=ids or None, left=left)
    click.echo(f"replayed {moved} event(s)")
    for spooled in left:
        click.echo(text_line(spooled), err=True)
    if left:
        raise click.ClickException(f"{len(left)} event(s) stay dead-lettered (listed above)")


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
    yet: purged, they are never sent, except those a running application is sending at
    that moment, which it cannot be told to stop: a WARNING says how many it holds (stop
    it first to be sure)."""
    if dead == pending:
        raise click.UsageError("pass exactly one of --dead and --pending")
    with _opened(path) as spool:
        if not yes:
            listed = spool.dead(forwarder, ids=ids or None) if dead else spool.pending(forwarder)
            asked = [s.event.id for s in listed if not ids or s.event.id in ids]
            if dead:
                prompt = f"Delete {len(asked)} dead-lettered event(s) from {path} for good?"
            else:
                prompt = (
                    f"{len(asked)} pending event(s) in {path} have not been delivered yet: "
                    "delete them, so that they are never sent?"
                )
            if (confirmed := confirm_purge(asked, prompt)) is None:
                return
            ids = confirmed
        held = 0 if dead else spool.held(forwarder, ids or None)
        deleted = spool.purge(dead=dead, forwarder=forwarder, ids=ids or None)
    click.echo(f"purged {deleted} event(s)")
    if held := min(held, deleted):
        click.echo(
            f"WARNING: {held} of them were held by a running process, which may be sending "
            "them now: those may still be delivered. Stop it before a purge to be sure.",
            err=True,
        )
