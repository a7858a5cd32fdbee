"""How good the stored rationales are: accurate, beside two history baselines, and faithful.

- accuracy: the next item's category is the rationale's top-1 category, or among its top 3;
- baselines: the most frequent category of the history (ties: the newest), the category of the
  last history item;
- faithfulness: the share of the served top-k items whose category is the rationale shown
  (its top-1).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from service.contracts.catalog import Catalog
from service.contracts.rationale import Categories, Rationale


@dataclass
class RationaleStats:
    categories: Categories
    catalog: Catalog
    users: int = 0
    with_rationale: int = 0
    hits: Counter[str] = field(default_factory=Counter)
    served: int = 0
    agreeing: int = 0

    def category(self, item: str) -> int:
        row = self.catalog.row_of.get(item)
        return int(self.categories.of_row[row]) if row is not None else -1

    def add(
        self,
        history: Sequence[str],
        target: str,
        rationales: Sequence[Rationale],
        served: Sequence[str],
    ) -> None:
        self.users += 1
        truth = self.category(target)
        cats = [c for c in (self.category(i) for i in history) if c >= 0]
        if cats:
            counts = Counter(cats)
            top = max(counts.values())
            frequent = next(c for c in reversed(cats) if counts[c] == top)
            self.hits["most frequent category of the history"] += frequent == truth
            self.hits["category of the last history item"] += cats[-1] == truth
        if not rationales:
            return
        self.with_rationale += 1
        shown = [r.category for r in rationales]
        self.hits["rationale top-1"] += shown[0] == truth
        self.hits["rationale top-3"] += truth in shown[:3]
        self.served += len(served)
        self.agreeing += sum(self.category(i) == shown[0] for i in served)

    def report(self) -> dict[str, float | int]:
        n = max(self.users, 1)
        out: dict[str, float | int] = {
            "users": self.users,
            "users_with_rationale": self.with_rationale,
            **{f"accuracy: {name}": round(hits / n, 5) for name, hits in self.hits.items()},
        }
        if self.served:
            out["faithfulness: served items in the rationale's category"] = round(
                self.agreeing / self.served, 5
            )
        return out
