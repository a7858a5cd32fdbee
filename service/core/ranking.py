"""Answers that need no engine: the top k known items of a scored list, the item-level and
co-visitation fallbacks' rankings, the popular items under the user's prefixes (else globally)
and the popularity backfill of a short answer. Never an item the constraint excludes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from service.contracts.affinity import NO_AFFINITY, Affinity
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.fusion import FusionWeights, ItemFeatures, rank_fused
from service.contracts.snapshot import Prefix
from service.contracts.tokens import Code
from service.core.types import ScoredItem, Source


def top_items(catalog: Catalog, scored: Iterable[tuple[Code, float]], k: int) -> list[ScoredItem]:
    """The first ``k`` catalog items of ``scored`` (best first), skipping non-finite scores."""
    items: list[ScoredItem] = []
    for code, score in scored:
        if not math.isfinite(score):
            continue
        item = catalog.item_at(code)
        if item is not None:
            items.append(ScoredItem(item, score, code))
        if len(items) == k:
            break
    return items


def covisitation(
    catalog: Catalog,
    covisit: Mapping[str, float],
    constraint: Constraint,
    popularity_weight: float,
    k: int,
) -> list[ScoredItem]:
    """The fused score's terms that need no engine, over the co-visitation neighbours: the
    item-level ranking without item-level scores."""
    weights = FusionWeights(covisit=1.0, popularity=min(popularity_weight, 1.0))
    return item_level(catalog, NO_AFFINITY, covisit, constraint, weights, k)


def item_level(
    catalog: Catalog,
    affinity: Affinity,
    covisit: Mapping[str, float],
    constraint: Constraint,
    weights: FusionWeights,
    k: int,
) -> list[ScoredItem]:
    """The fused score's terms that need no engine and no entry: the fresh history's best
    item-level items and its co-visitation neighbours, scored by both (and popularity)."""
    features = ItemFeatures(catalog, covisit, affinity)
    codes = [code for code, _ in affinity.ranked]
    codes += [c for item in covisit if (c := catalog.code_of(item)) is not None]
    scored = [(code, 0.0, 0.0) for code in dict.fromkeys(codes) if constraint.allows(code)]
    return top_items(catalog, rank_fused(scored, features, weights), k)


def popular(
    catalog: Catalog,
    prefixes: Iterable[Prefix],
    constraint: Constraint,
    k: int,
    skip: frozenset[int] = frozenset(),
) -> tuple[Source, list[ScoredItem]]:
    """The most popular allowed items under the user's prefixes, topped up with global popular
    items (rows in ``skip`` never)."""
    under = {
        int(r)
        for p in prefixes
        for r in catalog.rows_under_ab.get((p.a, p.b), ())
        if int(r) not in skip and constraint.allows(catalog.code_at(int(r)))
    }
    chosen = sorted(under, key=lambda r: (-catalog.popularity[r], r))[:k]
    source = Source.PREFIX_POPULAR if chosen else Source.GLOBAL_POPULAR
    taken = set(chosen) | skip
    for row in catalog.rows_by_popularity:
        if len(chosen) >= k:
            break
        row = int(row)
        if row not in taken and constraint.allows(catalog.code_at(row)):
            chosen.append(row)
    items = [
        ScoredItem(catalog.item_ids[r], float(catalog.popularity[r]), catalog.code_at(r))
        for r in chosen
    ]
    return source, items


def backfill(
    catalog: Catalog, items: list[ScoredItem], constraint: Constraint, k: int
) -> tuple[list[ScoredItem], int]:
    """``items`` topped up to ``k`` with popular items, scored below every one of them; and how
    many were added."""
    rows = frozenset(catalog.row_of[i.item_id] for i in items)
    _, extra = popular(catalog, [], constraint, k - len(items), skip=rows)
    floor = min((i.score for i in items), default=0.0)
    filled = [ScoredItem(e.item_id, floor - 1.0 - n, e.code) for n, e in enumerate(extra)]
    return items + filled, len(filled)
