"""Learn the no-engine fresh answer's settings on the validation split (``thinkahead
tune-rerank``), after ``tune-blend`` (the stored answers it re-ranks are ranked by the served
weights).

Each sampled validation user is met as the service meets a user who just acted: the worker's
entry for the history minus its newest item, the request with the whole history. The entries
(the expensive part: a decoder beam search per user) are computed once; every setting of the
grid then re-ranks the same stored answers (``ThinkAheadScorer.rerank``), with the fresh
history encoded by the item-level model when there is one, as the service encodes it. The best
mean NDCG@10 wins; ties go to fewer added candidates. Recorded in ``serving.json`` as
``rerank``; the engine round's figure for the same users is ``thinkahead eval --stale-events 1
--fresh-path engine``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from offline.decode.engines import batch_engine
from offline.eval.candidates import ThinkAheadEval, rerank_covisit
from offline.eval.examples import select_examples
from offline.eval.guards import check_sources
from offline.eval.metrics import TOP_K, ranking_metrics
from offline.thinkahead.entries import ItemSource
from offline.thinkahead.worker import reasoner_for, thought_paths
from service.contracts.answers import DEFAULT_ANSWER_ITEMS
from service.contracts.catalog import Catalog
from service.contracts.covisit import CovisitTable
from service.contracts.fusion import FusionWeights
from service.contracts.manifest import utc_now
from service.contracts.model import load_model_info, load_serving_config
from service.contracts.think_ahead import RerankSettings, ThinkAheadScorer
from service.contracts.tokens import Code

AFFINITY_GRID = (0.5, 1.0, 2.0, 4.0)
STORED_GRID = (1.0, 0.5, 0.25, 0.0)
CANDIDATES_GRID = (0, 20)
COVISIT_GRID = (2.0, 4.0)
POPULARITY_GRID = (0.0, 0.5)


def rerank_grid(served: FusionWeights, with_items: bool) -> list[RerankSettings]:
    """Every setting tried; without an item-level model only the stored-term scale and the
    co-visitation and popularity weights matter."""
    affinity = AFFINITY_GRID if with_items else (served.affinity,)
    candidates = CANDIDATES_GRID if with_items else (0,)
    return [
        RerankSettings(
            weights=FusionWeights(offline=served.offline, covisit=c, popularity=p, affinity=a),
            stored=stored,
            affinity_candidates=n,
        )
        for a, stored, n, c, p in itertools.product(
            affinity, STORED_GRID, candidates, COVISIT_GRID, POPULARITY_GRID
        )
    ]


def _top(order: Sequence[tuple[Code, float]] | None, catalog: Catalog, k: int) -> list[str]:
    items = (catalog.item_at(code) for code, _ in order or ())
    return [i for i in items if i is not None][:k]


def tune_rerank(
    model_dir: Path,
    catalog_dir: Path,
    interactions: Path,
    *,
    prefixes: int = 32,
    beam: int = 20,
    limit: int | None = 3000,
    k: int = TOP_K,
    engine: str = "vllm",
    progress: bool = True,
    item_model: Path | None = None,
) -> dict[str, Any]:
    catalog = Catalog.load(catalog_dir)
    info = load_model_info(model_dir, catalog)
    serving = load_serving_config(model_dir)
    table = CovisitTable.load_optional(catalog_dir, catalog.item_ids, catalog.version)
    items = ItemSource.load(model_dir, catalog, item_model)
    check_sources("valid", info, catalog, catalog_dir, table, items)
    examples, _ = select_examples(interactions, "valid", info.max_history, limit)
    covisit = table.as_mapping() if table is not None else {}
    scoring = serving.scoring(prefixes=prefixes)
    spec = ThinkAheadEval(
        scoring,
        beam,  # the worker's entry: beam max(beam, prefixes), as `eval` computes it
        k,
        stale_events=1,
        progress=progress,
        reasoner=reasoner_for(info, catalog, catalog_dir, None),
        paths=thought_paths(info, None),
        fresh_path="rerank",
    )
    served = ThinkAheadScorer(catalog, info.token_ids, scoring)
    # the re-rank before the fresh encode: served weights, whole stored terms, no encode
    plain = ThinkAheadScorer(
        catalog,
        info.token_ids,
        scoring.model_copy(update={"rerank": RerankSettings(weights=None, stored=1.0)}),
    )
    grid = rerank_grid(scoring.weights, items is not None)
    scorers = [
        ThinkAheadScorer(catalog, info.token_ids, scoring.model_copy(update={"rerank": r}))
        for r in grid
    ]
    t0 = time.monotonic()
    thinker = spec.thinker(batch_engine(engine, model_dir, info), served, info, covisit, items,
                           DEFAULT_ANSWER_ITEMS)  # fmt: skip
    ranked: list[list[list[str]]] = [[] for _ in grid]
    untuned: list[list[str]] = []  # ``plain``
    alone: list[list[str]] = []  # the item-level model alone on the fresh history
    targets: list[str] = []
    for chunk, fresh, values in spec.entries(thinker, catalog, info, examples, "tune-rerank"):
        encoded = (
            items.fresh_affinities(catalog, fresh, scoring.exclude_history)
            if items is not None
            else [None] * len(chunk)
        )
        for e, history, value, affinity in zip(chunk, fresh, values, encoded, strict=True):
            targets.append(e.target)
            inputs = rerank_covisit(e.history, covisit, 1)
            untuned.append(_top(plain.rerank(value, history, *inputs), catalog, k))
            if affinity is not None:
                alone.append(_top(affinity.ranked, catalog, k))
            for n, scorer in enumerate(scorers):
                reranked = scorer.rerank(value, history, *inputs, fresh_affinity=affinity)
                ranked[n].append(_top(reranked, catalog, k))
    results = [ranking_metrics(r, targets, (k,)) for r in ranked]
    order = sorted(
        range(len(grid)),
        key=lambda n: (-round(results[n][f"ndcg@{k}"], 5), grid[n].affinity_candidates),
    )
    best = order[0]
    untuned_row = ranking_metrics(untuned, targets, (k,))

    def row(n: int) -> dict[str, Any]:
        return {**grid[n].model_dump(mode="json"), **_rounded(results[n], k)}

    config = serving.model_copy(
        update={
            "rerank": grid[best],
            "rerank_tuning": {
                "chosen_on": f"validation split, {len(targets)} users one event past their "
                f"snapshot entry: the best NDCG@{k} over a grid of {len(grid)} settings",
                "fresh_item_model": items.fresh_model.version if items is not None else None,
                "best": row(best),
                "without_encode": _rounded(untuned_row, k),
                "item_level_alone": _rounded(ranking_metrics(alone, targets, (k,)), k)
                if alone
                else None,
                "top": [row(n) for n in order[:10]],
                "seconds": round(time.monotonic() - t0, 1),
                "created_at": utc_now(),
            },
        }
    )
    config.write(model_dir)
    return config.model_dump(mode="json")


def _rounded(metrics: dict[str, float], k: int) -> dict[str, float]:
    return {m: round(metrics[m], 5) for m in (f"recall@{k}", f"ndcg@{k}")}
