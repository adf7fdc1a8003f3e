"""Helpers shared by test modules: loading a file afresh as a module, polling until done."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (in CI's run from the sdist: the unpacked sdist)."""


def load_module(path: Path, monkeypatch: pytest.MonkeyPatch, name: str | None = None) -> ModuleType:
    """Import the file at *path* afresh, as module *name* (by default the file's stem).

    Every call executes the file again, so module-level apps, buses and lists start empty.
    The module is in ``sys.modules`` under *name* for the test only: whatever imports it by
    that name meanwhile (a worker's ``module:app`` target, say) gets this copy.
    """
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll *condition* until it holds: for work that threads or unawaited tasks do."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


async def until(probe: Callable[[], object], timeout: float = 10.0) -> None:
    """Await until *probe* returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"timed out after {timeout}s"
        await asyncio.sleep(0.02)
