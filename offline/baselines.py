"""Item-to-item co-visitation: the afternoon baseline every quality report shows beside the
decoder (notes/quality-probe.md). Successor counts, predecessors at half weight, from the last
three history items weighted 1, 1/2, 1/4; history items removed; popular items fill the rest."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Sequence

from offline.data import Sequences


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
