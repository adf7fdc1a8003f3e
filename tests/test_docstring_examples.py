"""The code in the package's docstrings (rendered in the API reference) runs.

Docstring examples are fragments: they use a ``bus``, an ``app``, a ``client`` or a
``queue_url`` the reader already has. Each block runs here with real ones, so an example
that names something renamed, or calls something with arguments it no longer takes,
fails. Nothing is sent anywhere: forwarders and sources connect when started, not when
built.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_eventbus import EventBus, get_bus
from tests._support import public_modules

_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _docstrings(module: ModuleType) -> Iterator[tuple[str, str]]:
    yield module.__name__, module.__doc__ or ""
    for name in getattr(module, "__all__", []):
        value = getattr(module, name)
        if getattr(value, "__module__", None) == module.__name__ or inspect.ismodule(value):
            yield f"{module.__name__}.{name}", inspect.getdoc(value) or ""


def _examples() -> list[tuple[str, str]]:
    return [
        (where, code)
        for module in map(importlib.import_module, public_modules())
        for where, doc in _docstrings(module)
        for code in _BLOCK.findall(doc)
    ]


EXAMPLES = _examples()


def test_the_package_has_docstring_examples() -> None:
    assert len(EXAMPLES) >= 10  # the collection itself works


@pytest.fixture
def given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What a docstring example takes for granted: an app with its bus, a client, a queue."""
    monkeypatch.chdir(tmp_path)  # a spool file, if an example makes one, lands here
    bus = EventBus()
    app = FastAPI()
    bus.install(app)

    @app.post("/cats")
    def create_cat(bus: EventBus = Depends(get_bus)) -> None:
        bus.emit("cat.created", {"id": 1})

    main = ModuleType("myapp.main")
    main.app = app  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "myapp", ModuleType("myapp"))
    monkeypatch.setitem(sys.modules, "myapp.main", main)
    return {
        "__name__": "docstring_example",
        "app": app,
        "bus": bus,
        "client": TestClient(app),
        "queue_url": "https://sqs.eu-west-1.amazonaws.com/123456789012/orders",
    }


@pytest.mark.parametrize(("where", "code"), EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_the_example_runs(where: str, code: str, given: dict[str, Any]) -> None:
    namespace = dict(given)
    exec(compile(ast.parse(code), f"<docstring of {where}>", "exec"), namespace)
    for name, value in namespace.items():  # an example test function: run it too
        if name.startswith("test_") and callable(value):
            value(given["client"])
