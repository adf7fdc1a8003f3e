"""Every piece of Python in the docs is a tested file, embedded with a snippet include.

A fenced code block in ``docs/**/*.md`` is either

- Python (``python``, ``py``, ``python3``, ``py3``, ``pycon``), and then holds nothing but
  ``--8<-- "path[:section]"`` includes of files under ``examples/``, ``docs/examples/`` or
  ``tests/`` (a test shown as an example is tested by being one); or
- one of the languages in `INLINE`, which are not Python and could not be run as an example
  module anyway: written inline, or included.

Every ``.py`` file the docs include is named by a file under ``tests/``: by its path
(``"docs/examples/delivery.py"``, what a test loads it by), by its module
(``examples.worker.app``, ``from examples import forward_pubsub``), or by its directory and
its quoted stem or file name in the same file (``EXAMPLES = ROOT / "docs/examples/migrating"``
with ``load("setup_eventbus")``). A test file included as an example counts as tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TESTS = ROOT / "tests"

PYTHON = {"python", "py", "python3", "py3", "pycon"}
INLINE = {
    "bash": "commands to type (pip install, the fastapi-eventbus CLI, aws and gcloud)",
    "text": "what a program prints or logs, error messages, diagrams",
    "json": "what goes over the wire (a CloudEvent as SQS carries it)",
}
"""Languages written inline, and why they need not be example modules."""
INCLUDE_ROOTS = ("examples/", "docs/examples/", "tests/")

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_INCLUDE = re.compile(r"""^\s*-{1,}8<-{1,}\s+(?P<quote>["'])(?P<spec>.+)(?P=quote)\s*$""")
_INCLUDE_BLOCK = re.compile(r"^\s*-{1,}8<-{1,}\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a docs page."""

    where: str
    language: str
    lines: tuple[str, ...]

    def includes(self) -> list[str] | None:
        """The include specs, if the block holds nothing but includes (else None)."""
        specs: list[str] = []
        in_block = False
        for line in self.lines:
            if not line.strip():
                continue
            if _INCLUDE_BLOCK.match(line):
                in_block = not in_block
            elif match := _INCLUDE.match(line):
                specs.append(match["spec"])
            elif in_block:
                specs.append(line.strip())
            else:
                return None
        return specs or None


def _blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence = opening["fence"]
        info = opening["info"].strip().lstrip("{").lstrip(".")
        language = re.split(r"[\s}]", info, maxsplit=1)[0].lower() if info else ""
        end = index + 1
        while end < len(lines):
            closing = _FENCE.match(lines[end])
            if closing and closing["fence"].startswith(fence) and not closing["info"].strip():
                break
            end += 1
        found.append(
            Block(f"{page.relative_to(ROOT)}:{index + 1}", language, tuple(lines[index + 1 : end]))
        )
        index = end + 1
    return found


@cache
def pages() -> tuple[Path, ...]:
    return tuple(
        page for page in sorted(DOCS.rglob("*.md")) if not page.is_relative_to(DOCS / "examples")
    )


@cache
def blocks() -> tuple[Block, ...]:
    return tuple(block for page in pages() for block in _blocks(page))


@cache
def included_files() -> tuple[str, ...]:
    """Every file an include in a code block names, as a path from the repository root."""
    paths = {spec.split(":", 1)[0] for block in blocks() for spec in block.includes() or ()}
    return tuple(sorted(paths))


def test_the_docs_have_code_blocks() -> None:
    assert pages()
    assert any(block.language in PYTHON for block in blocks())


@pytest.mark.parametrize("block", blocks(), ids=lambda block: block.where)
def test_a_code_block_is_an_include_or_an_allowed_language(block: Block) -> None:
    if block.language in PYTHON:
        assert block.includes(), (
            f"{block.where}: a {block.language} block must be a --8<-- include of an example "
            f"file under {', '.join(INCLUDE_ROOTS)} (move its code into one, and test it)"
        )
    else:
        assert block.language in INLINE, (
            f"{block.where}: code block language {block.language or '(none)'!r} is neither "
            f"Python (an include) nor one of {sorted(INLINE)}"
        )


@pytest.mark.parametrize("block", blocks(), ids=lambda block: block.where)
def test_an_include_names_an_existing_example_and_section(block: Block) -> None:
    for spec in block.includes() or ():
        path, _, section = spec.partition(":")
        assert path.startswith(INCLUDE_ROOTS), f"{block.where}: {path} is not an example file"
        assert ".." not in Path(path).parts, f"{block.where}: {path} leaves its directory"
        file = ROOT / path
        assert file.is_file(), f"{block.where}: {path} does not exist"
        if section and not re.fullmatch(r"[\d:-]+", section):  # a named section, not lines
            text = file.read_text()
            for marker in (f"[start:{section}]", f"[end:{section}]"):
                assert marker in text, f"{block.where}: {path} has no {marker}"


def _referenced_by_tests(path: str) -> bool:
    if path.startswith("tests/") and Path(path).name.startswith("test_"):
        return True  # a test shown as an example
    module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    parent, _, name = module.rpartition(".")
    patterns = [re.escape(path), rf"\b{re.escape(module)}\b"]
    if parent:
        patterns.append(rf"from\s+{re.escape(parent)}\s+import\s+[^\n]*\b{re.escape(name)}\b")
    reference = re.compile("|".join(patterns))
    # Or a loader given a directory, then stems or file names: both quoted in the test.
    directory = re.compile(rf"[\"'/]{re.escape(str(Path(path).parent))}[\"'/]")
    stem = re.compile(rf"[\"']{re.escape(Path(path).stem)}(\.py)?[\"']")
    this = Path(__file__).resolve()
    for test in sorted(TESTS.rglob("*.py")):
        if test.resolve() == this:
            continue
        text = test.read_text()
        if reference.search(text) or (directory.search(text) and stem.search(text)):
            return True
    return False


def test_every_included_python_file_is_tested() -> None:
    python_files = [path for path in included_files() if path.endswith(".py")]
    assert python_files
    untested = [path for path in python_files if not _referenced_by_tests(path)]
    assert untested == [], "included in the docs, but no file under tests/ loads or names it"
