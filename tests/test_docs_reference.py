"""The API reference (docs/reference/) covers the public surface, and the surface is documented.

Each page renders one public module with mkdocstrings (``::: module``) and lists its members
explicitly, so that a page shows its module's ``__all__`` and nothing else. A name a module
re-exports (the exceptions in ``fastapi_eventbus``, the SDK classes in ``forwarders`` and
``worker``) is documented once, on the page of the module that defines it.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import fastapi_eventbus
from tests._support import public_modules

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"
PACKAGE_DIR = Path(fastapi_eventbus.__file__).resolve().parent

NOT_IN_REFERENCE = {"fastapi_eventbus.cli"}
"""Public modules without a page: the command line is documented in docs/worker.md."""

_DIRECTIVE = re.compile(r"^:::\s+(?P<identifier>\S+)\s*$")
_MEMBER = re.compile(r"^\s+-\s+(?P<name>\S+)\s*$")


@dataclass(frozen=True)
class Directive:
    """One ``::: identifier`` block of a reference page, with its ``members:`` list if any."""

    where: str
    identifier: str
    members: tuple[str, ...] | None


def _parse(page: Path) -> list[Directive]:
    lines = page.read_text().splitlines()
    found: list[Directive] = []
    for number, line in enumerate(lines):
        if not (match := _DIRECTIVE.match(line)):
            continue
        block: list[str] = []
        for option in lines[number + 1 :]:
            if option.strip() and not option.startswith(" "):
                break
            block.append(option)
        members: list[str] | None = None
        for option in block:
            if option.strip() == "members:":
                members = []
            elif members is not None and (item := _MEMBER.match(option)):
                members.append(item["name"])
            elif members is not None and option.strip():
                break
        where = f"{page.relative_to(ROOT)}:{number + 1}"
        found.append(
            Directive(where, match["identifier"], None if members is None else tuple(members))
        )
    return found


@cache
def directives() -> tuple[Directive, ...]:
    return tuple(d for page in sorted(REFERENCE.glob("*.md")) for d in _parse(page))


def documented_modules() -> tuple[str, ...]:
    return tuple(sorted(set(public_modules()) - NOT_IN_REFERENCE))


def exported(module: ModuleType) -> list[str]:
    names: list[str] = module.__all__
    return names


# -- (a) every public name is on a page --------------------------------------------------


def test_the_reference_pages_exist() -> None:
    assert (REFERENCE / "index.md").is_file()
    assert directives(), "no ::: directive in docs/reference/*.md"


def test_no_directive_targets_a_private_module_or_object() -> None:
    private = [
        f"{d.where}: {d.identifier}"
        for d in directives()
        if any(part.startswith("_") for part in d.identifier.split("."))
    ]
    assert private == []


def test_every_public_module_has_exactly_one_page() -> None:
    targets = [d.identifier for d in directives()]
    assert sorted(targets) == sorted(set(targets)), "a module is rendered twice"
    assert sorted(targets) == list(documented_modules())


def test_the_exceptions_to_the_rule_are_current() -> None:
    modules = set(public_modules())
    assert modules >= NOT_IN_REFERENCE, "NOT_IN_REFERENCE names a module that is gone"


@pytest.mark.parametrize("directive", directives(), ids=lambda d: d.identifier)
def test_a_page_lists_only_names_from_its_modules_all(directive: Directive) -> None:
    # Without a members list mkdocstrings would also show public-looking names that are not
    # in __all__ (constants, type aliases); with one, it shows exactly the list.
    assert directive.members is not None, f"{directive.where}: give the members: list"
    module = importlib.import_module(directive.identifier)
    assert len(directive.members) == len(set(directive.members)), directive.where
    outside = set(directive.members) - set(exported(module))
    assert outside == set(), f"{directive.where}: not in {directive.identifier}.__all__"


def _rendered() -> list[tuple[str, str, Any]]:
    """(module, name, object) for every member a page renders."""
    return [
        (d.identifier, name, getattr(importlib.import_module(d.identifier), name))
        for d in directives()
        for name in d.members or ()
    ]


@pytest.mark.parametrize("module_name", documented_modules())
def test_every_name_in_all_is_rendered_once(module_name: str) -> None:
    module = importlib.import_module(module_name)
    rendered = _rendered()
    missing = []
    for name in exported(module):
        value = getattr(module, name)
        here = [(m, n) for m, n, v in rendered if v is value and (m, n) != (module_name, name)]
        if (module_name, name) in {(m, n) for m, n, _ in rendered}:
            # Rendered here: then nowhere else, or it would be documented twice.
            shared = inspect.isclass(value) or inspect.isroutine(value)
            assert not (shared and here), f"{module_name}.{name} is also rendered as {here}"
        elif not (inspect.isclass(value) or inspect.isroutine(value)) or not here:
            missing.append(name)
    assert missing == [], f"{module_name}.__all__ names not on any reference page"


# -- (b) every public name has a docstring ------------------------------------------------


def _own_doc(value: Any) -> str:
    """The docstring written for *value* itself: not inherited, not made up by dataclasses."""
    doc = vars(value).get("__doc__") if inspect.isclass(value) else value.__doc__
    if not isinstance(doc, str):
        return ""
    if inspect.isclass(value) and doc.startswith(f"{value.__name__}("):
        return ""  # the signature @dataclass writes when a class has no docstring
    return doc.strip()


def _public_classes_and_functions() -> list[tuple[str, Any]]:
    found = {}
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            if inspect.isclass(value) or inspect.isroutine(value):
                found[id(value)] = (f"{module_name}.{name}", value)
    return sorted(found.values(), key=lambda item: item[0])


@pytest.mark.parametrize("module_name", public_modules())
def test_every_public_module_has_a_docstring_and_an_all(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert (module.__doc__ or "").strip(), module_name
    assert isinstance(getattr(module, "__all__", None), list), module_name


def test_every_public_class_and_function_has_a_docstring() -> None:
    undocumented = [path for path, value in _public_classes_and_functions() if not _own_doc(value)]
    assert undocumented == []


def test_every_public_method_and_property_has_a_docstring() -> None:
    undocumented = []
    for path, cls in _public_classes_and_functions():
        if not inspect.isclass(cls):
            continue
        for name, member in vars(cls).items():
            if name.startswith("_"):
                continue
            if isinstance(member, staticmethod | classmethod):
                member = member.__func__
            routine = inspect.isfunction(member) or isinstance(member, property)
            if routine and not (member.__doc__ or "").strip():
                undocumented.append(f"{path}.{name}")
    assert undocumented == []


def test_every_public_constant_has_a_docstring() -> None:
    """Constants and type aliases carry their docstring in the source: ask Griffe for it."""
    griffe = pytest.importorskip("griffe")  # the docs extra
    package = griffe.load(
        fastapi_eventbus.__name__,
        search_paths=[str(PACKAGE_DIR.parent)],
        resolve_aliases=True,
        resolve_external=False,
    )
    undocumented = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        inner = module_name.removeprefix(fastapi_eventbus.__name__).removeprefix(".")
        loaded = package[inner] if inner else package
        for name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            if inspect.isclass(value) or inspect.isroutine(value):
                continue
            docstring = loaded[name].docstring
            if docstring is None or not docstring.value.strip():
                undocumented.append(f"{module_name}.{name}")
    assert undocumented == []


def test_the_docs_griffe_extension_links_names_and_hides_private_ones() -> None:
    """docs/_griffe/backtick_crossrefs.py, as mkdocs.yml loads it for the reference."""
    griffe = pytest.importorskip("griffe")  # the docs extra
    extension = ROOT / "docs" / "_griffe" / "backtick_crossrefs.py"
    package = griffe.load(
        fastapi_eventbus.__name__,
        search_paths=[str(PACKAGE_DIR.parent)],
        extensions=griffe.load_extensions(f"{extension}:BacktickCrossrefs"),
    )
    bus_doc = package["EventBus"].docstring.value
    link = '<autoref identifier="fastapi_eventbus._hooks.HandlerFailure" optional>'
    assert f"{link}`HandlerFailure`</autoref>" in bus_doc
    assert "``max_chain_depth``" in package["exceptions.EventChainError"].docstring.value
    capture_doc = package["testing.capture"].docstring.value
    assert "``handle=False``" in capture_doc  # double backticks stay code
    parameters = package["worker.sqs.SQSSource.__init__"].parameters
    assert str(parameters["max_messages"].default) == "10"  # not _MAX_MESSAGES
    assert package["Event.id"].value is None  # Field(default_factory=_ids.new_id)
