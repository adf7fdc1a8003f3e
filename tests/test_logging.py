"""The library's log lines are readable where the application configured no logging (plain
uvicorn configures only its own loggers): level, logger name and time, never Python's bare
last-resort line; and printed once when the application did configure logging."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import httpx

from tests._support import ROOT
from tests.shutdown_app import HANDLED_ENV, KIND_ENV, REPORTED_ENV, SHUTDOWN_TIMEOUT
from tests.test_faults import running_server, stop

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


def test_the_documented_uvicorn_log_config_shows_level_logger_and_time(tmp_path: Path) -> None:
    """docs/delivery.md, "Logging": ``uvicorn --log-config docs/examples/uvicorn_log_config.json``
    (a hung handler, reported by id at shutdown)."""
    handled, reported = tmp_path / "handled", tmp_path / "reported"
    env = {KIND_ENV: "hung", HANDLED_ENV: str(handled), REPORTED_ENV: str(reported)}
    config = str(ROOT / "docs/examples/uvicorn_log_config.json")
    log = tmp_path / "server.log"
    with running_server(
        env, log, "--log-config", config, app="tests.shutdown_app:create_app"
    ) as server:
        with httpx.Client(base_url=server.url) as client:
            [event_id] = client.post("/orders", params={"n": 1}).json()["ids"]
        stop(server, within=SHUTDOWN_TIMEOUT + 10)
        lines = [line for line in server.output().splitlines() if event_id in line]
    [line] = lines
    date, clock, level, name, *_ = line.split()
    assert (level, name) == ("ERROR:", "fastapi_eventbus:")
    assert len(date) == 10
    assert clock.count(":") == 2
