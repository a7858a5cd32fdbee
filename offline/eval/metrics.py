"""Leave-one-out ranking metrics: Recall@k (hit rate) and NDCG@k with one relevant item."""

from __future__ import annotations

import math
from collections.abc import Sequence

TOP_K = 10  # the list length every report ranks to (Recall@10 / NDCG@10: the papers' headline)


def ranking_metrics(
    ranked: Sequence[Sequence[str]], targets: Sequence[str], ks: Sequence[int] = (5, TOP_K)
) -> dict[str, float]:
    if len(ranked) != len(targets):
        raise ValueError("one ranked list per target")
    n = max(len(targets), 1)
    out: dict[str, float] = {}
    for k in ks:
        hits = 0
        gain = 0.0
        for items, target in zip(ranked, targets, strict=True):
            top = list(items[:k])
            if target in top:
                hits += 1
                gain += 1.0 / math.log2(top.index(target) + 2)
        out[f"recall@{k}"] = hits / n
        out[f"ndcg@{k}"] = gain / n
    out["users"] = len(targets)
    return out
