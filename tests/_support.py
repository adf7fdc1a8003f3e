"""Helpers shared by test modules: loading a file afresh as a module, polling until done,
noting when a response has been sent."""

from __future__ import annotations

import asyncio
import importlib.util
import pkgutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import fastapi_eventbus

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (in CI's run from the sdist: the unpacked sdist)."""


def _raise(name: str) -> None:
    raise  # pkgutil.walk_packages would otherwise skip a subpackage that fails to import


@cache
def public_modules() -> tuple[str, ...]:
    """The package and every module below it with no ``_``-prefixed part in its name, sorted."""
    below = pkgutil.walk_packages(fastapi_eventbus.__path__, "fastapi_eventbus.", onerror=_raise)
    public = (m.name for m in below if not any(p.startswith("_") for p in m.name.split(".")))
    return ("fastapi_eventbus", *sorted(public))


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


def on_response_sent(app: Any, note: Callable[[], object]) -> ASGIApp:
    """Wrap the ASGI *app*: call *note* the moment a response's last body chunk has been sent.

    What "handled after the response" is checked against: whatever *note* records then
    happened before the background tasks (and the bus's handlers) ran.
    """

    async def wrapped(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        async def send_and_note(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                note()

        await app(scope, receive, send_and_note)

    return wrapped


@dataclass
class ServerProcess:
    """A server (``python -m uvicorn ...``) running in a subprocess, logging to *log*."""

    process: subprocess.Popen[bytes]
    log: Path
    url: str

    def output(self) -> str:
        """What the server has logged so far (its stdout and stderr)."""
        return self.log.read_text(errors="replace")

    def started(self) -> bool:
        """Whether uvicorn said the application started; raises if the process exited."""
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited early:\n{self.output()}")
        return "Application startup complete" in self.output()
