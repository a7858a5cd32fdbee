from __future__ import annotations

import math

import numpy as np
import pytest

from offline.catalog.kmeans import (
    balanced_assign,
    balanced_kmeans,
    residual_quantize,
    resolve_collisions,
)
from offline.errors import InputError


def _blobs(n: int, d: int, centers: int, seed: int = 0) -> np.ndarray:
    """Unbalanced clusters: plain k-means would give very uneven cluster sizes."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centers, d)) * 4
    weights = rng.dirichlet(np.full(centers, 0.3))
    which = rng.choice(centers, size=n, p=weights)
    return (means[which] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize(("n", "k"), [(1000, 16), (1001, 10), (257, 256), (50, 7)])
def test_clusters_hold_at_most_ceil_n_over_k(n: int, k: int) -> None:
    x = _blobs(n, 8, centers=3)
    centroids, labels = balanced_kmeans(x, k, iters=10, seed=1)
    assert centroids.shape == (k, 8)
    assert labels.shape == (n,)
    assert labels.min() >= 0 and labels.max() < k
    assert np.bincount(labels, minlength=k).max() <= math.ceil(n / k)


def test_balanced_assign_respects_capacity_when_everyone_wants_one_cluster() -> None:
    x = np.zeros((10, 2), dtype=np.float32)
    centroids = np.array([[0, 0], [5, 5], [9, 9]], dtype=np.float32)
    labels, dist = balanced_assign(x, centroids, capacity=4)
    assert np.bincount(labels, minlength=3).tolist() == [4, 4, 2]
    assert dist.shape == (10,)
    assert (dist[labels == 0] == 0).all()


def test_fewer_points_than_clusters_gives_each_point_its_own() -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    centroids, labels = balanced_kmeans(x, 5, seed=0)
    assert len(set(labels.tolist())) == 3
    assert centroids.shape == (5, 2)


def test_same_seed_same_result_other_seed_differs() -> None:
    x = _blobs(600, 16, centers=5)
    c1, l1 = balanced_kmeans(x, 12, seed=3)
    c2, l2 = balanced_kmeans(x, 12, seed=3)
    _, l3 = balanced_kmeans(x, 12, seed=4)
    assert np.array_equal(l1, l2) and np.array_equal(c1, c2)
    assert not np.array_equal(l1, l3)


def test_residual_quantize_shapes_and_determinism() -> None:
    x = _blobs(500, 12, centers=4)
    codes, books, res = residual_quantize(x, 8, levels=3, seed=0, iters=5)
    assert codes.shape == (500, 3) and codes.dtype == np.int32
    assert [b.shape for b in books] == [(8, 12)] * 3
    assert res.shape == (500,)
    # Each level's balance holds.
    for level in range(3):
        assert np.bincount(codes[:, level], minlength=8).max() <= math.ceil(500 / 8)
    # The residual shrinks: the codes explain part of the vectors.
    assert res.mean() < np.einsum("ij,ij->i", x, x).mean()
    again, _, _ = residual_quantize(x, 8, levels=3, seed=0, iters=5)
    assert np.array_equal(codes, again)


def test_resolve_collisions_on_quantized_data_gives_unique_codes() -> None:
    x = _blobs(400, 8, centers=3, seed=5)
    codes, books, _ = residual_quantize(x, 8, seed=0, iters=5)
    assert len({tuple(c) for c in codes.tolist()}) < 400  # there is something to resolve
    resolved, stats = resolve_collisions(codes, x, books)
    assert len({tuple(c) for c in resolved.tolist()}) == 400
    assert stats.collisions_after == 0
    assert stats.moved + stats.spilled == stats.collisions_before > 0
    # Only the third token moves when no prefix is full; a and b never change for moved items.
    assert np.array_equal(resolved[:, 0], codes[:, 0])
    unchanged = (resolved == codes).all(axis=1)
    assert (~unchanged).sum() == stats.collisions_before


def _tiny_codebooks(k: int = 2) -> list[np.ndarray]:
    c1 = np.array([[0.0, 0.0], [100.0, 100.0]], dtype=np.float32)[:k]
    c2 = np.array([[0.0, 0.0], [0.0, 10.0]], dtype=np.float32)[:k]
    c3 = np.array([[0.0, 0.0], [1.0, 0.0]], dtype=np.float32)[:k]
    return [c1, c2, c3]


def test_collision_keeps_nearest_moves_next_and_spills_when_prefix_full() -> None:
    books = _tiny_codebooks()
    # Three items under (0, 0, 0) with k = 2: one keeps c=0, one takes c=1, one must spill.
    x = np.array([[0.0, 0.0], [0.9, 0.0], [0.2, 0.0], [100.0, 100.0]], dtype=np.float32)
    codes = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0]], dtype=np.int32)
    resolved, stats = resolve_collisions(codes, x, books)
    assert resolved[0].tolist() == [0, 0, 0]  # nearest to the c=0 centroid keeps it
    assert resolved[1].tolist() == [0, 0, 1]  # first loser (item order) takes the free c
    assert resolved[2].tolist()[:2] == [0, 1]  # (0, 0) is full: spilled to the other b
    assert resolved[3].tolist() == [1, 0, 0]
    assert (stats.collisions_before, stats.moved, stats.spilled, stats.collisions_after) == (
        2,
        1,
        1,
        0,
    )


def test_full_first_level_code_is_a_clear_error() -> None:
    books = _tiny_codebooks()
    x = np.zeros((5, 2), dtype=np.float32)
    codes = np.zeros((5, 3), dtype=np.int32)  # 5 items under a=0 but only 2 x 2 codes there
    with pytest.raises(InputError, match=r"all 4 codes under a=0 are taken"):
        resolve_collisions(codes, x, books)
