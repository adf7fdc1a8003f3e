"""The transactional outbox (`SQLAlchemyOutbox`): per request, relay throughput, latency.

Run ``python -m benchmarks.bench_outbox`` (about 2.5 min) or add ``--quick`` (under a minute).
The PostgreSQL rows start a throwaway cluster as the tests do (`tests._postgres`, which
needs PostgreSQL's binaries, pytest and psycopg) and use asyncpg; without them they are
skipped, with the reason. SQLite (aiosqlite, a file in a temporary directory, WAL with
``synchronous=NORMAL``) needs nothing more.

1. **Per request** (CPU time, `benchmarks._harness`; each one-route app called in-process
   as in bench_core, no socket, no client; the handler, its dependency and the settling of
   the outbox rows run inside that call, after the response): an endpoint inserting one
   order row with an ``AsyncSession`` and committing (``*_base``); the same emitting one
   event in memory (``*_emit``, context: no outbox); the same writing an outbox row by
   hand (``*_floor``, context: the row inserted in the transaction, then a background task
   runs the handler and deletes the row); and emitting it with ``session=db`` before the
   commit (``*_outbox``: its row is written in the transaction, the handler runs once it
   committed, then the row is deleted). The handler has one ``Depends`` and does nothing
   else. CPU time is this process's only: the PostgreSQL server's is in its own
   processes, so a second table gives the wall time of the same batches.
2. **Relay throughput** into moto's SQS (moto's server in its own process, wall time): N
   rows written by a sync ``Session`` in a thread with no event loop (due at once), then
   ``while await outbox.relay_once(): pass`` on a bus with one `SQSForwarder` and no local
   handler; against the same N events through ``await bus.publish()`` without an outbox
   (one call per event) and (context) requests emitting 100 events each, no outbox (the
   forwarder's batching); and (context) the relay delivering to a local handler with one
   ``Depends``, no broker (its own cost: claiming and settling rows). Every 100 events
   (one ``relay_once``, 100 publishes, one request) are checked to be in the queue, which
   is then purged off the clock: moto recounts its whole queue for each message it
   stores, so a queue of N would make the rates moto's.
3. **Idle-to-delivery latency** (wall time): ``relay_forever`` running, a row written by a
   sync ``Session`` (due at once) at a random moment of the relay's idle wait; seconds
   from the start of its commit to the handler's call. Rows, interleaved: polling every
   0.1 s and 1 s (``listen=False``), and woken by PostgreSQL's LISTEN/NOTIFY
   (``listen=True``, 1 s poll); `LATENCY_ROWS` holds each row's outbox options.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import sqlite3
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    text,
)
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as async_engine
from sqlalchemy.orm import Session

from benchmarks import _harness as h
from benchmarks._harness import CALLS, RESPONSES, Variant
from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.outbox import SQLAlchemyOutbox

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

    from tests._postgres import Postgres

KEYS = h.MOTO_KEYS
PER_REQUEST = 100
"""Events per request of the ``emit100`` relay baseline (the relay claims 100 rows at a time)."""

metadata = MetaData()
orders = Table(
    "bench_orders",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("item", String(50), nullable=False),
    Column("customer", String(50), nullable=False),
)
by_hand = Table(
    "bench_by_hand_outbox",
    metadata,
    Column("event_id", String(64), primary_key=True),
    Column("body", Text, nullable=False),
)
"""The floor rows' outbox, by hand."""
Bus = Annotated[EventBus, Depends(get_bus)]


def payload(n: int) -> dict[str, Any]:
    return {"order_id": n, "item": "book", "customer": "ada", "total": "12.50"}


async def async_value() -> int:
    CALLS["dep.async"] += 1
    return 1


Value = Annotated[int, Depends(async_value)]


async def on_order(event: Event, value: Value) -> None:
    """The handler of the per-request rows: one ``Depends``, nothing else."""
    CALLS["handler.order"] += value


async def on_relayed(event: Event, value: Value) -> None:
    """The handler of the ``relay_local`` row (its calls counted apart: a batch row)."""
    CALLS["handler.relayed"] += value


# -- databases -------------------------------------------------------------------------


@dataclass
class Database:
    """One database the rows run on: its async engine, and a sync one for the writers."""

    key: str
    label: str
    engine: AsyncEngine
    sync_url: str
    """The URL of a sync engine on the same database (the writers')."""


def sqlite(directory: Path) -> Database:
    path = directory / "bench.db"
    engine = async_engine(f"sqlite+aiosqlite:///{path}")

    @sa_event.listens_for(engine.sync_engine, "connect")
    def pragmas(connection: Any, record: Any) -> None:
        """WAL, no fsync per commit: the PostgreSQL cluster has durability off, too."""
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return Database("sqlite", "SQLite (aiosqlite, WAL)", engine, f"sqlite:///{path}")


def start_postgres(stack: ExitStack) -> tuple[Postgres | None, str]:
    """A throwaway PostgreSQL cluster (stopped when *stack* closes), or None and why not."""
    # asyncpg: the async driver of every PostgreSQL row; psycopg: the sync writer's (and
    # the fixture's); pytest: the fixture's way to say PostgreSQL is missing.
    missing = [name for name in ("asyncpg", "psycopg", "pytest") if not find_spec(name)]
    if missing:
        return None, f"{', '.join(missing)} not installed (all in: pip install -e '.[dev]')"
    import pytest

    from tests._postgres import running_postgres

    try:
        return stack.enter_context(running_postgres()), ""
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:  # missing_peer's way out
        return None, str(exc.msg)


def postgres(server: Postgres) -> Database:
    label = "PostgreSQL (asyncpg)"
    return Database("pg", label, async_engine(server.url("asyncpg")), server.url("psycopg"))


async def versions(databases: Sequence[Database], why: str) -> str:
    """The databases' versions, for the header (and why PostgreSQL is missing, if it is)."""
    found = [f"SQLite {sqlite3.sqlite_version}"]
    for db in databases:
        if db.key == "pg":
            async with db.engine.connect() as connection:
                version = (await connection.execute(text("SHOW server_version"))).scalar_one()
            found.append(f"PostgreSQL {str(version).split()[0]}")
    return "; " + ", ".join(found) + (f"; PostgreSQL skipped: {why}" if why else "")


async def create_tables(engine: AsyncEngine, *outboxes: SQLAlchemyOutbox) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    for outbox in outboxes:
        await outbox.create_tables()


async def count(engine: AsyncEngine, table: Table) -> int:
    async with engine.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(table))).scalar_one()


# -- 1. per request --------------------------------------------------------------------


@dataclass
class Timed(Variant):
    """A row timed by the harness (CPU time) and, over the same batches, on the wall clock."""

    wall: list[float] = field(default_factory=list)
    """Wall seconds per unit, one per batch (calibration's first)."""

    async def run(self, n: int, clock: h.Clock) -> float:
        started = time.perf_counter()
        seconds = await super().run(n, clock)
        self.wall.append((time.perf_counter() - started) / (n * self.per_op))
        return seconds

    @property
    def measured_wall(self) -> list[float]:
        """The wall times of the measured batches (those in `times`)."""
        return self.wall[-len(self.times) :]


MODES = {
    "base": "insert 1 row (AsyncSession) + commit",
    "emit": "(context) + emit 1 event, no outbox",
    "floor": "(context) by hand: row + task: handler, DELETE",
    "outbox": "+ emit(..., session=db) -> handler w/ 1 Depends",
}
BASES = {"emit": ("base",), "floor": ("base",), "outbox": ("base", "emit", "floor")}
ORDER = {"item": "book", "customer": "ada"}


def shop(db: Database, mode: str) -> tuple[FastAPI, EventBus | None, SQLAlchemyOutbox | None]:
    """The one-route app of the row *mode* on *db*: its bus and outbox, if it has them."""
    sessions = async_sessionmaker(db.engine, expire_on_commit=False)
    endpoint_key = f"endpoint.{db.key}"
    counter = itertools.count()

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with sessions() as session:
            yield session

    app = FastAPI()
    if mode == "base":

        @app.post("/")
        async def plain(session: AsyncSession = Depends(get_db)) -> dict[str, bool]:
            CALLS[endpoint_key] += 1
            await session.execute(insert(orders).values(**ORDER))
            await session.commit()
            return {"ok": True}

        return app, None, None
    if mode == "floor":
        return floor_app(db, get_db, endpoint_key), None, None
    outbox = SQLAlchemyOutbox(db.engine, table_prefix="req_") if mode == "outbox" else None
    bus = EventBus(outbox=outbox)
    bus.install(app)
    bus.on("order.created")(on_order)

    @app.post("/")
    async def emitting(bus: Bus, session: AsyncSession = Depends(get_db)) -> dict[str, bool]:
        CALLS[endpoint_key] += 1
        await session.execute(insert(orders).values(**ORDER))
        bus.emit("order.created", payload(next(counter)), session=session if outbox else None)
        await session.commit()
        return {"ok": True}

    return app, bus, outbox


def floor_app(
    db: Database, get_db: Callable[[], AsyncIterator[AsyncSession]], endpoint_key: str
) -> FastAPI:
    """About the least an outbox needs, by hand: the event's row (its JSON) inserted in the
    transaction; after the response, a task awaiting the handler's dependency, calling the
    handler, then deleting the row in a transaction of its own. No relay, no retry."""
    app, counter = FastAPI(), itertools.count()
    event = Event(name="order.created", payload=payload(0))  # as bench_core's floor: built once

    async def run_handler(event_id: str) -> None:
        await on_order(event, await async_value())
        async with db.engine.begin() as connection:
            await connection.execute(delete(by_hand).where(by_hand.c.event_id == event_id))

    @app.post("/")
    async def endpoint(
        background_tasks: BackgroundTasks, session: AsyncSession = Depends(get_db)
    ) -> dict[str, bool]:
        CALLS[endpoint_key] += 1
        await session.execute(insert(orders).values(**ORDER))
        event_id, body = uuid.uuid4().hex, json.dumps(payload(next(counter)))
        await session.execute(insert(by_hand).values(event_id=event_id, body=body))
        await session.commit()
        background_tasks.add_task(run_handler, event_id)
        return {"ok": True}

    return app


@dataclass
class PerRequest:
    rows: list[Timed]
    buses: list[EventBus]
    outboxes: dict[str, SQLAlchemyOutbox]


async def per_request_rows(databases: Sequence[Database]) -> PerRequest:
    built = PerRequest([], [], {})
    for db in databases:
        section = f"Per request, in-process ASGI, {db.label}"
        for mode, label in MODES.items():
            app, bus, outbox = shop(db, mode)
            expected = {f"endpoint.{db.key}": 1, RESPONSES: 1}
            if bus is not None or mode == "floor":
                expected |= {"handler.order": 1, "dep.async": 1}
            if bus is not None:
                built.buses.append(bus)
            if outbox is not None:
                built.outboxes[db.key] = outbox
            bases = tuple(f"{db.key}_{b}" for b in BASES.get(mode, ()))
            key = f"{db.key}_{mode}"
            built.rows.append(Timed(key, label, h.asgi_op(app), "req", 1, expected, bases, section))
        await create_tables(db.engine, built.outboxes[db.key])
    return built


async def per_request_checks(
    databases: Sequence[Database], outboxes: dict[str, SQLAlchemyOutbox]
) -> list[h.Check]:
    checks: list[h.Check] = []
    for db in databases:
        written, requests = await count(db.engine, orders), CALLS[f"endpoint.{db.key}"]
        checks.append((f"{db.key}: one order row per request", f"{written:,}", written == requests))
        left = len(await outboxes[db.key].pending())
        checks.append((f"{db.key}: outbox rows left after the requests", str(left), left == 0))
        left = await count(db.engine, by_hand)
        checks.append((f"{db.key}: by-hand outbox rows left", str(left), left == 0))
    return checks


def wall_tables(rows: Sequence[Timed]) -> None:
    """`h.tables`' layout for the wall times of *rows* (same batches as the CPU table)."""
    by_key = {v.key: statistics.median(v.measured_wall) for v in rows}
    sections: dict[str, list[Timed]] = {}
    for v in rows:
        sections.setdefault(v.section, []).append(v)
    for title, chosen in sections.items():
        print(f"\n{title} (wall µs per req, same batches; includes the database's time)")
        head = f"{'key':<16} {'row':<50} {'µs/req':>10} {'min-max':>17} {'req/s':>11}  ratio"
        print(head + "\n" + "-" * len(head))
        for v in chosen:
            wall = v.measured_wall
            median, lo, hi = by_key[v.key], min(wall) * 1e6, max(wall) * 1e6
            ratios = ", ".join(f"{by_key[b] / median:.2f}x {b}" for b in v.bases if b in by_key)
            print(
                f"{v.key:<16} {v.label:<50} {median * 1e6:>10.1f} {f'{lo:.1f}-{hi:.1f}':>17} "
                f"{1 / median:>11,.0f}  {ratios}"
            )


# -- writing due rows from a sync script ----------------------------------------------------


@dataclass
class Writer:
    """A sync script's bus and engine: rows it writes with no event loop are due at once.

    Its outbox is on a sync engine (a second `SQLAlchemyOutbox` on the same tables: an
    outbox refuses a session on another URL, and the sync driver's URL is another one).
    Its forwarders must have the names of the relaying bus's: they are the rows'
    destinations.
    """

    bus: EventBus
    engine: Engine
    numbers: itertools.count[int] = field(default_factory=itertools.count)

    @classmethod
    def on(cls, db: Database, prefix: str, forwarder: Any = None, **options: Any) -> Writer:
        from sqlalchemy import create_engine

        engine = create_engine(db.sync_url)
        bus = EventBus(outbox=SQLAlchemyOutbox(engine, table_prefix=prefix, **options))
        if forwarder is not None:
            bus.forward("order.*", forwarder)
        return cls(bus, engine)

    def write(self, n: int) -> float:
        """Commit *n* events in one transaction (call it in a thread); when the commit began
        (the rows already flushed: what is left is the NOTIFY, if any, and the COMMIT)."""
        with Session(self.engine) as session:
            for _ in range(n):
                self.bus.emit("order.created", payload(next(self.numbers)), session=session)
            session.flush()
            committing = time.perf_counter()
            session.commit()
        return committing

    async def due(self, n: int) -> float:
        """`write` in a worker thread: no running event loop there, so the rows are due."""
        return await asyncio.to_thread(self.write, n)


# -- 2. relay throughput -------------------------------------------------------------------


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """moto's server in its own process (as bench_worker), queues purgeable at will."""
    from benchmarks.bench_worker import start_moto as start

    # The queues are emptied after every batch; moto allows that once a minute unless:
    os.environ["MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR"] = "false"
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    return start()


async def queue_length(client: SQSClient, queue_url: str) -> int:
    response = await client.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"]
    )
    return int(response["Attributes"]["ApproximateNumberOfMessages"])


async def emptied(client: SQSClient, queue_url: str, sent: int) -> None:
    """Check that *sent* messages are in the queue, then purge it."""
    if (got := await queue_length(client, queue_url)) != sent:
        raise AssertionError(f"{got} messages in {queue_url}, not {sent}")
    await client.purge_queue(QueueUrl=queue_url)


@dataclass
class Relay:
    variants: list[Variant]
    close: list[EventBus]
    writers: list[Writer]
    relayed: list[int] = field(default_factory=lambda: [0])


def pieces(n: int) -> int:
    """The pieces of `PER_REQUEST` events a batch of about *n* events is timed in."""
    return max(1, round(n / PER_REQUEST))


async def relay_rows(
    args: argparse.Namespace, db: Database, endpoint: str, client: SQSClient
) -> Relay:
    from fastapi_eventbus.forwarders.sqs import SQSForwarder

    keys = ("relay", "publish", "emit100")
    queues = {k: (await client.create_queue(QueueName=f"bench-{k}"))["QueueUrl"] for k in keys}

    def forwarder(key: str) -> SQSForwarder:
        return SQSForwarder(queues[key], endpoint_url=endpoint, **KEYS)

    outbox = SQLAlchemyOutbox(db.engine, table_prefix="relay_")
    relaying = EventBus(outbox=outbox)  # a forwarder, no local handler
    writer = Writer.on(db, "relay_", forwarder("relay"))  # same forwarder name: SQSForwarder
    local_outbox = SQLAlchemyOutbox(db.engine, table_prefix="relay_local_")
    local = EventBus(outbox=local_outbox)  # a local handler, no forwarder
    local.on("order.created")(on_relayed)
    local_writer = Writer.on(db, "relay_local_")
    publishing, emitting, app = EventBus(), EventBus(), FastAPI()
    emitting.install(app)
    for bus, key in ((relaying, "relay"), (publishing, "publish"), (emitting, "emit100")):
        await bus.forward("order.*", forwarder(key)).ensure_started()
    await outbox.create_tables()
    await local_outbox.create_tables()
    numbers = itertools.count()
    built = Relay([], [relaying, local, publishing, emitting], [writer, local_writer])

    @app.post("/")
    async def emit_100(bus: Bus) -> dict[str, bool]:
        for _ in range(PER_REQUEST):
            bus.emit("order.created", payload(next(numbers)))
        return {"ok": True}

    async def relay(n: int) -> tuple[int, float]:
        await writer.due(n)  # off the clock
        claimed, elapsed = 0, 0.0
        while True:
            started = time.perf_counter()
            got = await outbox.relay_once()  # up to batch_size (100) rows
            elapsed += time.perf_counter() - started
            if not got:
                break
            claimed += got
            await emptied(client, queues["relay"], got)
        if claimed != n:
            raise AssertionError(f"the relay claimed {claimed} rows, not {n}")
        built.relayed[0] += n
        return n, elapsed

    async def relay_local(n: int) -> tuple[int, float]:
        await local_writer.due(n)  # off the clock
        before, claimed, started = CALLS["handler.relayed"], 0, time.perf_counter()
        while got := await local_outbox.relay_once():
            claimed += got
        elapsed = time.perf_counter() - started
        if claimed != n or CALLS["handler.relayed"] - before != n:
            raise AssertionError(f"{n} rows: {claimed} claimed, handled {CALLS['handler.relayed']}")
        return n, elapsed

    async def publish(n: int) -> tuple[int, float]:
        elapsed = 0.0
        for _ in range(pieces(n)):
            started = time.perf_counter()
            for _ in range(PER_REQUEST):
                await publishing.publish("order.created", payload(next(numbers)))
            elapsed += time.perf_counter() - started
            await emptied(client, queues["publish"], PER_REQUEST)
        return pieces(n) * PER_REQUEST, elapsed

    async def emit100(n: int) -> tuple[int, float]:
        call, elapsed = h.asgi_op(app), 0.0
        for _ in range(pieces(n)):
            started = time.perf_counter()
            await call()  # returns once the flush sent the request's events
            elapsed += time.perf_counter() - started
            await emptied(client, queues["emit100"], PER_REQUEST)
        return pieces(n) * PER_REQUEST, elapsed

    section = f"Relay throughput into moto's SQS, {args.events:,} events per batch"
    rows = (
        ("relay", "relay_once() until none due, outbox rows -> SQS", relay, ("publish", "emit100")),
        ("publish", "await bus.publish() per event, no outbox", publish, ()),
        ("emit100", f"(context) requests emitting {PER_REQUEST}, no outbox", emit100, ()),
        ("relay_local", "(context) relay to a handler w/ 1 Depends, no SQS", relay_local, ()),
    )
    for key, label, batch, bases in rows:
        v = Variant(key, label, None, "event", 1, {}, bases, section, batch, args.events)
        built.variants.append(v)
        await batch(PER_REQUEST)  # warm-up: connections, prepared statements
    return built


# -- 3. idle-to-delivery latency ----------------------------------------------------------

LATENCY_ROWS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "poll_0.1": ("polling, poll_interval=0.1", {"poll_interval": 0.1, "listen": False}),
    "poll_1.0": ("polling, poll_interval=1.0", {"poll_interval": 1.0, "listen": False}),
    "listen_notify": ("LISTEN/NOTIFY, poll_interval=1.0", {"poll_interval": 1.0, "listen": True}),
}
"""Label and `SQLAlchemyOutbox` options (the relay's and the writer's) per latency row;
None: skipped (printed as such)."""


LATENCY_WARMUP = 1
"""Trials per row not counted (the relay's first claims, the writer's first connection)."""


@dataclass
class Waiting:
    """One latency row's relay, and the handler call a trial waits for."""

    outbox: SQLAlchemyOutbox
    writer: Writer
    idle: float
    """The longest random wait before a trial's write: the poll interval when polling (any
    moment of the relay's wait), short when a NOTIFY wakes the relay."""
    arrived: asyncio.Future[float] | None = None
    seconds: list[float] = field(default_factory=list)


def signalling(waiting: Waiting) -> Callable[..., Awaitable[None]]:
    """The handler of a latency row: one ``Depends``; tells the trial waiting for it."""

    async def handler(event: Event, value: Value) -> None:
        CALLS["handler.latency"] += value
        if waiting.arrived is not None and not waiting.arrived.done():
            waiting.arrived.set_result(time.perf_counter())

    return handler


async def latency(db: Database, trials: int) -> dict[str, list[float]]:
    """Seconds from a due row's commit to its handler's call, *trials* per row, interleaved."""
    rows: dict[str, Waiting] = {}
    for n, (key, (_, options)) in enumerate(LATENCY_ROWS.items()):
        if options is None:
            continue
        prefix = f"latency{n}_"
        outbox = SQLAlchemyOutbox(db.engine, table_prefix=prefix, **options)
        bus = EventBus(outbox=outbox)
        writer = Writer.on(db, prefix, **options)  # with listen=True, its commit NOTIFYs
        idle = 0.1 if options.get("listen") else options["poll_interval"]
        waiting = rows[key] = Waiting(outbox, writer, idle)

        bus.on("order.created")(signalling(waiting))
        await outbox.create_tables()
    relays = [asyncio.create_task(w.outbox.relay_forever()) for w in rows.values()]
    order, loop = random.Random(7), asyncio.get_running_loop()
    try:
        for trial in range(LATENCY_WARMUP + trials):
            for key in order.sample(list(rows), len(rows)):
                waiting = rows[key]
                await asyncio.sleep(order.uniform(0, waiting.idle))  # a random idle moment
                waiting.arrived = loop.create_future()
                committed = await waiting.writer.due(1)
                ran = await asyncio.wait_for(waiting.arrived, 10 * waiting.idle + 10)
                if trial >= LATENCY_WARMUP:
                    waiting.seconds.append(ran - committed)
    finally:
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        for waiting in rows.values():
            waiting.writer.engine.dispose()
    return {key: waiting.seconds for key, waiting in rows.items()}


def latency_table(results: dict[str, list[float]], trials: int) -> None:
    print(f"\nIdle-to-delivery latency: sync commit -> handler ran, {trials} trials per row (ms)")
    print(f"  {'key':<14} {'row':<46} {'median':>8} {'p90':>8} {'min-max':>15}")
    for key, (label, _) in LATENCY_ROWS.items():
        seconds = results.get(key)
        if not seconds:
            print(f"  {key:<14} {label:<46} {'SKIPPED':>8}")
            continue
        ms = [s * 1000 for s in seconds]
        p90 = statistics.quantiles(ms, n=10, method="inclusive")[8]
        spread = f"{min(ms):.1f}-{max(ms):.1f}"
        print(f"  {key:<14} {label:<46} {statistics.median(ms):>8.1f} {p90:>8.1f} {spread:>15}")


# -- the run ---------------------------------------------------------------------------------

REQUEST_KEYS = [f"{db}_{mode}" for db in ("sqlite", "pg") for mode in MODES]
RELAY_KEYS = ["relay", "publish", "emit100", "relay_local"]


async def amain(args: argparse.Namespace) -> bool:
    from aiobotocore.session import AioSession

    args.events = args.events or (500 if args.quick else 2000)
    args.trials = args.trials or (10 if args.quick else 20)
    if args.profile and args.profile not in REQUEST_KEYS + RELAY_KEYS:
        keys = ", ".join(REQUEST_KEYS + RELAY_KEYS)
        raise SystemExit(f"unknown row {args.profile!r}; choose one of: {keys}")
    given_rounds = args.rounds  # run_variants sets args.rounds: the relay's are its own
    checks: list[h.Check] = []
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ob-")))
        server, why = start_postgres(stack)
        databases = [sqlite(directory)] + ([postgres(server)] if server else [])
        pg = databases[-1] if server else None
        try:
            # 1. per request
            if not args.profile or args.profile in REQUEST_KEYS:
                built = await per_request_rows(databases)
                counts = await h.run_variants(args, built.rows, built.buses, batch=(0.12, 0.35))
                if counts is None:
                    return True
                checks += await per_request_checks(databases, built.outboxes)
                h.header("bench_outbox", args.rounds, extra=await versions(databases, why))
                h.tables(built.rows)
                wall_tables(built.rows)
                print(
                    "\nCPU: this process only (the app, SQLAlchemy, the driver; aiosqlite's "
                    "thread included; the PostgreSQL server's processes not)."
                )
                print(h.counts_line(counts))
            if pg is None:
                print(f"\nPostgreSQL rows (relay throughput, latency) skipped: {why}")
                return h.verdict({}, checks)
            # 2. relay throughput
            process, endpoint = start_moto()
            try:
                async with AioSession().create_client(
                    "sqs", endpoint_url=endpoint, **KEYS
                ) as client:
                    relay = await relay_rows(args, pg, endpoint, client)
                    args.rounds = given_rounds
                    try:
                        done = await h.run_variants(
                            args, relay.variants, rounds=(2, 3), clock=time.perf_counter
                        )
                    finally:
                        for bus in relay.close:
                            await bus.close()
                        for writer in relay.writers:
                            writer.engine.dispose()
                    if done is None:
                        return True
            finally:
                process.terminate()
                process.wait()
            print(f"\nbench_outbox relay: {args.rounds} rounds, round-robin, wall time; moto")
            h.tables(relay.variants, wall=True)
            relayed = f"{relay.relayed[0]:,} events"
            checks.append(("relay: every claimed row's event found in the queue", relayed, True))
            # 3. latency
            CALLS["handler.latency"] = 0
            results = await latency(pg, args.trials)
            latency_table(results, args.trials)
            trials = (args.trials + LATENCY_WARMUP) * len(results)
            ran = CALLS["handler.latency"]
            checks.append(("latency: one handler call per trial", str(ran), ran == trials))
        finally:
            for db in databases:
                await db.engine.dispose()
    return h.verdict({}, checks)


def main(argv: list[str] | None = None) -> int:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--events", type=int, help="relay rows per batch (2000; quick 500)")
        parser.add_argument("--trials", type=int, help="latency trials per row (20; quick 10)")

    return h.main(amain, __doc__, argv, extra)


if __name__ == "__main__":
    raise SystemExit(main())
