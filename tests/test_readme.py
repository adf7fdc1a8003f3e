"""The README's example is code a user will paste: run it."""

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(code.group(1), str(README), "exec"), namespace)
    client = TestClient(namespace["app"])  # type: ignore[arg-type]
    assert client.post("/cats").json() == {"ok": True}
    assert "sent: ['welcome, cat 1']" in capsys.readouterr().out
