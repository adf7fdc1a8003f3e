"""docs/database.md's "Migrations with Alembic", run for real with Alembic's Python API.

A project directory holds the models' module (a copy of docs/examples/outbox.py, as
``outbox.py``, which reads its database from ``DATABASE_URL``) and what ``alembic init -t async
migrations`` writes next to it; the documented lines of docs/examples/outbox_alembic.py replace
``target_metadata = None`` in its env.py. Then, as ``alembic revision --autogenerate`` and
``alembic upgrade head`` would: the first revision creates the models' and the outbox's tables,
upgrading creates them in the database, and autogenerating again finds nothing to do.

The commands run in this process, as the CLI would run them in its own: from the project
directory (alembic.ini's ``prepend_sys_path = .`` is how env.py imports ``outbox``), with the
example imported as the top-level module ``outbox``. The ``project`` fixture gives all that
back afterwards: the working directory, ``sys.path``, the importers cached for its entries, and
``sys.modules["outbox"]``. It also keeps env.py's ``fileConfig`` from reconfiguring logging for
the whole test run (it would disable every logger it does not name, fastapi_eventbus's too).
"""

from __future__ import annotations

import ast
import logging.config
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import Script
from sqlalchemy import create_engine, inspect

from tests._support import ROOT

pytestmark = pytest.mark.slow

MODELS = ROOT / "docs/examples/outbox.py"
ENV_LINES = ROOT / "docs/examples/outbox_alembic.py"
TABLES = {"orders", "eventbus_outbox", "eventbus_outbox_dead"}
FIRST_REVISION = {
    ("create_table", "orders"),
    ("create_table", "eventbus_outbox"),
    ("create_index", "eventbus_outbox_due"),
    ("create_table", "eventbus_outbox_dead"),
}


def documented_env_lines() -> str:
    """The lines docs/database.md shows for env.py (between the snippet's markers)."""
    text = ENV_LINES.read_text()
    start, end = "# --8<-- [start:env]\n", "# --8<-- [end:env]\n"
    return text[text.index(start) + len(start) : text.index(end)]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty project directory with the models' module, as the working directory."""
    directory = tmp_path / "project"
    directory.mkdir()
    shutil.copy(MODELS, directory / "outbox.py")
    monkeypatch.chdir(directory)
    # Alembic prepends "." to sys.path in place; the importer cached for "." is bound to
    # the directory that was current when it was made, so both go back as they were.
    monkeypatch.setattr(sys, "path", [*sys.path])
    monkeypatch.setattr(sys, "path_importer_cache", dict(sys.path_importer_cache))
    for relative in (".", ""):  # one made earlier (another test put "." on sys.path) looks
        sys.path_importer_cache.pop(relative, None)  # in the directory current back then
    monkeypatch.setattr(logging.config, "fileConfig", lambda *args, **kwargs: None)
    before = sys.modules.pop("outbox", None)
    try:
        yield directory
    finally:
        sys.modules.pop("outbox", None)  # env.py's import of the copy
        if before is not None:
            sys.modules["outbox"] = before


def operations(script: Script | list[Script | None] | None, function: str) -> list[object]:
    """The statements of *function* in the revision file *script*, as ``(op, name)`` pairs
    for ``op.create_table("orders", ...)`` and the like (``op.f("name")`` unwrapped), and as
    the statement's class name otherwise (``"Pass"``); docstrings left out."""
    assert isinstance(script, Script)
    [body] = [
        node.body
        for node in ast.parse(Path(script.path).read_text()).body
        if isinstance(node, ast.FunctionDef) and node.name == function
    ]
    found: list[object] = []
    for statement in body:
        match statement:
            case ast.Expr(ast.Constant(str())):  # the docstring ("Upgrade schema.")
                pass
            case ast.Expr(ast.Call(ast.Attribute(ast.Name("op"), op), [first, *_])):
                match first:
                    case ast.Call(ast.Attribute(ast.Name("op"), "f"), [named]):
                        first = named
                assert isinstance(first, ast.Constant)
                found.append((op, first.value))
            case _:
                found.append(type(statement).__name__)
    return found


def run_recipe(project: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Initialise Alembic in *project*, autogenerate the first revision and upgrade *url*'s
    database to it; check that autogenerating again proposes nothing."""
    monkeypatch.setenv("DATABASE_URL", url)  # what the models' module connects to
    command.init(Config("alembic.ini"), "migrations", template="async")
    env = project / "migrations/env.py"
    generated = env.read_text()
    assert generated.count("target_metadata = None\n") == 1
    env.write_text(generated.replace("target_metadata = None\n", documented_env_lines()))

    config = Config("alembic.ini")
    config.set_main_option("sqlalchemy.url", url)  # in alembic.ini: the same database

    first = command.revision(config, message="orders and the outbox", autogenerate=True)
    upgrade = operations(first, "upgrade")
    assert set(upgrade) == FIRST_REVISION
    assert len(upgrade) == len(FIRST_REVISION)
    assert upgrade.index(("create_table", "eventbus_outbox")) < upgrade.index(
        ("create_index", "eventbus_outbox_due")
    )

    command.upgrade(config, "head")
    assert sys.modules["outbox"].__file__ == str(project / "outbox.py")

    command.check(config)  # raises AutogenerateDiffsDetected if the database drifted
    second = command.revision(config, message="nothing", autogenerate=True)
    assert operations(second, "upgrade") == ["Pass"]
    assert operations(second, "downgrade") == ["Pass"]


def test_the_recipe_migrates_sqlite_with_no_drift(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = project / "shop.db"
    run_recipe(project, f"sqlite+aiosqlite:///{database}", monkeypatch)
    with closing(sqlite3.connect(database)) as db:
        schema = db.execute("SELECT type, name, tbl_name FROM sqlite_master").fetchall()
    tables = {name for kind, name, _ in schema if kind == "table"}
    assert tables == {*TABLES, "alembic_version"}
    indexes = {(name, table) for kind, name, table in schema if kind == "index"}
    assert ("eventbus_outbox_due", "eventbus_outbox") in indexes
    assert {name for name, _ in indexes if not name.startswith("sqlite_autoindex_")} == {
        "eventbus_outbox_due"
    }


def test_the_recipe_migrates_postgresql_with_no_drift(
    project: Path, monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> None:
    run_recipe(project, postgres_url, monkeypatch)
    engine = create_engine(postgres_url.replace("+asyncpg", "+psycopg"))
    try:
        schema = inspect(engine)
        assert set(schema.get_table_names()) == {*TABLES, "alembic_version"}
        assert [i["name"] for i in schema.get_indexes("eventbus_outbox")] == ["eventbus_outbox_due"]
    finally:
        engine.dispose()
