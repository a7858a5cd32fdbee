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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offline.decode.engines import batch_engine
from offline.eval.candidates import ThinkAheadEval, UserCandidates, think_ahead_candidates
from offline.eval.examples import select_examples
from offline.eval.guards import check_sources
from offline.eval.metrics import TOP_K
from offline.eval.tune_rationale import answered, tune_rationale
from offline.thinkahead.entries import ItemSource
from offline.thinkahead.worker import reasoner_for, thought_paths
from service.contracts.catalog import Catalog
from service.contracts.covisit import CovisitTable
from service.contracts.fusion import FusionWeights
from service.contracts.manifest import utc_now
from service.contracts.model import ServingConfig, load_model_info
from service.contracts.think_ahead import ScoringSettings

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


def tune_blend(
    model_dir: Path,
    catalog_dir: Path,
    interactions: Path,
    *,
    prefixes: int = 32,
    beam: int = 32,
    limit: int | None = 5000,
    k: int = TOP_K,
    engine: str = "vllm",
    progress: bool = True,
    item_model: Path | None = None,
    judge_fresh: bool | None = None,
) -> dict[str, Any]:
    """Learn the fused score's weights and the co-visitation and item-level candidate counts
    on the validation split only, and record them in the model directory's ``serving.json``
    (the service's, the eval's and the bench's default).

    ``judge_fresh``: judge each setting also on the users one event past their entry, scored
    by an engine round. None: only when there is no item-level model; with one the service
    answers those users without the engine (the stored answer re-ranked with the fresh
    history encoded, ``tune-rerank``), so the weights decide the stored answers alone."""
    catalog = Catalog.load(catalog_dir)
    info = load_model_info(model_dir, catalog)
    table = CovisitTable.load_optional(catalog_dir, catalog.item_ids, catalog.version)
    items = ItemSource.load(model_dir, catalog, item_model)
    check_sources("valid", info, catalog, catalog_dir, table, items)
    examples, _ = select_examples(interactions, "valid", info.max_history, limit)
    covisit = table.as_mapping() if table is not None else {}
    batch = batch_engine(engine, model_dir, info)
    reasoner = reasoner_for(info, catalog, catalog_dir, None)  # as the worker thinks
    # every candidate the grid can reach, scored once
    widest = ScoringSettings(
        covisit_candidates=max(CANDIDATES_GRID),
        affinity_candidates=max(AFFINITY_CANDIDATES_GRID) if items is not None else 0,
        prefixes=prefixes,
    )
    if judge_fresh is None:
        judge_fresh = items is None
    t0 = time.monotonic()
    # as the service meets users: the history of their snapshot, and one event past it
    scored = (
        think_ahead_candidates(
            batch,
            info,
            catalog,
            examples,
            ThinkAheadEval(
                widest,
                beam,
                k,
                stale_events=stale_events,
                prune=False,
                progress=progress,
                reasoner=reasoner,
                paths=thought_paths(info, None),
            ),
            covisit,
            items,
        )[0]
        for stale_events in ((0, 1) if judge_fresh else (0,))
    )
    users, *fresh = scored
    trials = grid_search(users, k, fresh=fresh[0] if fresh else None)
    best = trials[0]
    decoder_only = next(
        t
        for t in trials
        if t.candidates == 0 and t.weights == FusionWeights(offline=t.weights.offline)
    )
    rationale, rationale_tuning = (
        tune_rationale(
            answered(
                users,
                catalog,
                best.weights,
                best.covisit_candidates,
                best.affinity_candidates,
                k,
            ),
            catalog.categories,
            catalog,
        )
        if catalog.categories is not None
        else (None, {})
    )
    config = ServingConfig(
        weights=best.weights,
        covisit_candidates=best.covisit_candidates,
        affinity_candidates=best.affinity_candidates,
        covisit_version=table.version if table is not None else None,
        item_model_version=items.model.version if items is not None else None,
        chosen_on=f"validation split, {len(examples)} users, each scored unchanged"
        + (" and one event past its snapshot (an engine round)" if judge_fresh else "")
        + f": the fewest extra candidates within 1% of the best {'mean ' if judge_fresh else ''}"
        f"NDCG@{k} over a grid of {len(trials)} settings",
        created_at=utc_now(),
        rationale=rationale,
        rationale_tuning=rationale_tuning,
        tuning={
            "best": best.row(),
            "grid_best_ndcg@10": round(max(t.ndcg for t in trials), 5),
            "decoder_only": decoder_only.row(),
            "top": [t.row() for t in trials[:10]],
            "prefixes": prefixes,
            "seconds": round(time.monotonic() - t0, 1),
        },
    )
    config.write(model_dir)
    return config.model_dump(mode="json")
