"""The outbox's and the inbox's tables, in a `MetaData` the application can hand to Alembic."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Column, Float, Index, Integer, MetaData, String, Table, Text

from fastapi_eventbus.exceptions import ConfigurationError, InvalidEventError

ID_LENGTH = 64
"""Room for an event id: this library's are 32 characters; other producers' may be longer."""

TEXT_LENGTH = 255
"""Room for an event's name, a destination (a forwarder's name) and a handler's name."""


@dataclass(frozen=True)
class OutboxTables:
    """The tables of one `SQLAlchemyOutbox`: events waiting, and events given up on."""

    metadata: MetaData
    events: Table
    """One row per (event, destination): ``""`` for the local handlers, or a forwarder's name."""
    dead: Table
    """Rows whose attempts ran out, with the last error; `SQLAlchemyOutbox.replay` brings
    them back."""


def outbox_tables(metadata: MetaData, prefix: str) -> OutboxTables:
    """Define the outbox's tables in *metadata*, their names starting with *prefix* (or
    find them there: another outbox, or a model module imported twice, defined them)."""
    if (existing := metadata.tables.get(f"{prefix}outbox")) is not None:
        return OutboxTables(metadata, existing, metadata.tables[f"{prefix}outbox_dead"])
    columns = (
        lambda: Column("event_id", String(ID_LENGTH), primary_key=True),
        lambda: Column("destination", String(TEXT_LENGTH), primary_key=True),
        lambda: Column("name", String(TEXT_LENGTH), nullable=False),
        lambda: Column("body", Text, nullable=False),
        lambda: Column("created", Float, nullable=False),
        lambda: Column("attempts", Integer, nullable=False, default=0),
        lambda: Column("error", Text, nullable=True),
    )
    events = Table(
        f"{prefix}outbox",
        metadata,
        *(make() for make in columns),
        Column("due", Float, nullable=False),
        Column("owner", String(ID_LENGTH), nullable=True),
    )
    Index(f"{prefix}outbox_due", events.c.due)
    dead = Table(
        f"{prefix}outbox_dead",
        metadata,
        *(make() for make in columns),
        Column("dead_at", Float, nullable=False),
    )
    return OutboxTables(metadata, events, dead)


def inbox_table(metadata: MetaData, prefix: str) -> Table:
    """Define the inbox's table in *metadata*: one row per (handler, event) that succeeded."""
    return Table(
        f"{prefix}inbox",
        metadata,
        Column("handler", String(TEXT_LENGTH), primary_key=True),
        Column("event_id", String(ID_LENGTH), primary_key=True),
        Column("handled_at", Float, nullable=False),
    )


def check_fits(name: str, destinations: list[str]) -> None:
    """Refuse, at ``emit``, an event whose rows the outbox's columns could not hold: the
    application's commit would fail with them."""
    if len(name) > TEXT_LENGTH:
        raise InvalidEventError(
            f"event name {name[:40]!r}... is {len(name)} characters; an outbox's name column "
            f"holds {TEXT_LENGTH}"
        )
    for destination in destinations:
        if len(destination) > TEXT_LENGTH:
            raise ConfigurationError(
                f"forwarder {destination!r} has a name of {len(destination)} characters; an "
                f"outbox records each event's forwarders by name, in {TEXT_LENGTH}: name it "
                "shorter (name=...)"
            )
