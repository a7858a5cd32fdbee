"""Learn the fused score's weights on the validation split (``thinkahead tune-blend``).

Every candidate of every validation user is scored once by the engine (no pruning); the grid
over weights and co-visitation / item-level candidate counts is then pure array arithmetic: the
target's rank under weights w is the number of candidates that outscore it. The users are
scored twice, as the service meets them: with the history their snapshot was computed from,
and one event past it (the fresh-event path, where the event's co-visitation neighbours are
the candidates the snapshot lacks); a setting is judged by the mean of the two.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from offline.evaluate import UserCandidates
from offline.metrics import TOP_K
from service.contracts.fusion import FusionWeights

OFFLINE_GRID = (0.0, 0.25, 0.5, 1.0, 2.0)
COVISIT_GRID = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
POPULARITY_GRID = (0.0, 0.1, 0.25, 0.5, 1.0)
CANDIDATES_GRID = (0, 10, 20, 40)
AFFINITY_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
AFFINITY_CANDIDATES_GRID = (0, 10, 20, 50)


@dataclass(frozen=True)
class Trial:
    weights: FusionWeights
    covisit_candidates: int
    affinity_candidates: int
    recall: float
    ndcg: float
    # (path, recall, ndcg) of each way the users were scored, when more than one
    paths: tuple[tuple[str, float, float], ...] = ()

    @property
    def candidates(self) -> int:
        """Extra candidates: each costs engine work online."""
        return self.covisit_candidates + self.affinity_candidates

    def row(self) -> dict[str, float]:
        return {
            **self.weights.model_dump(),
            "covisit_candidates": self.covisit_candidates,
            "affinity_candidates": self.affinity_candidates,
            "recall@10": round(self.recall, 5),
            "ndcg@10": round(self.ndcg, 5),
            **{f"{path} ndcg@10": round(ndcg, 5) for path, _, ndcg in self.paths},
        }

    @classmethod
    def mean_of(cls, paths: Mapping[str, Trial]) -> Trial:
        """One setting judged over several ways of scoring the same users (one way: itself)."""
        first = next(iter(paths.values()))
        if len(paths) == 1:
            return first
        return cls(
            first.weights,
            first.covisit_candidates,
            first.affinity_candidates,
            float(np.mean([t.recall for t in paths.values()])),
            float(np.mean([t.ndcg for t in paths.values()])),
            tuple((path, t.recall, t.ndcg) for path, t in paths.items()),
        )


class CandidateMatrix:
    """Users x candidates, padded: one row per user, -inf where a user has fewer candidates."""

    def __init__(self, users: Sequence[UserCandidates], unreachable_rank: int = 10**6) -> None:
        width = max((len(u.scored) for u in users), default=1) or 1
        shape = (len(users), width)
        self.decoder = np.full(shape, -np.inf)
        self.offline = np.zeros(shape)
        self.covisit = np.zeros(shape)
        self.popularity = np.zeros(shape)
        self.affinity = np.zeros(shape)
        # the rank of the candidate's prefix among the co-visitation prefixes; -1: a snapshot
        # prefix (always a candidate)
        self.source_rank = np.full(shape, unreachable_rank, dtype=np.int64)
        # the rank of the best item-level item under the candidate's prefix
        self.affinity_rank = np.full(shape, unreachable_rank, dtype=np.int64)
        self.target = np.full(len(users), -1, dtype=np.int64)
        for u, user in enumerate(users):
            target_code = user.features.catalog.code_of(user.target)
            cv_rank = {ab: r for r, ab in enumerate(user.covisit_ab)}
            affinity_rank: dict[tuple[int, int], int] = {}
            for r, (code, _) in enumerate(user.features.affinity.ranked):
                affinity_rank.setdefault(code[:2], r)
            for j, s in enumerate(user.scored):
                self.decoder[u, j] = s.decoder
                self.offline[u, j] = s.offline
                self.covisit[u, j] = user.features.covisit_of(s.code)
                self.popularity[u, j] = user.features.popularity_of(s.code)
                self.affinity[u, j] = user.features.affinity.of(s.code)
                ab = s.code[:2]
                self.source_rank[u, j] = (
                    -1 if ab in user.snapshot_ab else cv_rank.get(ab, unreachable_rank)
                )
                self.affinity_rank[u, j] = affinity_rank.get(ab, unreachable_rank)
                if s.code == target_code:
                    self.target[u] = j

    def metrics(
        self,
        weights: FusionWeights,
        covisit_candidates: int,
        affinity_candidates: int = 0,
        k: int = TOP_K,
    ) -> Trial:
        score = (
            self.decoder
            + weights.offline * self.offline
            + weights.covisit * self.covisit
            + weights.popularity * self.popularity
            + weights.affinity * self.affinity
        )
        reachable = (self.source_rank < covisit_candidates) | (
            self.affinity_rank < affinity_candidates
        )
        score = np.where(reachable, score, -np.inf)
        has = self.target >= 0
        rows = np.arange(len(self.target))
        target_score = np.where(has, score[rows, np.maximum(self.target, 0)], -np.inf)
        rank = (score > target_score[:, None]).sum(axis=1)
        hit = has & np.isfinite(target_score) & (rank < k)
        n = max(len(self.target), 1)
        gain = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
        return Trial(
            weights,
            covisit_candidates,
            affinity_candidates,
            float(hit.sum() / n),
            float(gain.sum() / n),
        )


FRESH_PATH = "one event behind"
UNCHANGED_PATH = "unchanged"


def grid_search(
    users: Sequence[UserCandidates],
    k: int = TOP_K,
    tolerance: float = 0.01,
    fresh: Sequence[UserCandidates] | None = None,
) -> list[Trial]:
    """Every grid point, the chosen one first: the fewest extra candidates (co-visitation and
    item-level; each costs engine work online) among the settings within ``tolerance``
    (relative) of the best NDCG@k; then by NDCG@k, Recall@k, and the simpler setting. Item-level
    terms are searched only when the users carry item-level scores.

    ``fresh``: the same users scored one event past their snapshot (the service's fresh-event
    path); each setting's metrics are then the mean over both paths. Without it the grid cannot
    price the co-visitation candidates, whose purpose is the neighbours of an event the
    snapshot has not seen (a snapshot of the scored history already holds its prefixes)."""
    matrices = {UNCHANGED_PATH: CandidateMatrix(users)}
    if fresh is not None:
        matrices[FRESH_PATH] = CandidateMatrix(fresh)
    with_items = any(u.features.affinity.ranked for u in [*users, *(fresh or ())])
    affinity_grid = AFFINITY_GRID if with_items else (0.0,)
    affinity_candidates = AFFINITY_CANDIDATES_GRID if with_items else (0,)
    trials = []
    for o, c, p, a, n, m in itertools.product(
        OFFLINE_GRID,
        COVISIT_GRID,
        POPULARITY_GRID,
        affinity_grid,
        CANDIDATES_GRID,
        affinity_candidates,
    ):
        weights = FusionWeights(offline=o, covisit=c, popularity=p, affinity=a)
        trials.append(
            Trial.mean_of({path: mx.metrics(weights, n, m, k) for path, mx in matrices.items()})
        )
    best_ndcg = max(t.ndcg for t in trials)
    trials.sort(
        key=lambda t: (
            t.ndcg < best_ndcg * (1 - tolerance),
            t.candidates if t.ndcg >= best_ndcg * (1 - tolerance) else 0,
            -t.ndcg,
            -t.recall,
            t.weights.offline + t.weights.covisit + t.weights.popularity + t.weights.affinity,
        )
    )
    return trials
