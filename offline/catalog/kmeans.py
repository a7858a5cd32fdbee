"""Balanced k-means and residual quantisation: OneRec's RQ-Kmeans tokenizer.

Level l clusters what levels < l left over (one codebook per level, shared by all parents); the
assignment step is capacity constrained (at most ceil(n / k) points per cluster) so that codes
spread over the codebook. ``resolve_collisions`` then gives every item a unique (a, b, c).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from offline.errors import InputError

MAX_CANDIDATES = 32  # clusters considered per point in the greedy capacity-constrained step
DEFAULT_ITERS = 20
_CHUNK_ROWS = 8192


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x, dtype=np.float64)


def _sq_dists(x: np.ndarray, x_sq: np.ndarray, c: np.ndarray, c_sq: np.ndarray) -> np.ndarray:
    """||x_i - c_j||^2 as (len(x), len(c)) float64, via ||x||^2 - 2 x.c + ||c||^2."""
    d = (x @ c.T).astype(np.float64)
    d *= -2.0
    d += x_sq[:, None]
    d += c_sq[None, :]
    np.maximum(d, 0.0, out=d)
    return d


def kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D^2 sampling); uniform picks once every point is covered."""
    n = len(x)
    x_sq = _sq_norms(x)
    centers = np.empty((k, x.shape[1]), dtype=x.dtype)
    idx = int(rng.integers(n))
    centers[0] = x[idx]
    d2 = np.maximum(x_sq - 2.0 * (x @ x[idx]) + x_sq[idx], 0.0)
    for j in range(1, k):
        cum = np.cumsum(d2)
        total = cum[-1]
        if total > 0:
            idx = min(int(np.searchsorted(cum, rng.random() * total, side="right")), n - 1)
        else:
            idx = int(rng.integers(n))
        centers[j] = x[idx]
        np.minimum(d2, np.maximum(x_sq - 2.0 * (x @ x[idx]) + x_sq[idx], 0.0), out=d2)
    return centers


def balanced_assign(
    x: np.ndarray, centroids: np.ndarray, capacity: int, x_sq: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Labels with at most ``capacity`` points per cluster, and each point's squared distance.

    Greedy over (point, cluster) pairs sorted by distance, each point's nearest
    min(k, 32) clusters only; a point whose candidates are all full goes to its nearest cluster
    with room.
    """
    n, k = len(x), len(centroids)
    if capacity * k < n:
        raise ValueError(f"capacity {capacity} x {k} clusters < {n} points")
    x_sq = _sq_norms(x) if x_sq is None else x_sq
    c_sq = _sq_norms(centroids)
    m = min(k, MAX_CANDIDATES)
    cand = np.empty((n, m), dtype=np.int64)
    cand_d = np.empty((n, m), dtype=np.float64)
    for lo in range(0, n, _CHUNK_ROWS):
        d = _sq_dists(x[lo : lo + _CHUNK_ROWS], x_sq[lo : lo + _CHUNK_ROWS], centroids, c_sq)
        idx = (
            np.argpartition(d, m - 1, axis=1)[:, :m]
            if m < k
            else np.broadcast_to(np.arange(k), d.shape)
        )
        cand[lo : lo + len(d)] = idx
        cand_d[lo : lo + len(d)] = np.take_along_axis(d, idx, axis=1)
    order = np.argsort(cand_d.ravel(), kind="stable")
    points = (order // m).tolist()
    clusters = cand.ravel()[order].tolist()
    labels = [-1] * n
    counts = [0] * k
    left = n
    for p, c in zip(points, clusters, strict=True):
        if labels[p] < 0 and counts[c] < capacity:
            labels[p] = c
            counts[c] += 1
            left -= 1
            if left == 0:
                break
    out = np.asarray(labels, dtype=np.int64)
    if left:
        rest = np.flatnonzero(out < 0)
        d = _sq_dists(x[rest], x_sq[rest], centroids, c_sq)
        room = np.asarray(counts)
        for i, p in enumerate(rest.tolist()):
            row = np.where(room < capacity, d[i], np.inf)
            c = int(np.argmin(row))
            out[p] = c
            room[c] += 1
    dist = np.maximum(x_sq - 2.0 * np.einsum("ij,ij->i", x, centroids[out]) + c_sq[out], 0.0)
    return out, dist


def _update(x: np.ndarray, labels: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Cluster means; empty clusters reseeded at the worst-served points. Returns (centroids,
    number reseeded)."""
    n = len(x)
    onehot = sp.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))
    sums = onehot @ x.astype(np.float64)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    centroids = sums / np.maximum(counts, 1.0)[:, None]
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        worst = np.argsort(-dist, kind="stable")
        for j, e in enumerate(empty.tolist()):
            centroids[e] = x[worst[j % n]]
    return centroids.astype(np.float32), len(empty)


def balanced_kmeans(
    x: np.ndarray, k: int, iters: int = DEFAULT_ITERS, seed: int | np.random.Generator = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (k, d) float32, labels (n,) int64); every cluster holds <= ceil(n / k) points.

    k-means++ init from ``seed``, then Lloyd iterations with the capacity-constrained assignment,
    stopping early once the labels no longer change. Deterministic for a seed.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if k < 1 or n < 1:
        raise ValueError(f"need k >= 1 and at least one point, got k={k}, n={n}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    capacity = math.ceil(n / k)
    x_sq = _sq_norms(x)
    centroids = kmeans_pp_init(x, k, rng)
    labels, dist = balanced_assign(x, centroids, capacity, x_sq)
    centroids, _ = _update(x, labels, dist, k)
    for _ in range(max(iters, 1) - 1):
        new_labels, dist = balanced_assign(x, centroids, capacity, x_sq)
        centroids, reseeded = _update(x, new_labels, dist, k)
        done = np.array_equal(new_labels, labels) and (reseeded == 0 or n < k)
        labels = new_labels
        if done:
            break
    return centroids, labels


def residual_quantize(
    x: np.ndarray, k: int, levels: int = 3, seed: int = 0, iters: int = DEFAULT_ITERS
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(codes (n, levels) int32, one (k, d) codebook per level, squared norm of the final residual).

    Level l runs balanced k-means on the residual left by levels < l.
    """
    residual = np.ascontiguousarray(x, dtype=np.float32).copy()
    codes = np.empty((len(residual), levels), dtype=np.int32)
    codebooks: list[np.ndarray] = []
    for level in range(levels):
        rng = np.random.default_rng([seed, level])
        centroids, labels = balanced_kmeans(residual, k, iters=iters, seed=rng)
        codes[:, level] = labels
        codebooks.append(centroids)
        residual -= centroids[labels]
    return codes, codebooks, _sq_norms(residual)


@dataclass(frozen=True)
class CollisionStats:
    collisions_before: int  # items whose code another item also had (all but one per code)
    moved: int  # items given another c under the same (a, b)
    spilled: int  # items moved to another b under the same a (their (a, b) was full)
    collisions_after: int


def resolve_collisions(
    codes: np.ndarray, x: np.ndarray, codebooks: list[np.ndarray]
) -> tuple[np.ndarray, CollisionStats]:
    """Unique (a, b, c) for every item, moving as few as possible and as little as possible.

    Among items sharing a code, the one nearest the level-3 centroid keeps it; the others (in
    item order) take the nearest free c under their (a, b), by distance from their level-3
    residual to the level-3 codebook. A full (a, b) (all k c's taken) sends the item to the
    nearest other b under the same a (by level-2 distance) that has a free c. An a with all
    k * k codes taken is an error; it cannot happen when n <= k^3 and level 1 is balanced.
    """
    c1, c2, c3 = (np.asarray(cb, dtype=np.float64) for cb in codebooks[:3])
    k = len(c3)
    codes = np.asarray(codes, dtype=np.int64).copy()
    n = len(codes)
    x = np.asarray(x, dtype=np.float64)
    r2 = x - c1[codes[:, 0]]
    r3 = r2 - c2[codes[:, 1]]
    own = np.einsum("ij,ij->i", r3 - c3[codes[:, 2]], r3 - c3[codes[:, 2]])
    key = (codes[:, 0] * k + codes[:, 1]) * k + codes[:, 2]
    order = np.lexsort((np.arange(n), own, key))
    keeps = np.ones(n, dtype=bool)
    keeps[order[1:]] = key[order[1:]] != key[order[:-1]]
    losers = np.flatnonzero(~keeps)
    before = len(losers)

    taken: dict[int, set[int]] = {}
    for prefix, c in zip((key[keeps] // k).tolist(), codes[keeps, 2].tolist(), strict=True):
        taken.setdefault(prefix, set()).add(c)
    c3_sq = np.einsum("ij,ij->i", c3, c3)
    c2_sq = np.einsum("ij,ij->i", c2, c2)

    def nearest_free_c(r: np.ndarray, used: set[int]) -> int:
        d = c3_sq - 2.0 * (c3 @ r)
        d[list(used)] = np.inf
        return int(np.argmin(d))

    moved = spilled = 0
    for i in losers.tolist():
        a, b = int(codes[i, 0]), int(codes[i, 1])
        used = taken.setdefault(a * k + b, set())
        if len(used) < k:
            codes[i, 2] = nearest_free_c(r3[i], used)
            used.add(int(codes[i, 2]))
            moved += 1
            continue
        by_distance = np.argsort(c2_sq - 2.0 * (c2 @ r2[i]), kind="stable").tolist()
        for b2 in by_distance:
            used2 = taken.setdefault(a * k + b2, set())
            if b2 != b and len(used2) < k:
                codes[i, 1] = b2
                codes[i, 2] = nearest_free_c(r2[i] - c2[b2], used2)
                used2.add(int(codes[i, 2]))
                spilled += 1
                break
        else:
            raise InputError(
                None,
                f"all {k * k} codes under a={a} are taken; {n} items do not fit a codebook of "
                f"{k} per level (cannot happen when items <= K^3 and level 1 is balanced); "
                "use a larger codebook size",
            )
    final = (codes[:, 0] * k + codes[:, 1]) * k + codes[:, 2]
    after = n - len(np.unique(final))
    return codes.astype(np.int32), CollisionStats(before, moved, spilled, after)
