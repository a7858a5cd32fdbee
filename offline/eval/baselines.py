"""The baselines every quality report shows beside our rows: item-to-item co-visitation, the
afternoon baseline (notes/quality-probe.md), the catalog's own table, popularity.

Co-visitation: Successor counts, predecessors at half weight, from the last
three history items weighted 1, 1/2, 1/4; history items removed; popular items fill the rest."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from offline.data import Example, Sequences, Split
from offline.eval.metrics import ranking_metrics
from service.contracts.catalog import Catalog
from service.contracts.covisit import Neighbours, covisit_scores, top_scored


class CoVisitation:
    def __init__(self, train: Sequences, predecessor_weight: float = 0.5) -> None:
        self.next: dict[str, Counter[str]] = defaultdict(Counter)
        popularity: Counter[str] = Counter()
        for seq in train.items:
            popularity.update(seq)
            for prev, nxt in itertools.pairwise(seq):
                self.next[prev][nxt] += 1.0
                self.next[nxt][prev] += predecessor_weight
        self.popular = [item for item, _ in popularity.most_common()]

    def recommend(self, history: Sequence[str], k: int) -> list[str]:
        seen = set(history)
        scores: Counter[str] = Counter()
        for weight, item in zip((1.0, 0.5, 0.25), reversed(history[-3:]), strict=False):
            for other, count in self.next.get(item, {}).items():
                if other not in seen:
                    scores[other] += weight * count
        ranked = [item for item, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))][:k]
        if len(ranked) < k:
            taken = seen | set(ranked)
            ranked += [i for i in self.popular if i not in taken][: k - len(ranked)]
        return ranked


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


def baseline_rows(
    data: Split, examples: Sequence[Example], split: str, k: int
) -> dict[str, dict[str, float]]:
    """Co-visitation from the training split (comparable with the papers) and, on test, with
    the validation transitions counted too (what a refit model sees)."""
    rows = {"co-visitation (train split)": covisitation_baseline(data.train, examples, k)}
    if split == "test":
        rows["co-visitation (train + validation)"] = covisitation_baseline(
            data.train_and_valid, examples, k
        )
    rows["popularity (train split)"] = popularity_baseline(data.train, examples, k)
    return {name: {m: round(v, 5) for m, v in row.items()} for name, row in rows.items()}
