"""The README's example is code a user will paste, and its commands are what CI runs."""

import re
from pathlib import Path

from fastapi.testclient import TestClient

from examples import hello
from fastapi_eventbus.testing import capture

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_the_readme_example_is_examples_hello() -> None:
    # The README shows it with single blank lines; the code is the same, line for line.
    block = re.search(r"```python\n(.*?)```", README, re.S)
    assert block is not None
    assert code_lines(block.group(1)) == code_lines((ROOT / "examples/hello.py").read_text())
    assert len(code_lines(block.group(1))) <= 15


def test_the_readme_example_handles_the_event_after_the_response() -> None:
    hello.outbox.clear()
    with TestClient(hello.app) as client, capture(hello.bus) as events:
        response = client.post("/cats")
    assert response.json() == {"id": 1}
    assert events.names == ["cat.created"]
    assert hello.outbox == ["welcome, cat 1"]


def test_the_readme_example_s_dependency_can_be_overridden() -> None:
    other: list[str] = []
    hello.app.dependency_overrides[hello.get_outbox] = lambda: other
    try:
        with TestClient(hello.app) as client:
            client.post("/cats")
    finally:
        hello.app.dependency_overrides.clear()
    assert other == ["welcome, cat 1"]


def test_the_readme_commands_are_the_ones_ci_runs() -> None:
    ci = (ROOT / ".ci/run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    install, test = commands[0], commands[1]
    assert install == (
        'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" '
        "&& .venv/bin/python examples/quickstart.py"
    )
    assert test == ".venv/bin/python -m pytest"
    assert test in ci.splitlines()


def test_the_readme_links_resolve() -> None:
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert missing == []
