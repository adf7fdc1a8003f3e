"""Wildcard patterns: fnmatch semantics, several per handler, registration order."""

import sys

import pytest

from fastapi_eventbus import ConfigurationError, Event, EventBus
from fastapi_eventbus._patterns import PatternIndex


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("cat*", ["cat", "cat.created", "category"], ["dog", "a.cat"]),
        ("*", ["a", "cat.created", "x.y.z"], []),
        ("order.*", ["order.placed", "order.a.b"], ["order", "orders.placed"]),
        ("[ab]*", ["a", "bcd"], ["c", "A"]),
        ("order.?", ["order.1"], ["order.12"]),
        ("Cat.created", ["Cat.created"], ["cat.created"]),
    ],
)
def test_fnmatch_semantics(pattern: str, matches: list[str], misses: list[str]) -> None:
    index: PatternIndex[str] = PatternIndex()
    index.add([pattern], "h")
    for name in matches:
        assert index.match(name) == ("h",), name
    for name in misses:
        assert index.match(name) == (), name


def test_registration_order_and_each_handler_once() -> None:
    index: PatternIndex[str] = PatternIndex()
    index.add(["order.*", "order.placed"], "both patterns")
    index.add(["*"], "everything")
    index.add(["order.placed"], "exact")
    index.add(["cat.*"], "cats")
    assert index.match("order.placed") == ("both patterns", "everything", "exact")
    assert index.match("cat.created") == ("everything", "cats")


def test_registering_invalidates_the_cache() -> None:
    index: PatternIndex[str] = PatternIndex()
    index.add(["a*"], "first")
    assert index.match("abc") == ("first",)
    index.add(["*c"], "second")
    assert index.match("abc") == ("first", "second")


def test_hundreds_of_patterns_and_a_bounded_cache() -> None:
    index: PatternIndex[int] = PatternIndex()
    for i in range(500):
        index.add([f"service{i}.*", f"exact.{i}"], i)
    assert index.match("service42.created") == (42,)
    assert index.match("exact.499") == (499,)
    for i in range(10_000):
        index.match(f"unknown.{i}")
    assert len(index._cache) <= 4096


def test_the_cache_is_bounded_in_bytes_too() -> None:
    # Names decoded by a worker are not limited to what emit allows: 200 names of a
    # megabyte each once stayed cached (188 MB).
    index: PatternIndex[str] = PatternIndex()
    index.add(["big.*"], "h")
    for i in range(200):
        assert index.match(f"big.{i}." + "x" * 1_000_000) == ("h",)
    assert sum(sys.getsizeof(name) for name in index._cache) <= 1024 * 1024
    for i in range(5000):
        assert index.match(f"big.{i}." + "y" * 1000) == ("h",)
    cached = sum(sys.getsizeof(name) for name in index._cache)
    assert cached <= 1024 * 1024
    assert cached <= index.cache_bytes <= 1024 * 1024  # its own count is not an underestimate
    assert 0 < len(index._cache) < 1024 * 1024 // 1000
    assert index.match("big.last") == ("h",)  # still caching: the newest names stay
    assert "big.last" in index._cache


def test_registering_empties_the_cache_and_its_byte_count() -> None:
    index: PatternIndex[str] = PatternIndex()
    index.add(["a*"], "first")
    index.match("abc")
    assert index.cache_bytes > 0
    index.add(["b*"], "second")
    assert (len(index._cache), index.cache_bytes) == (0, 0)


@pytest.mark.parametrize("pattern", ["", 3, None])
def test_bad_patterns_fail_at_decoration(pattern: object) -> None:
    bus = EventBus()
    with pytest.raises(ConfigurationError, match="non-empty str"):
        bus.on(pattern)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_several_patterns_on_one_handler() -> None:
    bus = EventBus()
    seen: list[str] = []

    @bus.on("cat.*", "dog.*")
    async def pets(event: Event) -> None:
        seen.append(event.name)

    for name in ("cat.created", "dog.created", "bird.created"):
        await bus.publish(name)
    assert seen == ["cat.created", "dog.created"]
