"""Learn how an answer's rationale mixes the answer with the history (``RationaleSettings``),
on the validation users ``thinkahead tune-blend`` has just scored, under the weights it chose.

A rationale is judged by what a caller can check: whether the user's next item is in the
category it names first (top-1 accuracy). The grid is small and every setting is the
worker's own ``answer_rationales`` over each user's stored answer, so what is learned is what
the worker stores.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from offline.eval.candidates import UserCandidates
from offline.eval.rationale import RationaleStats
from service.contracts.catalog import Catalog
from service.contracts.fusion import FusionWeights
from service.contracts.rationale import Categories, RationaleSettings, answer_rationales

TEMPERATURE_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
HISTORY_WEIGHT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
HISTORY_DECAY_GRID = (1.0, 0.8, 0.5)


@dataclass(frozen=True)
class Answered:
    """One validation user's served answer: what its rationale is computed from."""

    ranked: list[tuple[str, float]]  # item id, fused score; best first
    served: list[str]  # the top k
    history: Sequence[str]
    target: str


def answered(
    users: Sequence[UserCandidates],
    catalog: Catalog,
    weights: FusionWeights,
    covisit_candidates: int,
    affinity_candidates: int,
    k: int,
) -> list[Answered]:
    out = []
    for user in users:
        ranked = user.answer(catalog, weights, covisit_candidates, affinity_candidates)
        out.append(Answered(ranked, [i for i, _ in ranked[:k]], user.history, user.target))
    return out


def judge(
    users: Sequence[Answered], categories: Categories, catalog: Catalog, s: RationaleSettings
) -> dict[str, float | int]:
    """The rationale report (accuracy beside the baselines, faithfulness) under ``s``."""
    stats = RationaleStats(categories, catalog)
    for u in users:
        shown = answer_rationales(u.ranked, categories, catalog.category_of, u.history, settings=s)
        stats.add(u.history, u.target, shown, u.served)
    return stats.report()


def tune_rationale(
    users: Sequence[Answered], categories: Categories, catalog: Catalog
) -> tuple[RationaleSettings, dict[str, Any]]:
    """The grid's best top-1 accuracy; ties go to the least history weight (the rationale
    closest to the answer it explains), then the lowest temperature, then the least decay."""
    trials: list[tuple[float, RationaleSettings, dict[str, float | int]]] = []
    for w, t, d in itertools.product(HISTORY_WEIGHT_GRID, TEMPERATURE_GRID, HISTORY_DECAY_GRID):
        if w == 0 and d != HISTORY_DECAY_GRID[0]:
            continue  # the decay only shapes the history's part
        s = RationaleSettings(temperature=t, history_weight=w, history_decay=d)
        report = judge(users, categories, catalog, s)
        trials.append((float(report.get("accuracy: rationale top-1", 0.0)), s, report))
    trials.sort(key=lambda x: (-x[0], x[1].history_weight, x[1].temperature, -x[1].history_decay))
    _, best, report = trials[0]
    answer_alone = next(r for _, s, r in trials if s == RationaleSettings())
    return best, {
        "best": {**best.model_dump(mode="json"), **report},
        "answer_alone": answer_alone,
        "top": [
            {**s.model_dump(mode="json"), "accuracy: rationale top-1": a} for a, s, _ in trials[:5]
        ],
        "settings_tried": len(trials),
    }
