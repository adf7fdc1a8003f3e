"""Griffe extension for the API reference: `Name` in a docstring links to Name's documentation.

The docstrings of fastapi_eventbus follow one convention: single backticks name a Python object
(`HandlerFailure`, `EventBus.handle`, `start`), double backticks quote code (``emit(name)``).
This extension turns each single-backticked name into an *optional* cross-reference, so the
docstrings stay plain text in ``help()`` and IDEs. A name is looked up as Python would from the
docstring's own scope (the object, then its class, module and package); failing that, among
the names the package's modules export in ``__all__``, if exactly one object has that name.

An optional reference that no page documents (a private helper) is rendered as the code it
was, without a warning; names that resolve to nothing (the standard library) are left as they
are. Fenced code blocks are left alone.

It also keeps implementation details out of the pages: a parameter whose default is a private
constant shows the constant's value, and neither an instance attribute (``self.x = x``) nor an
attribute whose value mentions a private name shows its value.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from griffe import (
    Alias,
    AliasResolutionError,
    Attribute,
    CyclicAliasError,
    Extension,
    Function,
    Module,
    Object,
)

_NAME = re.compile(r"(?<![`\w])`(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?P<call>\(\))?`(?!`)")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_PRIVATE = re.compile(r"(?<![\w.])_[A-Za-z]\w*")


class BacktickCrossrefs(Extension):
    """Rewrites the docstrings, defaults and values of the package being loaded, once loaded."""

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        exported = _exported(pkg)
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _link(obj.docstring.value, obj, pkg, exported)
            if isinstance(obj, Function):
                _show_private_defaults(obj)
            elif isinstance(obj, Attribute) and _hides_value(obj):
                obj.value = None


def _objects(obj: Object) -> Iterator[Object]:
    """*obj* and every object defined in it (not the names it imports)."""
    yield obj
    for member in obj.members.values():
        if not isinstance(member, Alias):
            yield from _objects(member)


def _exported(package: Module) -> dict[str, str]:
    """Canonical paths by name, for the names exactly one object is exported under."""
    paths: defaultdict[str, set[str]] = defaultdict(set)
    for module in _objects(package):
        if not isinstance(module, Module) or module.exports is None:
            continue
        for export in module.exports:
            name = str(export)
            member = module.members.get(name)
            try:
                if member is not None:
                    paths[name].add(member.canonical_path)
            except (AliasResolutionError, CyclicAliasError):
                continue
    return {name: next(iter(found)) for name, found in paths.items() if len(found) == 1}


def _link(text: str, scope: Object, package: Module, exported: dict[str, str]) -> str:
    def reference(match: re.Match[str]) -> str:
        path = _resolve(match["name"], scope, package, exported)
        if path is None:
            return match.group(0)
        return f'<autoref identifier="{path}" optional>{match.group(0)}</autoref>'

    lines = text.split("\n")
    fence: str | None = None
    for index, line in enumerate(lines):
        if match := _FENCE.match(line):
            marker = match.group(1)
            if fence is None:
                fence = marker
            elif marker.startswith(fence):
                fence = None
            continue
        if fence is None:
            lines[index] = _NAME.sub(reference, line)
    return "\n".join(lines)


def _lookup(name: str, scope: Object) -> Object | Alias | None:
    """What *name* is bound to in *scope* or a scope around it."""
    node: Object | None = scope
    while node is not None:
        if (found := node.members.get(name)) is not None:
            return found
        node = node.parent
    return None


def _resolve(name: str, scope: Object, package: Module, exported: dict[str, str]) -> str | None:
    """The canonical path of the object *name* means in *scope*, if it is one of the package's."""
    first, *rest = name.split(".")
    target: Object | Alias | None
    try:
        if first == package.name:
            target = package
        elif (target := _lookup(first, scope)) is None and first in exported:
            target = package.modules_collection.get_member(exported[first])
        for part in rest:
            if target is None:
                return None
            target = target.members.get(part)
        if target is None or (target.name.startswith("_") and not target.is_special):
            return None
        path = target.canonical_path
    except (AliasResolutionError, CyclicAliasError, KeyError):
        return None
    if path != package.name and not path.startswith(package.name + "."):
        return None  # another package's: no inventory to link to
    return path


def _hides_value(attribute: Attribute) -> bool:
    set_in_init = (
        "instance-attribute" in attribute.labels and "class-attribute" not in attribute.labels
    )
    return set_in_init or bool(_PRIVATE.search(str(attribute.value or "")))


def _show_private_defaults(function: Function) -> None:
    """Replace a default that names a private constant with the constant's value."""
    for parameter in function.parameters:
        default = str(parameter.default or "")
        if not _PRIVATE.fullmatch(default):
            continue
        constant = _lookup(default, function)
        if isinstance(constant, Attribute) and constant.value is not None:
            parameter.default = constant.value
