"""The examples are part of the product: import them and check what they claim."""

import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from examples.quickstart import create_app

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_handlers_see_the_committed_order(tmp_path: Path) -> None:
    app = create_app(tmp_path / "orders.sqlite3")
    with TestClient(app) as client:
        response = client.post("/orders", json={"item": "book", "email": "ada@example.com"})
        assert response.status_code == 201
        order_id = response.json()["id"]
        assert client.get("/audit").json() == [[order_id, "order.placed seen=1"]]
        assert client.get("/receipts").json() == [
            f"receipt for order {order_id} (book) to ada@example.com"
        ]


def test_quickstart_rejects_a_bad_body_without_emitting(tmp_path: Path) -> None:
    app = create_app(tmp_path / "orders.sqlite3")
    with TestClient(app) as client:
        assert client.post("/orders", json={"item": "book"}).status_code == 422
        assert client.get("/audit").json() == []


def test_quickstart_runs_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, "examples/quickstart.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "POST /orders 'kettle' -> 201" in result.stdout
    assert "[3, 'order.placed seen=1']" in result.stdout
    assert "receipt for order 3 (kettle) to ada@example.com" in result.stdout
