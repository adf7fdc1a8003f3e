"""The library's log lines are readable where the application configured no logging (plain
uvicorn configures only its own loggers): level, logger name and time, never Python's bare
last-resort line; and printed once when the application did configure logging."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests._support import ROOT

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from fastapi_eventbus import Event, EventBus

    if sys.argv[1] == "configured":
        logging.basicConfig(format="APP %(levelname)s %(name)s %(message)s")
    app, bus = FastAPI(), EventBus()
    bus.install(app)

    @bus.on("x")
    async def broken(event: Event) -> None:
        raise RuntimeError("boom")

    with TestClient(app) as client:
        client.portal.call(bus.publish, "x")
    """
)


def run(mode: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return [line for line in result.stderr.splitlines() if "handler __main__.broken" in line]


def test_without_logging_config_lines_carry_level_logger_and_time() -> None:
    [line] = run("bare")
    date, clock, level, name, *_ = line.split()
    assert (level, name) == ("ERROR", "fastapi_eventbus:")
    assert len(date) == 10
    assert clock.count(":") == 2


def test_with_the_apps_logging_config_each_line_is_printed_once() -> None:
    [line] = run("configured")
    assert line.startswith("APP ERROR fastapi_eventbus handler __main__.broken failed")
