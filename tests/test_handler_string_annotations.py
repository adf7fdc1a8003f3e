"""Handlers in a module with ``from __future__ import annotations``: every annotation is a
string, which the bus resolves in the module of the code that wrote it, whatever kind of
callable the handler is (FastAPI 0.121 resolves a function's only)."""

from __future__ import annotations

import asyncio
import functools
from typing import Annotated

from fastapi import Depends

from fastapi_eventbus import Event, EventBus


async def answer() -> int:
    return 42


class Recorder:
    """A callable instance: its ``__call__``'s annotations are strings of this module."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    async def __call__(self, event: Event, value: Annotated[int, Depends(answer)]) -> None:
        self.seen.append((event.name, value))


async def record(
    seen: list[tuple[str, int]], event: Event, value: Annotated[int, Depends(answer)]
) -> None:
    seen.append((event.name, value))


def test_a_callable_instance_s_string_annotations_are_resolved() -> None:
    bus, recorder = EventBus(), Recorder()
    bus.on("cat.fed")(recorder)
    asyncio.run(bus.publish("cat.fed"))
    assert recorder.seen == [("cat.fed", 42)]


def test_a_partial_s_string_annotations_are_resolved() -> None:
    bus, seen = EventBus(), list[tuple[str, int]]()
    bus.on("cat.fed")(functools.partial(record, seen))
    asyncio.run(bus.publish("cat.fed"))
    assert seen == [("cat.fed", 42)]
