"""``thinkahead eval``: leave-one-out quality of the decoder, beside the co-visitation baseline.

Modes:
- ``full``: trie-constrained beam search over all three tokens (width >= k);
- ``think-ahead``: the architecture as served: top-M prefixes from a 2-token beam search over
  the history the worker saw (optionally ``stale_events`` events short), then the online step
  scores whole items under the fresh history (``service.scoring``) in one engine round.
History items are excluded from the ranking in every mode (as the service does).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from offline.baselines import CoVisitation
from offline.data import Example, leave_one_out, read_interactions
from offline.metrics import ranking_metrics
from offline.thinkahead.prefixes import compute_prefixes
from service.beam import BeamSearch, run_searches
from service.catalog import Catalog
from service.constraint import Constraint
from service.engine.base import BatchEngine
from service.model import ModelInfo
from service.scoring import combine, plan_item_scoring
from service.tokens import Code

Mode = Literal["full", "think-ahead"]


@dataclass(frozen=True)
class Ranked:
    items: list[list[str]]
    invalid: int  # codes that are not catalog items (must stay 0)
    seconds: float
    # share of targets whose (a, b) is among the user's top-m offline prefixes, per m: the
    # ceiling of think-ahead recall
    coverage: dict[int, float] | None = None


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


def rank_think_ahead(
    engine: BatchEngine,
    model: ModelInfo,
    catalog: Catalog,
    examples: Sequence[Example],
    k: int,
    prefixes: int,
    beam: int,
    offline_weights: Sequence[float] = (0.0,),
    stale_events: int = 0,
    batch_users: int = 128,
    progress: bool = True,
) -> list[Ranked]:
    """Offline prefixes from the history minus its last ``stale_events`` items; online scoring
    with the whole history; one ranking per blend weight of the offline prefix score (the
    engine work is shared: only the final sort differs)."""
    t0 = time.monotonic()
    covered = {m: 0 for m in (8, 16, 32, prefixes) if m <= prefixes}
    ranked: list[list[list[str]]] = [[] for _ in offline_weights]
    invalid = [0 for _ in offline_weights]
    ids = model.token_ids
    for start in tqdm(
        range(0, len(examples), batch_users), desc="think-ahead", disable=not progress, unit="batch"
    ):
        chunk = examples[start : start + batch_users]
        fresh = [catalog.codes_of(e.history)[0][-model.max_history :] for e in chunk]
        stale = [h[: len(h) - stale_events] if stale_events else h for h in fresh]
        offline = compute_prefixes(engine, ids, catalog, stale, max(beam, prefixes), prefixes)
        for e, result in zip(chunk, offline, strict=True):
            target = catalog.code_of(e.target)
            ranked_ab = [(p.a, p.b) for p in result.prefixes]
            for m in covered:
                covered[m] += target is not None and target[:2] in ranked_ab[:m]
        plans = [
            plan_item_scoring(
                ids.history(history),
                result.prefixes,
                Constraint(catalog, history),
                ids,
                top_c=k,
                reuse_prefix_scores=stale_events == 0,
                # bounds depend on the blend: prune only when one weight is ranked
                prune_for=(k, offline_weights[0]) if len(offline_weights) == 1 else None,
            )
            for history, result in zip(fresh, offline, strict=True)
        ]
        answers = engine.score_batch([r for p in plans for r in p.requests])
        offset = 0
        for plan in plans:
            part = answers[offset : offset + len(plan.requests)]
            offset += len(plan.requests)
            for w, weight in enumerate(offline_weights):
                scored = combine(plan, part, ids, weight)
                items, bad = _to_items(catalog, [s.code for s in scored], k)
                ranked[w].append(items)
                invalid[w] += bad
    seconds = time.monotonic() - t0
    coverage = {m: round(c / max(len(examples), 1), 5) for m, c in sorted(covered.items())}
    return [Ranked(r, bad, seconds, coverage) for r, bad in zip(ranked, invalid, strict=True)]


def covisitation_baseline(data: Any, examples: Sequence[Example], k: int) -> dict[str, float]:
    model = CoVisitation(data.train)
    ranked = [model.recommend(e.history, k) for e in examples]
    return ranking_metrics(ranked, [e.target for e in examples])


def report_row(ranked: Ranked, examples: Sequence[Example]) -> dict[str, Any]:
    metrics = ranking_metrics(ranked.items, [e.target for e in examples])
    row: dict[str, Any] = {
        **{k: round(v, 5) for k, v in metrics.items()},
        "invalid_items": ranked.invalid,
        "seconds": round(ranked.seconds, 1),
    }
    if ranked.coverage:
        row["prefix_coverage"] = {f"M={m}": v for m, v in ranked.coverage.items()}
    return row
