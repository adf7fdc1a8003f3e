"""The public surface: everything exported is listed, nothing private leaks."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import ParamSpec, TypeVar, TypeVarTuple

import pytest

import fastapi_eventbus
import fastapi_eventbus.exceptions
from tests._support import public_modules

PUBLIC_MODULES = list(public_modules())


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements that run at import, inside ``try`` and ``if`` (not ``if TYPE_CHECKING``)."""
    for node in body:
        yield node
        if isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse):
                yield from _top_level(block)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)


def _is_below(name: str | None, module: ModuleType) -> bool:
    return name is not None and name.startswith(f"{module.__name__}.")


def _bound_names(node: ast.stmt, module: ModuleType) -> Iterator[str]:
    """Names *node* defines in *module*, or imports into it from one of its submodules."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        yield node.name
    elif isinstance(node, ast.Assign | ast.AnnAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        stored = (n for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        yield from (n.id for n in stored if isinstance(n.ctx, ast.Store))
    elif isinstance(node, ast.ImportFrom):
        package = module.__name__ if hasattr(module, "__path__") else module.__package__
        source = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
        if _is_below(source, module):
            yield from (alias.asname or alias.name for alias in node.names)


def _not_api(value: object) -> bool:
    """Public-looking by convention, never API: type variables and loggers."""
    return isinstance(value, TypeVar | TypeVarTuple | ParamSpec | logging.Logger)


def _defined_names(module: ModuleType, source: str) -> set[str]:
    """The public names *module* defines, or re-exports from its own submodules."""
    names = {n for node in _top_level(ast.parse(source).body) for n in _bound_names(node, module)}
    names |= {  # and any object whose home is this module, however it got here
        name
        for name, value in vars(module).items()
        if getattr(value, "__module__", None) == module.__name__
        or _is_below(getattr(value, "__module__", None), module)
    }
    missing = object()
    return {
        name
        for name in names
        if not name.startswith("_")
        and (value := getattr(module, name, missing)) is not missing
        and not _not_api(value)
    }


def test_every_public_module_is_checked() -> None:
    assert {
        "fastapi_eventbus",
        "fastapi_eventbus.cli",
        "fastapi_eventbus.exceptions",
        "fastapi_eventbus.forwarders",
        "fastapi_eventbus.forwarders.pubsub",
        "fastapi_eventbus.forwarders.sqs",
        "fastapi_eventbus.otel",
        "fastapi_eventbus.spool",
        "fastapi_eventbus.storage",
        "fastapi_eventbus.testing",
        "fastapi_eventbus.wire",
        "fastapi_eventbus.worker",
        "fastapi_eventbus.worker.pubsub",
        "fastapi_eventbus.worker.sqs",
    } <= set(PUBLIC_MODULES)
    assert [name for name in PUBLIC_MODULES if "._" in name] == []


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_lists_every_public_name(name: str) -> None:
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    exported: list[str] = module.__all__
    assert exported == sorted(exported), f"{name}.__all__ is not sorted"
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"
    assert [n for n in exported if not hasattr(module, n)] == [], f"{name}.__all__: missing"
    assert [n for n in exported if n.startswith("_") and n != "__version__"] == []
    defined = _defined_names(module, inspect.getsource(module))
    assert sorted(defined - set(exported)) == [], f"{name}.__all__: unlisted"


def test_the_check_sees_every_kind_of_public_name() -> None:
    body = (
        "import logging\n"
        "from typing import TYPE_CHECKING, TypeVar\n"
        "if TYPE_CHECKING:\n"
        "    from .typing_only import Hidden\n"
        "try:\n"
        "    LIMIT = 1\n"
        "except ImportError:\n"
        "    FALLBACK = 0\n"
        "Alias = dict[str, int]\n"
        "T = TypeVar('T')\n"
        "logger = logging.getLogger(__name__)\n"
        "_private = 2\n"
        "def function() -> None: ...\n"
        "class Class: ...\n"
    )
    package = ModuleType("fastapi_eventbus.example")
    package.__path__ = []  # a package: what it imports from its submodules, it re-exports
    vars(package).update(Event=fastapi_eventbus.Event, Reexported=type("Reexported", (), {}))
    exec(body, vars(package))
    source = "from fastapi_eventbus import Event\nfrom ._impl import Reexported\n" + body
    assert _defined_names(package, source) == {"Alias", "Class", "LIMIT", "Reexported", "function"}


def test_every_exception_derives_from_the_base() -> None:
    for name in fastapi_eventbus.exceptions.__all__:
        assert issubclass(getattr(fastapi_eventbus.exceptions, name), Exception)
        assert issubclass(
            getattr(fastapi_eventbus.exceptions, name), fastapi_eventbus.EventBusError
        )


def test_import_does_not_pull_optional_sdks() -> None:
    # FastAPI itself may import opentelemetry when it is installed: compare against it.
    code = (
        "import sys, fastapi; before = set(sys.modules);"
        "import fastapi_eventbus, fastapi_eventbus.testing;"
        "sdks = ('aiobotocore', 'botocore', 'gcloud', 'opentelemetry', 'sqlalchemy');"
        "bad = [m for m in set(sys.modules) - before if m.split('.')[0] in sdks];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_does_not_pull_the_cli_library_or_the_worker_sdks() -> None:
    code = (
        "import sys, fastapi; before = set(sys.modules);"
        "import fastapi_eventbus; assert 'click' not in sys.modules, 'click';"
        "import fastapi_eventbus.worker;"
        "sdks = ('aiobotocore', 'botocore', 'gcloud', 'aiohttp', 'click');"
        "bad = [m for m in set(sys.modules) - before if m.split('.')[0] in sdks];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_version_is_a_string() -> None:
    assert isinstance(fastapi_eventbus.__version__, str)
    assert fastapi_eventbus.__version__


def test_fastapi_internals_are_touched_in_one_module() -> None:
    package = Path(fastapi_eventbus.__file__).parent
    touching = sorted(
        path.name
        for path in package.rglob("*.py")
        if "fastapi.dependencies" in path.read_text() or "fastapi_inner_astack" in path.read_text()
    )
    assert touching == ["_di.py"]
