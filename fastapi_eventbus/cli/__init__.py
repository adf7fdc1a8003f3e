"""The ``fastapi-eventbus`` command line: run a worker, list what a bus will run, and
look after a spool and an outbox.

```text
fastapi-eventbus worker myapp.main:app --sqs https://sqs.eu-west-1.amazonaws.com/123/orders
fastapi-eventbus worker myapp.main:app --pubsub projects/my-project/subscriptions/orders
fastapi-eventbus handlers myapp.main:app
fastapi-eventbus spool count /var/lib/myapp/events.sqlite3
fastapi-eventbus spool list /var/lib/myapp/events.sqlite3 --dead --json
fastapi-eventbus spool replay /var/lib/myapp/events.sqlite3 --id EVENT_ID
fastapi-eventbus spool purge /var/lib/myapp/events.sqlite3 --dead --forwarder orders
fastapi-eventbus outbox count postgresql+asyncpg://app:secret@db/shop
fastapi-eventbus outbox list sqlite:///shop.db --dead --json
fastapi-eventbus outbox replay postgresql+asyncpg://app:secret@db/shop --id EVENT_ID
fastapi-eventbus outbox purge postgresql+asyncpg://app:secret@db/shop --dead --yes
```

``APP`` is an import string like uvicorn's, ``module:attribute``, naming a
FastAPI app with an installed bus (or an `EventBus`); the current directory is
on ``sys.path``. Click is imported by this package only.

The ``spool`` commands take the path of a spool file (`fastapi_eventbus.spool.Spool`)
and work beside the running application, which may share the file: ``count``,
``list`` (``--json``: one JSON object per line), ``replay`` (dead-lettered events
back in line, sent by a running application within its ``resend_interval``) and
``purge`` (asks for confirmation unless ``--yes``). They never create a spool: a
missing file is a usage error (exit code 2), and so is a file that is not a spool.

The ``outbox`` commands do the same for the rows of a
`fastapi_eventbus.outbox.SQLAlchemyOutbox`, given the SQLAlchemy URL of its database
(whose password they never print) and ``--table-prefix``; ``purge`` deletes only
dead-lettered rows. They never create tables: a database without the outbox's is a
usage error (exit code 2). They import SQLAlchemy when they run, so the rest of the
command line works without the ``sqlalchemy`` extra.

This module holds the ``main`` group and the ``handlers`` command; ``worker`` (and
what keeps its process clean) lives in `cli._worker`, the ``spool`` group in
`cli._spool`, the ``outbox`` group in `cli._outbox`, and loading ``APP`` in `cli._app`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import click

from fastapi_eventbus._bus import EventBus, registered_forwarders, registered_handlers
from fastapi_eventbus._di import Handler
from fastapi_eventbus.forwarders._base import Forwarder

from . import _app
from ._outbox import outbox_group
from ._spool import count, list_events, purge, replay, spool_group
from ._worker import worker

__all__ = [
    "count",
    "handlers",
    "list_events",
    "main",
    "outbox_group",
    "purge",
    "replay",
    "spool_group",
    "worker",
]


@click.group(name="fastapi-eventbus", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fastapi-eventbus-di", prog_name="fastapi-eventbus")
def main() -> None:
    """Run workers for fastapi-eventbus, list what a bus will run, and look after a spool
    and an outbox."""


# -- fastapi-eventbus handlers ------------------------------------------------------------


@main.command(short_help="List the handlers and forwarders of APP's bus.")
@_app.app_options
def handlers(app: str, factory: bool, app_dir: str) -> None:
    """List each event pattern of APP's bus, its handlers and their dependencies, and the
    forwarders with their patterns."""
    bus = _app.bus_of(_app.load(app, factory=factory, app_dir=app_dir))
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
    """Each pattern of *entries* (patterns, item), in the order first seen, followed by the
    *lines* of every item registered for it; ``(none)`` if there is no entry."""
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
    """A handler's line (sync or async, time limit, retries), then one per dependency."""
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
    """A forwarder's line: its repr, which names its destination."""
    yield f"    {forwarder!r}"


main.add_command(worker)
main.add_command(spool_group)
main.add_command(outbox_group)
