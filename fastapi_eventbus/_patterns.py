"""Wildcard patterns (fnmatch semantics) mapped to the things registered for them."""

from __future__ import annotations

import fnmatch
import glob
import re
import string
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from pydantic import BaseModel

from ._events import check_name, event_name_of, plain_str
from .exceptions import ConfigurationError, InvalidEventError

T = TypeVar("T")

_WILDCARDS = frozenset("*?[")
_CACHE_LIMIT = 4096
"""Event names whose lookups are cached, at most."""
_CACHE_BYTES = 1024 * 1024
"""Memory the cached names and results may take, at most. The name count alone let
names of a megabyte each (from a broker: names decoded by a worker are not limited to
the length `emit` allows) keep gigabytes."""
_ENTRY_OVERHEAD = 120
"""Bytes of one cache entry besides its name: its dict slot and the result tuple."""

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


_ORDINARY = string.ascii_lowercase + string.digits + string.ascii_uppercase + string.punctuation
"""Characters `example_name` tries for a negated class, in order (then a non-ASCII one)."""

_WILDCARD = re.compile(_CLASS.pattern + r"|\*+|\?")
"""A wildcard of a pattern: a character class, a run of stars, or a question mark."""


def example_name(pattern: str) -> str:
    """A name *pattern* matches, as ordinary and as short as its literal text allows.

    ``?`` becomes a plain letter, a class one of its members that is printable and
    not whitespace, and ``*`` nothing, except a letter at either end where the
    name would otherwise begin or end with whitespace (or be empty). So if this
    name is refused at ``emit`` (whitespace around it, a control character, text
    UTF-8 cannot encode, too long), every name the pattern matches is: the
    pattern can never match an event.
    """

    def ordinary(match: re.Match[str]) -> str:
        text = match[0]
        if text[0] == "*":
            return ""
        if text == "?":
            return "a"
        negated, members = match.groups()
        if negated:  # the first ordinary character the class takes
            allowed = f"[!{members}]"
            return next((c for c in _ORDINARY if fnmatch.fnmatchcase(c, allowed)), "\u00e9")
        usable = (c for c in members if c.isprintable() and not c.isspace() and c != "-")
        return next(usable, members[:1] or "a")

    name = _WILDCARD.sub(ordinary, pattern)
    if pattern[:1] == "*" and (not name or name[0].isspace()):
        name = "a" + name
    if pattern[-1:] == "*" and name[-1:].isspace():  # a final "*" is never in a class
        name += "a"
    return name


class PatternIndex(Generic[T]):
    """Items registered under patterns, looked up by event name in registration order.

    Lookups are cached per event name, so the cost of hundreds of patterns is paid
    once per distinct name. The cache is bounded in names and in bytes: the oldest
    names are forgotten first.
    """

    __slots__ = (
        "_anywhere",
        "_cache",
        "_cache_bytes",
        "_entries",
        "_exact",
        "_lock",
        "_patterns",
        "_prefix_lengths",
        "_prefixed",
        "size",
    )

    def __init__(self) -> None:
        self._entries: list[tuple[tuple[Matcher, ...], T]] = []
        self._patterns: list[tuple[str, ...]] = []
        self._exact: dict[str, list[int]] = {}
        """Patterns without wildcards: the entries (by position) registered under each."""
        self._prefixed: dict[str, list[tuple[Matcher, int]]] = {}
        """Patterns with wildcards, by their literal text before the first one."""
        self._prefix_lengths: list[int] = []
        """The lengths of the keys of `_prefixed`, ascending."""
        self._anywhere: list[tuple[Matcher, int]] = []
        """Patterns that begin with a wildcard: tried for every name."""
        self._cache: dict[str, tuple[T, ...]] = {}
        self._cache_bytes = 0
        self._lock = threading.Lock()  # misses only: emits from sync handlers run in threads
        self.size = 0
        """How many items are registered (an attribute: the hot path reads it, not ``len``)."""

    def add(self, patterns: Iterable[str], item: T, replacing: T | None = None) -> None:
        """Register *item* under every pattern in *patterns*; *replacing*: an item registered
        already, whose place in the order and whose patterns *item* takes, with *patterns*."""
        names = tuple(patterns)
        matchers = tuple(compile_pattern(p) for p in names)
        if not matchers:
            raise ConfigurationError("at least one event pattern is required")
        entries = self._entries
        if replacing is None:
            position = len(entries)
            entries.append(((), item))
            self._patterns.append(())
        else:
            position = next(at for at, (_, it) in enumerate(entries) if it is replacing)
        for pattern, matcher in zip(names, matchers, strict=True):
            prefix = _literal_prefix(pattern)
            if prefix == pattern:
                self._exact.setdefault(pattern, []).append(position)
            elif not prefix:
                self._anywhere.append((matcher, position))
            else:
                self._prefixed.setdefault(prefix, []).append((matcher, position))
        self._prefix_lengths = sorted({len(prefix) for prefix in self._prefixed})
        entries[position] = (entries[position][0] + matchers, item)
        self._patterns[position] += names
        self.size = len(entries)
        with self._lock:
            self._cache.clear()
            self._cache_bytes = 0

    def __bool__(self) -> bool:
        return self.size > 0

    def match(self, name: str) -> tuple[T, ...]:
        """Every item whose patterns match *name*, each once, in registration order."""
        try:
            return self._cache[name]
        except KeyError:
            pass
        # Only the patterns that can match: the exact ones equal to the name, those
        # whose literal prefix the name starts with, and those starting with a wildcard.
        positions = set(self._exact.get(name, ()))
        candidates = list(self._anywhere)
        prefixed = self._prefixed
        for length in self._prefix_lengths:
            if length > len(name):
                break
            candidates += prefixed.get(name[:length], ())
        positions.update(position for matcher, position in candidates if matcher(name))
        entries = self._entries
        result = tuple(entries[position][1] for position in sorted(positions))
        self._remember(name, result)
        return result

    def _remember(self, name: str, result: tuple[T, ...]) -> None:
        """Cache *result* for *name*, forgetting the oldest names to stay within bounds."""
        size = _entry_size(name, result)
        if size > _CACHE_BYTES // 64:  # a huge name: matched again if it comes back
            return
        with self._lock:
            cache = self._cache
            if name in cache:  # another thread was first
                return
            while cache and (len(cache) >= _CACHE_LIMIT or self._cache_bytes + size > _CACHE_BYTES):
                oldest = next(iter(cache))
                self._cache_bytes -= _entry_size(oldest, cache.pop(oldest))
            cache[name] = result
            self._cache_bytes += size

    @property
    def cache_bytes(self) -> int:
        """Memory the cache's names and results take (an estimate, in bytes)."""
        return self._cache_bytes

    def items(self) -> list[T]:
        """Every registered item, in registration order."""
        return [item for _, item in self._entries]

    def entries(self) -> list[tuple[tuple[str, ...], T]]:
        """Every registered item with the patterns it was registered under, in order."""
        return [
            (patterns, item)
            for patterns, (_, item) in zip(self._patterns, self._entries, strict=True)
        ]


def _literal_prefix(pattern: str) -> str:
    """*pattern*'s text before its first wildcard: every name it matches starts with it."""
    for position, char in enumerate(pattern):
        if char in _WILDCARDS:
            return pattern[:position]
    return pattern


def _entry_size(name: str, result: tuple[object, ...]) -> int:
    """What caching *result* under *name* costs in memory (the items are shared)."""
    return sys.getsizeof(name) + 8 * len(result) + _ENTRY_OVERHEAD


def pattern_of(pattern: object) -> str:
    """*pattern* as given to `EventBus.on` or `EventBus.forward`, checked: a str pattern
    that can match some event name, or a typed event model (its name, escaped).

    Raises:
        ConfigurationError: Anything else, with what to write instead.
    """
    if isinstance(pattern, type) and issubclass(pattern, BaseModel):
        name = event_name_of(pattern)
        if name is None:
            raise ConfigurationError(f"{pattern.__qualname__} has no __event_name__ to match on")
        return glob.escape(check_name(name))
    if callable(pattern):  # @bus.on without parentheses: the handler came as the pattern
        raise ConfigurationError(
            f"an event pattern must be a str, got the callable {pattern!r}: write "
            '@bus.on("pattern") with parentheses (or @bus.on() for a typed event)'
        )
    if not isinstance(pattern, str) or not pattern:
        raise ConfigurationError(f"an event pattern must be a non-empty str, got {pattern!r}")
    try:
        check_name(example_name(pattern))
    except InvalidEventError as exc:  # emit refuses every name it could match
        raise ConfigurationError(f"the pattern {pattern!r} can never match: {exc}") from None
    return plain_str(pattern)
