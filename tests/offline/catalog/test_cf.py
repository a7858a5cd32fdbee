"""The collaborative part of catalog vectors: who bought what (SVD) and what follows what."""

from __future__ import annotations

import numpy as np
import pytest

from offline.catalog.cf import cf_vectors, count_interactions, transition_vectors
from offline.data import Sequences

GROUPS = 3
PER_GROUP = 4
ITEMS = [f"i{i}" for i in range(GROUPS * PER_GROUP)] + ["never-seen"]


def group_of(item: str) -> int:
    return int(item[1:]) // PER_GROUP


def walks(users: int = 60, seed: int = 0) -> Sequences:
    """Each user moves through the items of one group, in a random order."""
    rng = np.random.default_rng(seed)
    items = []
    for u in range(users):
        group = u % GROUPS
        order = rng.permutation(PER_GROUP) + group * PER_GROUP
        items.append([f"i{i}" for i in order] + ["not-in-catalog"])
    return Sequences(users=[f"u{u}" for u in range(users)], items=items)


def cosine(v: np.ndarray) -> np.ndarray:
    return v @ v.T  # rows are L2-normalised


def assert_grouped(vectors: np.ndarray) -> None:
    """Unit rows, one direction per group, groups orthogonal, no direction for the unseen item."""
    seen = vectors[: GROUPS * PER_GROUP]
    assert np.allclose(np.linalg.norm(seen, axis=1), 1.0, atol=1e-5)
    assert not vectors[-1].any()
    groups = [group_of(i) for i in ITEMS[:-1]]
    same = np.equal.outer(groups, groups)
    sim = cosine(seen)
    assert sim[same].min() > 0.99
    assert np.abs(sim[~same]).max() < 0.05


def test_transition_vectors_put_items_that_follow_one_another_together() -> None:
    vectors = transition_vectors(walks(), ITEMS, dim=GROUPS)
    assert vectors.shape == (len(ITEMS), GROUPS) and vectors.dtype == np.float32
    assert_grouped(vectors)


def test_transition_vectors_on_a_chain_follow_the_window() -> None:
    # Everyone walks the same chain i0 -> i1 -> ... -> i11. A chain's graph is bipartite: its
    # most negative eigenvalues are as large in magnitude as its positive ones, and their
    # eigenvectors give neighbours opposite signs; only the positive ones may be kept.
    chain = [f"i{i}" for i in range(GROUPS * PER_GROUP)]
    seqs = Sequences(users=["u"] * 20, items=[chain] * 20)
    step = cosine(transition_vectors(seqs, ITEMS, dim=8, window=1))
    steps3 = cosine(transition_vectors(seqs, ITEMS, dim=8, window=3))
    assert step[0, 1] > 0.9 and steps3[0, 1] > 0.9  # the next item is close
    assert steps3[0, 3] > step[0, 3] + 0.3  # three steps on: a neighbour only within window 3
    assert abs(steps3[0, 11]) < 0.1  # the far end is unrelated either way


def test_transition_vectors_are_deterministic() -> None:
    a = transition_vectors(walks(), ITEMS, dim=GROUPS, seed=3)
    b = transition_vectors(walks(), ITEMS, dim=GROUPS, seed=3)
    assert np.array_equal(a, b)


def test_transition_vectors_without_transitions_are_empty() -> None:
    singles = Sequences(users=["u1", "u2"], items=[["i1"], ["i2", "i2"]])
    assert transition_vectors(singles, ITEMS, dim=4).shape == (len(ITEMS), 0)


def test_cf_vectors_group_items_bought_by_the_same_users() -> None:
    counts = count_interactions(walks(), ITEMS)
    assert counts.unknown_interactions == 60 and counts.unknown_items == 1
    assert_grouped(cf_vectors(counts.matrix, dim=GROUPS))


@pytest.mark.parametrize("idf", [False, True])
def test_cf_vectors_are_deterministic(idf: bool) -> None:
    counts = count_interactions(walks(), ITEMS)
    a = cf_vectors(counts.matrix, dim=GROUPS, idf=idf)
    assert np.array_equal(a, cf_vectors(counts.matrix, dim=GROUPS, idf=idf))
