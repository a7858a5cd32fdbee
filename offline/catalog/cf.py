"""Collaborative-filtering item vectors: truncated SVD of the user x item interaction matrix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh, svds

from offline.catalog.embed import l2_normalise
from offline.data import Sequences


@dataclass(frozen=True)
class InteractionCounts:
    """Interactions mapped onto catalog rows."""

    matrix: sp.csr_matrix  # users x items, interaction counts
    popularity: np.ndarray  # (N,) float64, interactions per item
    unknown_interactions: int  # interactions whose item is not in the catalog
    unknown_items: int  # distinct such items


def count_interactions(seqs: Sequences, item_ids: Sequence[str]) -> InteractionCounts:
    row_of = {item: i for i, item in enumerate(item_ids)}
    users: list[int] = []
    cols: list[int] = []
    unknown: dict[str, int] = {}
    for u, seq in enumerate(seqs.items):
        for item in seq:
            col = row_of.get(item)
            if col is None:
                unknown[item] = unknown.get(item, 0) + 1
            else:
                users.append(u)
                cols.append(col)
    data = np.ones(len(cols), dtype=np.float64)
    matrix = sp.csr_matrix((data, (users, cols)), shape=(len(seqs), len(item_ids)))
    matrix.sum_duplicates()
    popularity = np.asarray(matrix.sum(axis=0), dtype=np.float64).ravel()
    return InteractionCounts(matrix, popularity, sum(unknown.values()), len(unknown))


def cf_vectors(matrix: sp.spmatrix, dim: int = 64, idf: bool = False, seed: int = 0) -> np.ndarray:
    """(N, dim') float32 item vectors, dim' = min(dim, min(matrix.shape) - 1), rows L2-normalised.

    The matrix is binarised (and, with ``idf``, each item column weighted by log(U / users of
    the item)); item i's vector is row i of V * S from its truncated SVD. Deterministic: a fixed
    start vector from ``seed`` and a sign convention per component. Items without interactions
    get zero vectors.
    """
    binary = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
    binary.data[:] = 1.0
    binary.eliminate_zeros()
    n_users, n_items = binary.shape
    if binary.nnz == 0:
        return np.zeros((n_items, 0), dtype=np.float32)
    if idf:
        users_per_item = np.asarray((binary > 0).sum(axis=0)).ravel()
        weights = np.log(n_users / np.maximum(users_per_item, 1)) + 1.0
        binary = sp.csr_matrix(binary @ sp.diags(weights))
    rank = min(dim, min(n_users, n_items) - 1)
    if rank < 1:
        return np.zeros((n_items, 0), dtype=np.float32)
    rng = np.random.default_rng(seed)
    v0 = rng.standard_normal(min(n_users, n_items))
    _, s, vt = svds(binary, k=rank, v0=v0, solver="arpack")
    order = np.argsort(-s, kind="stable")
    s, vt = s[order], vt[order]
    has_interactions = np.diff(binary.tocsc().indptr) > 0
    return _item_vectors(vt.T, s, empty=~has_interactions)


def transition_vectors(
    seqs: Sequences, item_ids: Sequence[str], dim: int = 64, window: int = 3, seed: int = 0
) -> np.ndarray:
    """(N, dim') item vectors from sequential co-occurrence, rows L2-normalised.

    Items that follow one another within ``window`` steps (weight 1/distance, both directions)
    form a symmetric graph; item i's vector is row i of U * sqrt(L), the eigenvectors of its
    normalised adjacency D^-1/2 A D^-1/2 with the largest eigenvalues L (a spectral embedding).
    This is co-visitation embedded: items a user is likely to take next end up near each other,
    so they share semantic-ID prefixes.
    """
    row_of = {item: i for i, item in enumerate(item_ids)}
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for seq in seqs.items:
        idx = [row_of[i] for i in seq if i in row_of]
        for pos, a in enumerate(idx):
            for dist in range(1, window + 1):
                if pos + dist >= len(idx):
                    break
                b = idx[pos + dist]
                if a != b:
                    rows += [a, b]
                    cols += [b, a]
                    vals += [1.0 / dist, 1.0 / dist]
    n = len(item_ids)
    if not vals:
        return np.zeros((n, 0), dtype=np.float32)
    adj = sp.csr_matrix((np.array(vals), (rows, cols)), shape=(n, n))
    adj.sum_duplicates()
    degree = np.asarray(adj.sum(axis=1)).ravel()
    inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-12)), 0.0)
    norm = sp.diags(inv_sqrt) @ adj @ sp.diags(inv_sqrt)
    rank = min(dim, n - 1)
    rng = np.random.default_rng(seed)
    # Largest algebraic eigenvalues, not largest singular values: an SVD would also take the
    # most negative eigenvalues, whose eigenvectors point items that follow one another apart
    # (A -> B pairs make the graph partly bipartite).
    lam, u = eigsh(norm.tocsr(), k=rank, which="LA", v0=rng.standard_normal(n))
    order = np.argsort(-lam, kind="stable")
    lam, u = np.clip(lam[order], 0.0, None), u[:, order]
    return _item_vectors(u, np.sqrt(lam), empty=degree == 0)


def _item_vectors(basis: np.ndarray, scale: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """Rows of ``basis`` (items x components) times ``scale`` per component, ``empty`` items
    zeroed, rows L2-normalised. Singular / eigen vectors are defined up to sign: each
    component's largest entry is made positive, so the catalog does not depend on the solver's
    choice."""
    signs = np.sign(basis[np.argmax(np.abs(basis), axis=0), np.arange(basis.shape[1])])
    vectors = basis * np.where(signs == 0, 1.0, signs)[None, :] * scale[None, :]
    vectors[empty] = 0.0
    return l2_normalise(vectors)
