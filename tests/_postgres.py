"""A throwaway PostgreSQL cluster for the tests: started once per run by the root conftest.

`running_postgres` initialises a cluster in a temporary directory and starts it on a free
port of 127.0.0.1 (or calls `missing_peer` if PostgreSQL is not installed or does not
start); `Postgres.create_database` makes a fresh database for one test. Durability is off
(``fsync``, ``full_page_writes``, ``synchronous_commit``): the cluster dies with the run.

PostgreSQL refuses to run as root: as root (CI's containers), the binaries run as Debian's
``postgres`` system user, which owns the temporary directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
from psycopg import sql

from tests._pubsub import free_port
from tests.conftest import missing_peer

USER = "postgres"
"""The superuser initdb creates (trust authentication: no password), and, as root, the system
user the binaries run as."""
BINARIES = ("initdb", "pg_ctl", "postgres")
STARTUP_TIMEOUT = 30.0
SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "off",
    "max_connections": "200",
}


@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL server."""

    host: str
    port: int

    def url(self, driver: str = "asyncpg", database: str = "postgres") -> str:
        """The SQLAlchemy URL of *database* (``driver="psycopg"`` for a sync engine)."""
        return f"postgresql+{driver}://{USER}@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        """Create a fresh, uniquely named database; return its name."""
        name = f"test_{uuid4().hex[:16]}"
        self._execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        """Drop *name*, closing whatever connections to it are left (PostgreSQL 13+)."""
        self._execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

    def _execute(self, statement: sql.Composed) -> None:
        # Sync and short-lived, so it works from any thread, a running event loop's too;
        # autocommit, since CREATE and DROP DATABASE cannot run inside a transaction.
        with self.connect() as connection:
            connection.execute(statement)

    def connect(self, database: str = "postgres") -> psycopg.Connection[Any]:
        """A sync autocommit psycopg connection to *database*."""
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=USER,
            dbname=database,
            autocommit=True,
            connect_timeout=5,
        )


@dataclass(frozen=True)
class _Binaries:
    initdb: Path
    pg_ctl: Path
    postgres: Path


def _version(directory: Path) -> tuple[int, ...]:
    """The version of ``/usr/lib/postgresql/<version>/bin`` (``()`` if not a number)."""
    try:
        return tuple(int(part) for part in directory.parent.name.split("."))
    except ValueError:
        return ()


def _binaries() -> _Binaries | None:
    """The newest of Debian's /usr/lib/postgresql/*/bin with all three binaries, else PATH's."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version, reverse=True)
    for directory in debian:
        if all((directory / name).is_file() for name in BINARIES):
            return _Binaries(*(directory / name for name in BINARIES))
    found = [shutil.which(name) for name in BINARIES]
    if None in found:
        return None
    return _Binaries(*(Path(path) for path in found if path is not None))


def _run_as() -> dict[str, Any]:
    """`subprocess` arguments that run a binary as the ``postgres`` user when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        missing_peer(
            f"running as root, and there is no {USER!r} system user to run PostgreSQL as "
            f"(Debian's postgresql package creates it)"
        )
    # setgroups([]) too, so that the server keeps none of root's supplementary groups.
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _tail(log: Path) -> str:
    try:
        return log.read_bytes()[-1500:].decode(errors="replace")
    except OSError as error:
        return f"(no server log: {error})"


def _answers(server: Postgres, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with server.connect() as connection:
                connection.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            time.sleep(0.05)
    return False


def _stop(
    process: subprocess.Popen[bytes], pg_ctl: Path, data: Path, run_as: dict[str, Any]
) -> None:
    """``pg_ctl stop -m immediate``; the server is thrown away, so nothing needs to be saved."""
    if process.poll() is None:
        command = [str(pg_ctl), "stop", "-D", str(data), "-m", "immediate", "-w", "-t", "10"]
        subprocess.run(command, capture_output=True, timeout=30, check=False, **run_as)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()


@contextmanager
def running_postgres() -> Iterator[Postgres]:
    """Start a throwaway PostgreSQL cluster on a free port (or `missing_peer`); stop it after."""
    binaries = _binaries()
    if binaries is None:
        missing_peer(
            "PostgreSQL is not installed (initdb, pg_ctl and postgres: Debian's postgresql "
            "package, under /usr/lib/postgresql/<version>/bin, or on PATH)"
        )
    run_as = _run_as()
    # Short: the server's unix socket lives here, and socket paths are limited to ~100 bytes.
    directory = Path(tempfile.mkdtemp(prefix="eventbus-pg-"))
    try:
        if run_as:
            os.chown(directory, run_as["user"], run_as["group"])
        data, log = directory / "data", directory / "server.log"
        # cwd: as root, the current directory may be one the postgres user cannot enter.
        options: dict[str, Any] = {"cwd": directory, **run_as}
        initdb = [str(binaries.initdb), "-D", str(data), "--auth=trust", "-U", USER]
        # --locale=C: the machine's own locale may not be generated (or may be missing).
        initdb += ["--encoding=UTF8", "--locale=C", "--no-sync"]
        result = subprocess.run(initdb, capture_output=True, timeout=120, check=False, **options)
        if result.returncode != 0:
            output = (result.stdout + result.stderr)[-1500:].decode(errors="replace")
            missing_peer(f"initdb failed (exit {result.returncode}): {output}")
        server = Postgres("127.0.0.1", free_port())
        # Listening on 127.0.0.1 only; the unix socket in the temporary directory.
        command = [str(binaries.postgres), "-D", str(data), "-h", server.host]
        command += ["-p", str(server.port), "-k", str(directory)]
        command += [arg for name, value in SETTINGS.items() for arg in ("-c", f"{name}={value}")]
        with log.open("wb") as output:
            process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, **options
            )
        try:
            if not _answers(server, process):
                status = process.poll()
                why = f"exited ({status})" if status is not None else f"hung {STARTUP_TIMEOUT}s"
                missing_peer(f"PostgreSQL did not start, {why}: {_tail(log)}")
            yield server
        finally:
            _stop(process, binaries.pg_ctl, data, run_as)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
