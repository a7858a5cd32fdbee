"""The bench's floor row: the scoring work of one recommend, done in this process by one
batched plain-PyTorch call (``TorchBatchEngine``), one user at a time, with the service's own
planning and ranking code. It shows how far the engine path is from what this machine can do;
it is a measurement, not a second serving path."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from offline.decode.torch_engine import TorchBatchEngine
from offline.eval.metrics import TOP_K
from offline.thinkahead.entries import CovisitSource
from service.contracts.beam import BeamSearch, run_searches
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.covisit import covisit_scores
from service.contracts.model import ModelInfo
from service.contracts.snapshot import UserPrefixes
from service.contracts.think_ahead import ScoringSettings, ThinkAheadScorer
from service.contracts.tokens import Code


def _timed(work: Callable[[], int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    requests = work()
    return (time.perf_counter() - t0) * 1e3, requests


def floor_rows(
    engine: TorchBatchEngine,
    model: ModelInfo,
    catalog: Catalog,
    scoring: ScoringSettings,
    covisit: CovisitSource | None,
    users: Sequence[tuple[list[Code], UserPrefixes]],
    fresh_item: str,
    k: int = TOP_K,
    full_decode_beam: int = 20,
) -> list[dict[str, Any]]:
    """p50 / p99 ms and engine requests per recommend for the bench's three scenarios, planned
    as the service plans them with ``scoring``."""
    ids = model.token_ids
    scorer = ThinkAheadScorer(catalog, ids, scoring)
    neighbours = covisit.neighbours if covisit is not None else {}

    def think_ahead(history: list[Code], value: UserPrefixes, recent: list[str]) -> int:
        items = [i for c in history if (i := catalog.item_at(c)) is not None] + recent
        codes = catalog.codes_of(items)[0][-model.max_history :]
        scores = covisit_scores(items, neighbours, set(items))
        plan = scorer.plan(value, codes, scores, k, unchanged=not recent)
        results = engine.score_batch(plan.requests) if plan.requests else []
        scorer.rank(plan, results)
        return len(plan.requests)

    def full_decode(history: list[Code], recent: list[str]) -> int:
        codes = [*history, *catalog.codes_of(recent)[0]][-model.max_history :]
        search = BeamSearch(
            ids.history(codes), ids, Constraint(catalog, codes), max(k, full_decode_beam)
        )
        sent = 0

        def score(requests: Any) -> Any:
            nonlocal sent
            sent += len(requests)
            return engine.score_batch(requests)

        run_searches([search], score)
        return sent

    scenarios: dict[str, Callable[[list[Code], UserPrefixes], int]] = {
        "think-ahead, engine path (no stored answer)": lambda h, v: think_ahead(h, v, []),
        "think-ahead + 1 new event": lambda h, v: think_ahead(h, v, [fresh_item]),
        "full decode": lambda h, v: full_decode(h, []),
    }
    rows = []
    for name, work in scenarios.items():
        samples = [_timed(lambda h=h, v=v, w=work: w(h, v)) for h, v in users]  # type: ignore[misc]
        ms = np.array([s[0] for s in samples])
        rows.append(
            {
                "scenario": name,
                "users": len(samples),
                "p50_ms": round(float(np.percentile(ms, 50)), 2),
                "p99_ms": round(float(np.percentile(ms, 99)), 2),
                "requests_per_recommend": round(float(np.mean([s[1] for s in samples])), 1),
            }
        )
    return rows
