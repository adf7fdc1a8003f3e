"""Google's Pub/Sub emulator for the tests: started once per run by the root conftest.

`running_emulator` starts it on a free port (or calls `missing_peer` if it is not
installed or does not start); `Emulator.channel` creates a topic with a subscription.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx

from tests.conftest import missing_peer

PROJECT = "eventbus-tests"  # the emulator wants project ids of 6+ characters
EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
STARTUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Channel:
    """A topic and a subscription to it, on the emulator."""

    emulator: Emulator
    topic: str
    subscription: str

    def pull(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Pull (and ack) until *count* messages arrived or *timeout* passed."""
        url = self.emulator.rest(f"subscriptions/{self.subscription}")
        received: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(received) < count and time.monotonic() < deadline:
            body = {"maxMessages": min(count - len(received), 1000), "returnImmediately": True}
            items = httpx.post(f"{url}:pull", json=body, timeout=30).json().get("receivedMessages")
            if not items:
                time.sleep(0.05)
                continue
            ack = {"ackIds": [item["ackId"] for item in items]}
            httpx.post(f"{url}:acknowledge", json=ack).raise_for_status()
            received.extend(items)
        return received


@dataclass(frozen=True)
class Emulator:
    """A running Pub/Sub emulator."""

    host: str
    """``host:port``, what ``PUBSUB_EMULATOR_HOST`` would hold."""

    def rest(self, path: str) -> str:
        """The REST URL of *path* in the test project."""
        return f"http://{self.host}/v1/projects/{PROJECT}/{path}"

    def channel(self, *, ordered: bool = False) -> Channel:
        """Create a fresh topic with one subscription (ordered delivery if asked)."""
        suffix = uuid4().hex[:12]
        topic = f"projects/{PROJECT}/topics/topic-{suffix}"
        httpx.put(self.rest(f"topics/topic-{suffix}")).raise_for_status()
        subscription = {"topic": topic, "enableMessageOrdering": ordered}
        httpx.put(self.rest(f"subscriptions/sub-{suffix}"), json=subscription).raise_for_status()
        return Channel(self, topic, f"sub-{suffix}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _emulator_binary() -> Path | None:
    if EMULATOR.exists():
        return EMULATOR
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    sdk = Path(gcloud).resolve().parent.parent
    candidate = sdk / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
    return candidate if candidate.exists() else None


def _answers(port: int, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the emulator's whole process group (the launcher script runs java)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait()


@contextmanager
def running_emulator() -> Iterator[Emulator]:
    """Start Google's Pub/Sub emulator on a free port (or `missing_peer`); stop it after."""
    binary = _emulator_binary()
    if binary is None:
        missing_peer("Google's Pub/Sub emulator is not installed (gcloud's pubsub-emulator)")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        missing_peer("the Pub/Sub emulator needs Java, and none was found")
    port = free_port()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [str(binary), "--host=127.0.0.1", f"--port={port}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            if not _answers(port, process):
                log.seek(0)
                output = log.read()[-1500:].decode(errors="replace")
                missing_peer(f"the Pub/Sub emulator did not start in {STARTUP_TIMEOUT}s: {output}")
            yield Emulator(f"127.0.0.1:{port}")
        finally:
            _stop(process)
