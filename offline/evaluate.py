"""``thinkahead eval``: leave-one-out quality of the decoder, beside the co-visitation baseline.

Modes:
- ``full``: trie-constrained beam search over all three tokens (width >= k);
- ``think-ahead``: the architecture as served: top-M prefixes from a 2-token beam search over
  the history the worker saw (optionally ``stale_events`` events short), then the online step
  scores whole items under the fresh history (``service.contracts.scoring``) in one engine round.
History items are excluded from the ranking in every mode (as the service does).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from offline.baselines import CoVisitation
from offline.data import Example, Sequences, leave_one_out, read_interactions
from offline.metrics import TOP_K, ranking_metrics
from offline.thinkahead.entries import CovisitSource, ItemSource, Thinker
from offline.thinkahead.prefixes import score_plans
from service.contracts.beam import BeamSearch, run_searches
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.covisit import Neighbours, covisit_scores, top_scored
from service.contracts.fusion import FusionWeights, ItemFeatures, rank_fused
from service.contracts.model import ModelInfo
from service.contracts.scoring import ScoredCode
from service.contracts.think_ahead import ScoringSettings, ThinkAheadScorer
from service.contracts.tokens import Code
from service.engine.base import BatchEngine


@dataclass(frozen=True)
class Ranked:
    items: list[list[str]]
    invalid: int  # codes that are not catalog items (must stay 0)
    seconds: float
    # share of targets whose (a, b) is among the user's top-m offline prefixes, per m: the
    # ceiling of think-ahead recall
    coverage: dict[str, float] | None = None


def select_examples(
    interactions: Path, split: str, max_history: int, limit: int | None, seed: int = 0
) -> tuple[list[Example], Any]:
    data = leave_one_out(read_interactions(interactions), max_history)
    examples = {"test": data.test, "valid": data.valid}[split]
    if limit is not None and limit < len(examples):
        rng = np.random.default_rng(seed)
        examples = [examples[i] for i in sorted(rng.choice(len(examples), limit, replace=False))]
    return examples, data


def _to_items(catalog: Catalog, codes: Sequence[Code], k: int) -> tuple[list[str], int]:
    items, invalid = [], 0
    for code in codes[:k]:
        item = catalog.item_at(code)
        if item is None:
            invalid += 1
        else:
            items.append(item)
    return items, invalid


def rank_full(
    engine: BatchEngine,
    model: ModelInfo,
    catalog: Catalog,
    examples: Sequence[Example],
    k: int,
    beam: int,
    batch_users: int = 128,
    progress: bool = True,
) -> Ranked:
    t0 = time.monotonic()
    ranked: list[list[str]] = []
    invalid = 0
    ids = model.token_ids
    for start in tqdm(
        range(0, len(examples), batch_users), desc="full decode", disable=not progress, unit="batch"
    ):
        chunk = examples[start : start + batch_users]
        searches = []
        for e in chunk:
            history = catalog.codes_of(e.history)[0][-model.max_history :]
            searches.append(
                BeamSearch(ids.history(history), ids, Constraint(catalog, history), max(beam, k))
            )
        run_searches(searches, engine.score_batch)
        for s in searches:
            items, bad = _to_items(catalog, [b.code for b in s.beams], k)  # type: ignore[misc]
            ranked.append(items)
            invalid += bad
    return Ranked(ranked, invalid, time.monotonic() - t0)


@dataclass
class UserCandidates:
    """One user's scored think-ahead candidates: enough to rank them under any weights."""

    target: str
    scored: list[ScoredCode]
    features: ItemFeatures
    snapshot_ab: frozenset[tuple[int, int]]
    covisit_ab: tuple[tuple[int, int], ...]  # best first
    affinity_ab: tuple[tuple[int, int], ...] = ()  # best first

    def ranked(
        self,
        weights: FusionWeights,
        k: int,
        covisit_candidates: int | None = None,
        affinity_candidates: int | None = None,
    ) -> list[Code]:
        affinity_ab = (
            self.affinity_ab
            if affinity_candidates is None
            else self.features.affinity.prefixes(affinity_candidates)
        )
        keep = self.snapshot_ab | set(self.covisit_ab[:covisit_candidates]) | set(affinity_ab)
        scored = [(s.code, s.decoder, s.offline) for s in self.scored if s.code[:2] in keep]
        return [code for code, _ in rank_fused(scored, self.features, weights)[:k]]


@dataclass(frozen=True)
class ThinkAheadEval:
    """How ``thinkahead eval --mode think-ahead`` and ``tune-blend`` meet the users: the
    worker's entry for the history minus its last ``stale_events`` items, then the service's
    online step over the fresh history. ``prune`` False scores every candidate (to learn the
    weights)."""

    scoring: ScoringSettings
    beam: int
    k: int = TOP_K
    stale_events: int = 0
    prune: bool = True
    batch_users: int = 128
    progress: bool = True


def think_ahead_candidates(
    engine: BatchEngine,
    model: ModelInfo,
    catalog: Catalog,
    examples: Sequence[Example],
    spec: ThinkAheadEval,
    covisit: Mapping[str, Neighbours],
    items: ItemSource | None = None,
) -> tuple[list[UserCandidates], dict[str, float]]:
    """The architecture as served, per user: the worker's entry (``Thinker``) for the stale
    history, then the service's plan (``ThinkAheadScorer``) over the fresh one, with the
    co-visitation neighbours of the fresh last items among the candidates. The entry's stored
    scores are computed only for a stale history: with an unchanged one the online step asks
    the engine the same questions."""
    scorer = ThinkAheadScorer(catalog, model.token_ids, spec.scoring)
    prefixes = spec.scoring.prefixes
    thinker = Thinker(
        engine,
        scorer,
        model.version,
        beam=max(spec.beam, prefixes),
        covisit=CovisitSource(covisit),
        items=items,
        c_tails=spec.scoring.reuse_snapshot_c,
        stored=spec.stale_events > 0,
    )
    covered = {m: 0 for m in (8, 16, 32, prefixes) if m <= prefixes}
    with_covisit = with_extra = 0
    out: list[UserCandidates] = []
    for start in tqdm(
        range(0, len(examples), spec.batch_users),
        desc="think-ahead",
        disable=not spec.progress,
        unit="batch",
    ):
        chunk = examples[start : start + spec.batch_users]
        fresh = [catalog.codes_of(e.history)[0][-model.max_history :] for e in chunk]
        stale = [h[: len(h) - spec.stale_events] if spec.stale_events else h for h in fresh]
        plans = []
        for e, history, value in zip(chunk, fresh, thinker.entries(stale), strict=True):
            plan = scorer.plan(
                value,
                history,
                covisit_scores(e.history, covisit, set(e.history)),
                spec.k,
                unchanged=spec.stale_events == 0,
                prune=spec.prune,
            )
            target = catalog.code_of(e.target)
            ranked_ab = [(p.a, p.b) for p in value.prefixes]
            if target is not None:
                for m in covered:
                    covered[m] += target[:2] in ranked_ab[:m]
                with_covisit += target[:2] in {*ranked_ab, *plan.covisit_ab}
                with_extra += target[:2] in {*ranked_ab, *plan.covisit_ab, *plan.affinity_ab}
            plans.append(plan)
            out.append(
                UserCandidates(
                    e.target, [], plan.features, plan.snapshot_ab, plan.covisit_ab, plan.affinity_ab
                )
            )
        parts = score_plans(engine, [p.scoring for p in plans])
        for plan, part, user in zip(plans, parts, out[start:], strict=True):
            user.scored = scorer.scored(plan, part)
    n = max(len(examples), 1)
    coverage: dict[str, float] = {f"M={m}": round(c / n, 5) for m, c in sorted(covered.items())}
    coverage[f"M={prefixes} + co-visitation"] = round(with_covisit / n, 5)
    if items is not None:
        coverage[f"M={prefixes} + co-visitation + item-level"] = round(with_extra / n, 5)
    return out, coverage


def rank_candidates(
    catalog: Catalog,
    users: Sequence[UserCandidates],
    weights: FusionWeights,
    k: int,
    covisit_candidates: int | None = None,
) -> tuple[list[list[str]], int]:
    ranked, invalid = [], 0
    for user in users:
        items, bad = _to_items(catalog, user.ranked(weights, k, covisit_candidates), k)
        ranked.append(items)
        invalid += bad
    return ranked, invalid


def rank_served(
    engine: BatchEngine,
    model: ModelInfo,
    catalog: Catalog,
    examples: Sequence[Example],
    spec: ThinkAheadEval,
    covisit: Mapping[str, Neighbours],
    items: ItemSource | None = None,
) -> Ranked:
    """The served ranking (fused score, served weights and pruning) for every example."""
    t0 = time.monotonic()
    users, coverage = think_ahead_candidates(engine, model, catalog, examples, spec, covisit, items)
    ranked, invalid = rank_candidates(catalog, users, spec.scoring.weights, spec.k)
    return Ranked(ranked, invalid, time.monotonic() - t0, coverage)


def covisitation_baseline(
    train: Sequences, examples: Sequence[Example], k: int
) -> dict[str, float]:
    model = CoVisitation(train)
    ranked = [model.recommend(e.history, k) for e in examples]
    return ranking_metrics(ranked, [e.target for e in examples])


def covisit_table_ranking(
    catalog: Catalog,
    neighbours: Mapping[str, Neighbours],
    examples: Sequence[Example],
    k: int,
) -> dict[str, float]:
    """The catalog's co-visitation table alone, scored as the service scores it (the freshest
    items' neighbours, recency-weighted, history excluded), popular items filling the rest:
    what ``fallback_covisitation`` serves."""
    popular = [catalog.item_ids[int(r)] for r in catalog.rows_by_popularity]
    ranked = []
    for e in examples:
        seen = set(e.history)
        top = top_scored(covisit_scores(e.history, neighbours, seen), k)
        ranked.append(top + _unseen(popular, seen | set(top), k - len(top)))
    return ranking_metrics(ranked, [e.target for e in examples])


def _unseen(popular: Sequence[str], taken: set[str], n: int) -> list[str]:
    """The first ``n`` items of ``popular`` not in ``taken``."""
    return [i for i in popular[: n + len(taken)] if i not in taken][:n]


def popularity_baseline(train: Sequences, examples: Sequence[Example], k: int) -> dict[str, float]:
    """The most popular training items the user has not interacted with."""
    counts = Counter(item for seq in train.items for item in seq)
    popular = [item for item, _ in counts.most_common()]
    ranked = [_unseen(popular, set(e.history), k) for e in examples]
    return ranking_metrics(ranked, [e.target for e in examples])


def report_row(ranked: Ranked, examples: Sequence[Example]) -> dict[str, Any]:
    metrics = ranking_metrics(ranked.items, [e.target for e in examples])
    row: dict[str, Any] = {
        **{k: round(v, 5) for k, v in metrics.items()},
        "invalid_items": ranked.invalid,
        "seconds": round(ranked.seconds, 1),
    }
    if ranked.coverage:
        row["prefix_coverage"] = dict(ranked.coverage)
    return row
