"""Run the worker example on one machine: moto's SQS, the web app, and a worker process.

Run it: ``python -m examples.worker.demo`` (needs ``pip install 'moto[server]'``). It
starts moto's SQS server on 127.0.0.1 and creates a queue, serves the web app of
``examples/worker/app.py`` with uvicorn, starts a worker in another process
(``python -m fastapi_eventbus worker ...``, the same as the ``fastapi-eventbus``
command), places three orders over HTTP, waits for the worker's receipts, then
stops the worker with SIGTERM: it finishes what it is doing and exits 0.
"""

import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


async def create_queue(name: str) -> str:
    """Create the queue *name* on the endpoint botocore is configured with; return its URL."""
    from aiobotocore.session import AioSession

    async with AioSession().create_client("sqs") as sqs:
        return (await sqs.create_queue(QueueName=name))["QueueUrl"]


def receipts(db: str, count: int, timeout: float = 30.0) -> list[tuple[int, str, int]]:
    """Wait until the workers wrote *count* receipts; return them."""
    deadline = time.monotonic() + timeout
    rows: list[tuple[int, str, int]] = []
    while len(rows) < count and time.monotonic() < deadline:
        time.sleep(0.1)
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT order_id, email, pid FROM receipts").fetchall()
        conn.close()
    return sorted(rows)


def main() -> None:
    """Start everything, place orders, print what the worker did, stop it."""
    import httpx
    import uvicorn
    from moto.server import ThreadedMotoServer

    from examples.worker.app import create_app

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    tmp = tempfile.mkdtemp()
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",  # moto accepts any credentials
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL_SQS=f"http://{host}:{port}",  # botocore's own variable
        ORDERS_DB=f"{tmp}/orders.sqlite3",
    )
    os.environ["ORDERS_QUEUE_URL"] = asyncio.run(create_queue("orders"))
    print(f"moto SQS on http://{host}:{port}, queue {os.environ['ORDERS_QUEUE_URL']}")

    app = "examples.worker.app:create_worker_app"
    queue = os.environ["ORDERS_QUEUE_URL"]
    options = ["--factory", "--sqs", queue, "--wait-time", "1", "--log-level", "warning"]
    worker = subprocess.Popen(
        [sys.executable, "-m", "fastapi_eventbus", "worker", app, *options], cwd=ROOT
    )
    server = uvicorn.Server(uvicorn.Config(create_app(), port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    app_port = server.servers[0].sockets[0].getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{app_port}") as client:
        for item in ("book", "lamp", "kettle"):
            response = client.post("/orders", json={"item": item, "email": "ada@example.com"})
            print(f"POST /orders {item!r} -> {response.status_code} {response.json()}")
    for order_id, email, pid in receipts(os.environ["ORDERS_DB"], 3):
        where = "the worker" if pid == worker.pid else f"process {pid}"
        print(f"receipt for order {order_id} to {email}, written by {where}")
    worker.send_signal(signal.SIGTERM)
    print(f"worker stopped with exit code {worker.wait(timeout=30)}")
    server.should_exit = True
    thread.join(timeout=10)
    moto.stop()


if __name__ == "__main__":
    main()
