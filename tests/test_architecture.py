"""The import rules of ``docs/architecture.md``, checked against the package's code.

The page's tables are the source: the module table's "May import" column is compared with
every import of every module (read with `ast`, imports inside functions and under
``if TYPE_CHECKING:`` included), and the third-party table says which modules may import
FastAPI's internals, click and the optional SDKs. Editing the code without the page (or the
page without the code) turns these tests red.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

import fastapi_eventbus

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(fastapi_eventbus.__file__).resolve().parent
"""The package under test: the source tree, or in CI's run against the wheel, the installed one."""
PAGE = ROOT / "docs" / "architecture.md"
ROOT_NAME = "fastapi_eventbus"
"""How the page names the package's ``__init__.py``; other modules are named relative to it."""

EVERYONE_MAY_IMPORT = {"exceptions"}
"""What the page says every module may import without listing it."""
BATCH_OWNER = "_bus"
BATCH_ATTRIBUTES = {"_core", "_batch"}
"""A bus view's private attributes, read nowhere but in `_bus`."""

_CODE = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class Import:
    """One import statement's target: a module of the package or a third-party module."""

    where: str
    """``path:line`` of the statement."""
    target: str
    """The package module (page naming) or the dotted third-party module."""
    names: tuple[str, ...]
    """The names a ``from`` import takes from a package module that are not submodules."""
    internal: bool
    lazy: bool
    """Inside a function or under ``if TYPE_CHECKING:``."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or ROOT_NAME


@cache
def modules() -> dict[str, Path]:
    """Every module of the package, by the name the page uses."""
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _base(module: str, level: int) -> list[str]:
    """The package a relative import of *level* dots in *module* starts from."""
    parts = [] if module == ROOT_NAME else module.split(".")
    if modules()[module].name != "__init__.py":
        parts = parts[:-1]
    return parts[: len(parts) - (level - 1)]


def _absolute(name: str) -> str | None:
    """The package module an absolute import names, or None for a third-party one."""
    if name == ROOT_NAME:
        return ROOT_NAME
    if name.startswith(ROOT_NAME + "."):
        return name[len(ROOT_NAME) + 1 :]
    return None


def _package_target(module: str, node: ast.ImportFrom) -> str | None:
    """The package module a ``from`` import reads from, or None for a third-party one."""
    if node.level:
        parts = _base(module, node.level) + (node.module.split(".") if node.module else [])
        return ".".join(parts) or ROOT_NAME
    return _absolute(node.module or "")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of *tree*, with whether it runs lazily."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append((node, lazy))
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            deferred = isinstance(node, ast.If) and _is_type_checking(node) and child in node.body
            visit(child, inner or deferred)

    visit(tree, False)
    return found


@cache
def imports(module: str) -> tuple[Import, ...]:
    """Every import in *module*."""
    path = modules()[module]
    found: list[Import] = []
    for node, lazy in _statements(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _absolute(alias.name)
                found.append(Import(where, target or alias.name, (), target is not None, lazy))
            continue
        target = _package_target(module, node)
        if target is None:  # `from fastapi import dependencies` imports fastapi.dependencies
            for alias in node.names:
                found.append(Import(where, f"{node.module}.{alias.name}", (), False, lazy))
            continue
        names: list[str] = []
        for alias in node.names:
            submodule = alias.name if target == ROOT_NAME else f"{target}.{alias.name}"
            if submodule in modules():
                found.append(Import(where, submodule, (), True, lazy))
            else:
                names.append(alias.name)
        if names:
            found.append(Import(where, target, tuple(names), True, lazy))
    return tuple(found)


def _table(heading: str) -> list[list[str]]:
    """The rows of the first table under *heading* on the page, as cell texts."""
    lines = PAGE.read_text().splitlines()
    start = lines.index(heading)
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert len(rows) > 2, f"no table under {heading!r} in {PAGE.name}"
    return rows[2:]  # the header and the |---| line


@cache
def allowed_imports() -> dict[str, set[str]]:
    """The module table: each module and the package modules it may import."""
    table: dict[str, set[str]] = {}
    for module, _owns, may_import in _table("## Modules"):
        names = _CODE.findall(module)
        assert len(names) == 1, f"{PAGE.name}: a row names one module, got {module!r}"
        table[names[0]] = set(_CODE.findall(may_import))
    return table


@cache
def sdk_homes() -> dict[str, tuple[set[str], bool]]:
    """The third-party table: each top module, where it may be imported, whether lazily."""
    homes: dict[str, tuple[set[str], bool]] = {}
    for imported, only_in, when in _table("## Third-party imports with one home"):
        assert when in {"at import", "lazily"}, f"{PAGE.name}: unknown 'When' {when!r}"
        for name in _CODE.findall(imported):
            homes[name] = (set(_CODE.findall(only_in)), when == "lazily")
    return homes


@cache
def core_and_brokers() -> tuple[set[str], set[str]]:
    """Rule 5: the core's modules (before "import none of") and the broker modules (after).

    ``X.*`` stands for the package ``X`` and every module in it.
    """
    text = PAGE.read_text()
    rule = text[text.index("5. **The core never imports") : text.index("\n6. ")]
    core, brokers = rule.split("import none of")
    expanded = {
        module
        for name in _CODE.findall(brokers)
        for module in modules()
        if module == name or (name.endswith(".*") and _is_within(module, name[:-2]))
    }
    return set(_CODE.findall(core)), expanded


def _is_within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _graph(module: str) -> set[str]:
    return {i.target for i in imports(module) if i.internal and i.target != module}


def test_the_page_lists_every_module_once() -> None:
    listed = list(allowed_imports())
    assert sorted(listed) == sorted(modules()), (
        f"{PAGE.name}'s module table and the package differ: "
        f"not on the page {sorted(set(modules()) - set(listed))}, "
        f"not in the package {sorted(set(listed) - set(modules()))}"
    )
    for names in allowed_imports().values():
        unknown = names - set(modules())
        assert not unknown, f"{PAGE.name}: 'May import' names no such module: {sorted(unknown)}"


@pytest.mark.parametrize("module", sorted(modules()))
def test_a_module_imports_only_what_the_page_allows(module: str) -> None:
    allowed = allowed_imports()[module] | EVERYONE_MAY_IMPORT
    extra = [f"{i.where}: {i.target}" for i in imports(module) if i.internal]
    extra = [line for line in extra if line.rsplit(": ", 1)[1] not in allowed | {module}]
    assert not extra, (
        f"{module} imports modules its row of {PAGE.name} does not list "
        f"(add them to 'May import' if the dependency is right): {extra}"
    )


@pytest.mark.parametrize("module", sorted(modules()))
def test_the_page_lists_no_import_the_code_no_longer_makes(module: str) -> None:
    stale = allowed_imports()[module] - _graph(module)
    assert not stale, f"{PAGE.name} says {module} imports {sorted(stale)}; it no longer does"


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_module_imports_another_modules_underscored_names(module: str) -> None:
    private = [
        f"{i.where}: from {i.target} import {name}"
        for i in imports(module)
        if i.internal and i.target != module
        for name in i.names
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
    ]
    assert not private, f"underscored names imported from another module: {private}"


def _bound_names(tree: ast.AST) -> set[str]:
    """Every name *tree* defines: functions, classes, variables, attributes it sets or
    lists in ``__slots__``, arguments."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Store):
            bound.add(node.id if isinstance(node, ast.Name) else node.attr)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif (  # a class's __slots__ defines the attributes it names
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets)
            and isinstance(node.value, ast.Tuple | ast.List)
        ):
            bound.update(
                e.value
                for e in node.value.elts
                if isinstance(e, ast.Constant) and isinstance(e.value, str)
            )
    return bound


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_module_reads_another_modules_underscored_attributes(module: str) -> None:
    """``x._name`` only where ``_name`` is defined: the module's own classes and functions.

    Attributes of third-party modules (``os._exit``) are not the package's business.
    """
    path = modules()[module]
    tree = ast.parse(path.read_text(), str(path))
    bound = _bound_names(tree)
    foreign = {
        (alias.asname or alias.name).split(".")[0]
        for node, _lazy in _statements(tree)
        if not (isinstance(node, ast.ImportFrom) and _package_target(module, node) is not None)
        for alias in node.names
        if not (isinstance(node, ast.Import) and _absolute(alias.name) is not None)
    }
    reached: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        if node.attr.startswith("__") and node.attr.endswith("__"):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in foreign:
            continue
        batch = node.attr in BATCH_ATTRIBUTES and module != BATCH_OWNER
        if batch or node.attr not in bound:
            reached.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not reached, f"{module} reads another module's underscored attributes: {reached}"


def test_the_third_party_homes_are_modules_of_the_package() -> None:
    for name, (homes, _lazy) in sdk_homes().items():
        assert homes <= set(modules()), f"{PAGE.name}: {name}'s homes {sorted(homes)} unknown"
    assert "fastapi.dependencies" in sdk_homes(), f"{PAGE.name} must say where FastAPI's are"


@pytest.mark.parametrize("module", sorted(modules()))
def test_third_party_imports_stay_in_their_home(module: str) -> None:
    wrong: list[str] = []
    eager: list[str] = []
    for i in imports(module):
        if i.internal:
            continue
        for name, (homes, lazily) in sdk_homes().items():
            if not _is_within(i.target, name):
                continue
            if module not in homes:
                wrong.append(f"{i.where}: {i.target} (only in {sorted(homes)})")
            elif lazily and not i.lazy:
                eager.append(f"{i.where}: {i.target}")
    assert not wrong, f"{module} imports what {PAGE.name} keeps elsewhere: {wrong}"
    assert not eager, (
        f"{module} imports an optional SDK at its top level; {PAGE.name} says lazily "
        f"(inside a function or under if TYPE_CHECKING:): {eager}"
    )


def test_importing_the_package_loads_no_optional_sdk() -> None:
    """Every module but `otel` imports without loading an SDK (beyond what FastAPI loads)."""
    lazy = sorted(name for name, (_homes, lazily) in sdk_homes().items() if lazily)
    names = [f"{ROOT_NAME}.{m}" for m in modules() if m not in {ROOT_NAME, "otel", "__main__"}]
    script = (
        "import sys, importlib, fastapi, starlette, pydantic\n"
        "before = set(sys.modules)\n"
        f"for name in {[ROOT_NAME, *names]!r}: importlib.import_module(name)\n"
        f"print(sorted({{m for m in set(sys.modules) - before if m.split('.')[0] in {lazy!r}}}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == "[]", f"importing the package loaded: {result.stdout}"


def test_the_core_never_imports_a_brokers_modules() -> None:
    core, brokers = core_and_brokers()
    assert core, f"{PAGE.name}: rule 5 lists no core module"
    assert brokers, f"{PAGE.name}: rule 5 lists no broker module"
    unknown = (core | brokers) - set(modules())
    assert not unknown, f"{PAGE.name}: rule 5 names no such module: {sorted(unknown)}"
    for module in sorted(core):
        assert not allowed_imports()[module] & brokers, (
            f"{PAGE.name} lets core module {module} import broker modules "
            f"{sorted(allowed_imports()[module] & brokers)} (rule 5)"
        )


def test_forwarders_and_workers_never_import_each_other() -> None:
    for module, allowed in allowed_imports().items():
        for mine, theirs in (("forwarders", "worker"), ("worker", "forwarders")):
            if _is_within(module, mine):
                crossing = sorted(name for name in allowed if _is_within(name, theirs))
                assert not crossing, f"{PAGE.name} lets {module} import {crossing} (rule 6)"


MAX_MODULE_LINES = 600
"""The size past which a module is split along a seam (the page's "The rules")."""


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_module_is_over_600_lines(module: str) -> None:
    lines = len(modules()[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, (
        f"{module} has {lines} lines, more than {MAX_MODULE_LINES}: split it along a seam "
        f"(a concern of its own, with a row on {PAGE.name})"
    )
