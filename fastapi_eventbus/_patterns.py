"""Wildcard patterns (fnmatch semantics) mapped to the things registered for them."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from .exceptions import ConfigurationError

T = TypeVar("T")

_WILDCARDS = frozenset("*?[")
_CACHE_LIMIT = 4096

Matcher = Callable[[str], object]
"""Truthy when the name matches."""


def compile_pattern(pattern: object) -> Matcher:
    """A predicate for *pattern*; `fnmatch.fnmatchcase` rules (``*`` also matches dots)."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigurationError(f"an event pattern must be a non-empty str, got {pattern!r}")
    if _WILDCARDS.isdisjoint(pattern):
        return pattern.__eq__
    return re.compile(fnmatch.translate(pattern)).match  # a match, or None


_CLASS = re.compile(r"\[(!?)(\]?[^\]]*)\]")
"""A character class of a pattern: ``[abc]``, ``[!abc]``, ``[]a]``."""


def example_name(pattern: str) -> str:
    """A name *pattern* matches, as ordinary as its literal text allows.

    Each wildcard becomes a plain letter (a class, one of its members that is
    not whitespace), so that if this name is refused at ``emit`` (whitespace
    around it, text UTF-8 cannot encode), every name the pattern matches is:
    the pattern can never match an event.
    """

    def member(match: re.Match[str]) -> str:
        negated, members = match.groups()
        if negated:
            return next(c for c in "ax_0" if c not in members)
        return next((c for c in members if not c.isspace() and c != "-"), members[:1] or "a")

    return _CLASS.sub(member, pattern).replace("*", "a").replace("?", "a")


class PatternIndex(Generic[T]):
    """Items registered under patterns, looked up by event name in registration order.

    Lookups are cached per event name (bounded), so the cost of hundreds of
    patterns is paid once per distinct name.
    """

    __slots__ = ("_cache", "_entries", "_patterns")

    def __init__(self) -> None:
        self._entries: list[tuple[tuple[Matcher, ...], T]] = []
        self._patterns: list[tuple[str, ...]] = []
        self._cache: dict[str, tuple[T, ...]] = {}

    def add(self, patterns: Iterable[str], item: T) -> None:
        """Register *item* under every pattern in *patterns*."""
        names = tuple(patterns)
        matchers = tuple(compile_pattern(p) for p in names)
        if not matchers:
            raise ConfigurationError("at least one event pattern is required")
        self._entries.append((matchers, item))
        self._patterns.append(names)
        self._cache.clear()

    def __bool__(self) -> bool:
        return bool(self._entries)

    def match(self, name: str) -> tuple[T, ...]:
        """Every item whose patterns match *name*, each once, in registration order."""
        try:
            return self._cache[name]
        except KeyError:
            pass
        found: list[T] = []
        for matchers, item in self._entries:
            for matcher in matchers:
                if matcher(name):
                    found.append(item)
                    break
        cache = self._cache
        if len(cache) >= _CACHE_LIMIT:  # forget the oldest name, not all of them
            del cache[next(iter(cache))]
        result = cache[name] = tuple(found)
        return result

    def items(self) -> list[T]:
        """Every registered item, in registration order."""
        return [item for _, item in self._entries]

    def entries(self) -> list[tuple[tuple[str, ...], T]]:
        """Every registered item with the patterns it was registered under, in order."""
        return [
            (patterns, item)
            for patterns, (_, item) in zip(self._patterns, self._entries, strict=True)
        ]
