"""Forward ``order.*`` events to Google Cloud Pub/Sub, then read them back.

The shop emits ``order.placed`` for every order. After the response, the bus
publishes it to a Pub/Sub topic as a CloudEvent (binary mode: the payload in the
message data, the envelope in ``ce-*`` attributes), with the customer as the
ordering key.

Run it: ``python examples/forward_pubsub.py``. It starts Google's Pub/Sub
emulator on a free port (or uses the one ``PUBSUB_EMULATOR_HOST`` names), creates
a topic and a subscription, serves the shop with uvicorn, places a few orders
over HTTP, pulls the messages, prints the decoded events, and stops the emulator
it started. The emulator comes with the Google Cloud CLI
(``gcloud components install pubsub-emulator``) and needs Java.
"""

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from fastapi_eventbus import Event, EventBus, get_bus
from fastapi_eventbus.forwarders import DeadLetter, Retry
from fastapi_eventbus.forwarders.pubsub import PubSubForwarder
from fastapi_eventbus.wire import decode_message

PROJECT = "shop-example"  # the emulator accepts any project id of 6+ characters


class NewOrder(BaseModel):
    """The request body of ``POST /orders``."""

    customer: str
    item: str


# --8<-- [start:app]
def create_app(topic: str, emulator_host: str | None = None) -> FastAPI:
    """The shop; its ``order.*`` events go to the Pub/Sub *topic*.

    *emulator_host* (``"host:port"``) points the forwarder at an emulator;
    without it, ``PUBSUB_EMULATOR_HOST`` is used if set, else Google's API.
    """
    bus = EventBus(source="//shop.example.com/orders")
    app = FastAPI(title="forward_pubsub")
    bus.install(app)
    bus.forward(
        "order.*",
        PubSubForwarder(
            topic,  # "projects/PROJECT/topics/TOPIC"
            emulator_host=emulator_host,
            ordering_key=lambda event: event.payload["customer"],
        ),
    )

    @app.post("/orders", status_code=201)
    async def place_order(
        order: NewOrder, bus: Annotated[EventBus, Depends(get_bus)]
    ) -> dict[str, str]:
        event = bus.emit("order.placed", order.model_dump())  # published after the response
        return {"event_id": event.id}

    return app


# --8<-- [end:app]


# --8<-- [start:production]
UNDELIVERED: list[Event] = []


async def keep_undelivered(letter: DeadLetter) -> None:
    """The dead-letter callback: keep what Pub/Sub did not take, to replay it later."""
    UNDELIVERED.extend(letter.events)


def production_forwarder() -> PubSubForwarder:
    """A forwarder for the real service, with every setting that matters there."""
    return PubSubForwarder(
        "projects/my-shop/topics/orders",
        # A regional endpoint keeps messages with the same ordering key in one region.
        api_root="https://europe-west1-pubsub.googleapis.com/v1",
        # Credentials: without service_file, Application Default Credentials.
        service_file="/run/secrets/pubsub-publisher.json",
        ordering_key=lambda event: event.payload["customer"],
        timeout=5.0,  # per publish request
        retry=Retry(initial_delay=0.2, max_delay=5.0, total_timeout=60.0),  # tries for 60 s
        dead_letter=keep_undelivered,
        verify_on_start=True,  # a missing topic or bad credentials stop the app's startup
    )


# --8<-- [end:production]


# --8<-- [start:emulator]
EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")


def emulator_binary() -> Path:
    """Where the emulator's launcher is: the Debian package's path, or next to ``gcloud``."""
    gcloud = shutil.which("gcloud")
    candidates = [EMULATOR]
    if gcloud is not None:
        sdk = Path(gcloud).resolve().parent.parent
        candidates.append(sdk / "platform" / "pubsub-emulator" / "bin" / EMULATOR.name)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        "Google's Pub/Sub emulator is not installed: gcloud components install pubsub-emulator"
    )


@contextmanager
def pubsub_emulator(startup_timeout: float = 60.0) -> Iterator[str]:
    """Run the Pub/Sub emulator on a free local port; yield its ``host:port``.

    The emulator runs in its own process group, which is stopped on exit (the
    launcher script starts a Java process).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [str(emulator_binary()), "--host=127.0.0.1", f"--port={port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + startup_timeout
        while not _answers(f"http://127.0.0.1:{port}/"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the Pub/Sub emulator did not start (is Java installed?)")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def create_topic(emulator_host: str, name: str, *, ordered: bool = True) -> tuple[str, str]:
    """Create topic *name* and a subscription to it; return the topic path and the subscription."""
    rest = f"http://{emulator_host}/v1/projects/{PROJECT}"
    topic = f"projects/{PROJECT}/topics/{name}"
    httpx.put(f"{rest}/topics/{name}").raise_for_status()
    subscription = {"topic": topic, "enableMessageOrdering": ordered}
    httpx.put(f"{rest}/subscriptions/{name}-sub", json=subscription).raise_for_status()
    return topic, f"{name}-sub"


def pull(emulator_host: str, subscription: str, count: int, timeout: float = 10.0) -> list[Any]:
    """Pull and acknowledge up to *count* messages; return them as the pull returned them."""
    url = f"http://{emulator_host}/v1/projects/{PROJECT}/subscriptions/{subscription}"
    received: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        body = {"maxMessages": count - len(received), "returnImmediately": True}
        messages = httpx.post(f"{url}:pull", json=body).json().get("receivedMessages", [])
        if messages:
            ack = {"ackIds": [message["ackId"] for message in messages]}
            httpx.post(f"{url}:acknowledge", json=ack).raise_for_status()
        else:
            time.sleep(0.05)
        received.extend(messages)
    return received


# --8<-- [end:emulator]


def main() -> None:
    """Start the emulator, serve the shop, place orders, print what Pub/Sub received."""
    import uvicorn

    with ExitStack() as stack:
        host = os.environ.get("PUBSUB_EMULATOR_HOST")
        if not host:
            stack.callback(print, "stopped the Pub/Sub emulator")  # runs after it stopped
            host = stack.enter_context(pubsub_emulator())
            print(f"started the Pub/Sub emulator on {host}")
        topic, subscription = create_topic(host, f"orders-{uuid.uuid4().hex[:8]}")
        app = create_app(topic, emulator_host=host)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        orders = [("ada", "book"), ("bob", "lamp"), ("ada", "kettle")]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for customer, item in orders:
                response = client.post("/orders", json={"customer": customer, "item": item})
                print(f"POST /orders {item!r} -> {response.status_code}")
        for message in pull(host, subscription, len(orders)):
            event = decode_message(message)
            key = message["message"].get("orderingKey")
            print(f"pulled {event.name} key={key} data={event.payload} source={event.source}")
        server.should_exit = True
        thread.join(timeout=10)


if __name__ == "__main__":
    main()
