"""SIGTERM with a backlog of events, under real uvicorn processes: every event accepted is
handled or reported by id (an ERROR line and the ``on_discard``/``on_error`` hooks), and the
process exits within the bus's ``shutdown_timeout``, whether or not uvicorn cancels the
flushes (``--timeout-graceful-shutdown``) and whatever the handlers do.
"""

from __future__ import annotations

import concurrent.futures
import re
from pathlib import Path

import httpx
import pytest

from tests.shutdown_app import HANDLED_ENV, KIND_ENV, REPORTED_ENV, SHUTDOWN_TIMEOUT
from tests.test_faults import Server, handled_ids, running_server, stop

pytestmark = pytest.mark.slow

APP = "tests.shutdown_app:create_app"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def backlog(server: Server, requests: int, per_request: int) -> set[str]:
    """Emit *requests* times *per_request* events, concurrently; their ids."""
    with (
        httpx.Client(base_url=server.url, timeout=10) as client,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        answers = pool.map(
            lambda _: client.post("/orders", params={"n": per_request}), range(requests)
        )
        return {i for answer in answers for i in answer.raise_for_status().json()["ids"]}


@pytest.mark.parametrize("kind", ["async", "sync", "hung", "forwarding"])
@pytest.mark.parametrize("graceful", [None, 1], ids=["no-graceful-timeout", "graceful-1s"])
def test_sigterm_with_a_backlog_reports_every_unfinished_event(
    tmp_path: Path, kind: str, graceful: int | None, record_property: object
) -> None:
    handled, reported = tmp_path / "handled", tmp_path / "reported"
    env = {KIND_ENV: kind, HANDLED_ENV: str(handled), REPORTED_ENV: str(reported)}
    options = [] if graceful is None else ["--timeout-graceful-shutdown", str(graceful)]
    log = tmp_path / "server.log"
    with running_server(env, log, *options, app=APP) as server:
        emitted = backlog(server, requests=12, per_request=50)  # 10 s of work per request
        code, seconds = stop(server, within=SHUTDOWN_TIMEOUT + 15)
        output = server.output()
    done, told = set(handled_ids(handled)), handled_ids(reported)
    unaccounted = emitted - done - set(told)
    logged = set(UUID.findall("\n".join(line for line in output.splitlines() if "ERROR" in line)))
    print(
        f"\n{kind}, graceful={graceful}: {len(emitted)} emitted, {len(done)} handled, "
        f"{len(told)} reported, {len(unaccounted)} unaccounted; exit {code} in {seconds:.1f}s"
    )
    assert unaccounted == set(), output[-3000:]
    assert set(told) <= logged, "every reported id is in an ERROR line too"
    assert len(told) == len(set(told)), "each event reported once"
    # A sync handler's thread cannot be stopped: reported at the deadline, it may still finish
    # (one per flush at most); an async handler is stopped where it waits.
    assert len(done & set(told)) <= (12 if kind == "sync" else 0)
    # Bounded by the bus's own shutdown_timeout, or by uvicorn's graceful timeout if shorter.
    assert seconds < min(SHUTDOWN_TIMEOUT, graceful or SHUTDOWN_TIMEOUT) + 3
