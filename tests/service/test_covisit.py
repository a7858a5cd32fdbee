"""The co-visitation contract: values, the recency-weighted score, the neighbour cache."""

from __future__ import annotations

import msgpack
import pytest

from service.contracts.covisit import (
    CovisitError,
    NeighbourCache,
    Neighbours,
    covisit_scores,
    recent_items,
    top_scored,
)


def test_neighbours_round_trip_and_corrupt_values_are_refused() -> None:
    value = Neighbours(("b", "c"), (3.0, 0.5))
    assert Neighbours.decode(value.encode()) == value
    for raw in (b"\xc1garbage", msgpack.packb({"v": 2, "i": [], "s": []}), msgpack.packb([1])):
        with pytest.raises(CovisitError):
            Neighbours.decode(raw)
    with pytest.raises(CovisitError, match="differ in length"):
        Neighbours.decode(msgpack.packb({"v": 1, "i": ["a"], "s": []}))


def test_score_weights_the_newest_items_most_and_skips_excluded() -> None:
    table = {
        "x": Neighbours(("a", "b"), (4.0, 2.0)),
        "y": Neighbours(("a", "x"), (2.0, 8.0)),
        "z": Neighbours(("c",), (100.0,)),
    }
    # newest last: y (weight 1), x (1/2); z is the fourth newest distinct item: not counted
    history = ["z", "q", "x", "y", "y"]
    assert recent_items(history) == ["y", "x", "q"]
    scores = covisit_scores(history, table, exclude=set(history))
    assert scores == {"a": 2.0 + 0.5 * 4.0, "b": 0.5 * 2.0}
    assert top_scored(scores, 1) == ["a"]
    assert top_scored({"b": 1.0, "a": 1.0}, 2) == ["a", "b"]  # ties by id: deterministic


def test_cache_is_bounded_least_recently_used_and_per_snapshot() -> None:
    cache = NeighbourCache(capacity=2)
    one, two = Neighbours(("a",), (1.0,)), Neighbours(("b",), (1.0,))
    cache.put("s1", "i1", one)
    cache.put("s1", "i2", two)
    assert cache.get("s1", "i1") == one  # i1 is now the most recent
    cache.put("s1", "i3", two)
    assert cache.get("s1", "i2") is None and cache.get("s1", "i1") == one
    assert cache.get("s2", "i1") is None  # another snapshot, another table
    assert len(cache) == 2
    off = NeighbourCache(capacity=0)
    off.put("s", "i", one)
    assert off.get("s", "i") is None
