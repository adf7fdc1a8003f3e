"""Apps whose handlers misbehave, for the worker's process tests (``--factory`` each).

- `hung_app`: ``order.hangs`` waits forever, and its 1 s time limit cancels it;
  ``order.stubborn`` catches the cancellation and waits again, so nothing stops it.
- `blocking_app`: ``order.blocks`` is a sync handler that blocks its thread for an hour.
- `forward_only_app`: a web app's bus, with a forwarder and no handler at all.
- `dict_config_app`: configures logging at startup with ``logging.config.dictConfig``,
  which disables the loggers that exist and that it does not name.

Each handler logs ``started <event id>`` (logger ``tests.worker.stuck``) when it starts.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from fastapi_eventbus import Event, EventBus
from fastapi_eventbus.forwarders import EchoForwarder

logger = logging.getLogger("tests.worker.stuck")


def _app(bus: EventBus) -> FastAPI:
    app = FastAPI()
    bus.install(app)
    return app


def hung_app() -> FastAPI:
    """Two hung handlers with a 1 s time limit: one it cancels, one it cannot.

    The bus's ``shutdown_timeout`` bounds how long the lifespan waits, at exit, for the
    event whose handler never returns.
    """
    bus = EventBus(shutdown_timeout=2)

    @bus.on("order.hangs", timeout=1)
    async def hangs(event: Event) -> None:
        logger.info("started %s", event.id)
        await asyncio.Event().wait()

    bus.on("order.stubborn", timeout=1)(stubborn)
    return _app(bus)


async def stubborn(event: Event) -> None:
    """A handler that ignores its cancellation."""
    logger.info("started %s", event.id)
    while True:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            logger.info("ignoring the cancellation of %s", event.id)


def blocking_app() -> FastAPI:
    """A sync handler that blocks its thread (the default 60 s time limit)."""
    bus = EventBus()

    @bus.on("order.blocks")
    def blocks(event: Event) -> None:
        logger.info("started %s", event.id)
        time.sleep(3600)

    return _app(bus)


def stubborn_app() -> FastAPI:
    """A handler that ignores its cancellation, with a long time limit (60 s)."""
    bus = EventBus(shutdown_timeout=1)
    bus.on("order.stubborn", timeout=60)(stubborn)
    return _app(bus)


def loop_blocking_app() -> FastAPI:
    """An async handler that blocks the event loop itself (``time.sleep`` in ``async def``)."""
    bus = EventBus()

    @bus.on("order.blocks", timeout=1)
    async def blocks(event: Event) -> None:
        logger.info("started %s", event.id)
        time.sleep(3600)  # noqa: ASYNC251  # the mistake this app makes on purpose

    return _app(bus)


def slow_startup_app() -> FastAPI:
    """An app whose lifespan's startup blocks the event loop for 6 s (loading a model)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        time.sleep(6)  # noqa: ASYNC251  # synchronous startup work, as apps do
        yield

    app, bus = FastAPI(lifespan=lifespan), EventBus()
    bus.on("order.*")(lambda event: None)
    bus.install(app)
    return app


def forward_only_app() -> FastAPI:
    """The web side of an app: it forwards ``order.*`` and handles nothing."""
    bus = EventBus()
    bus.forward("order.*", EchoForwarder())
    return _app(bus)


def dict_config_app() -> FastAPI:
    """An app whose module configures logging its own way, as many do at import."""
    logging.config.dictConfig(
        {
            "version": 1,
            "formatters": {"plain": {"format": "%(levelname)s [%(name)s] %(message)s"}},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
            "root": {"level": "INFO", "handlers": ["stderr"]},
        }
    )
    bus = EventBus()
    bus.on("order.*")(lambda event: None)
    return _app(bus)
