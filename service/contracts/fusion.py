"""The one fused online score, used identically by the service, ``thinkahead eval --mode
think-ahead``, ``thinkahead tune-blend`` and the bench.

    score(item) = log P(a, b, c | fresh history)            the decoder, one engine round
                + w_offline    * offline prefix score         the snapshot's log P(a, b)
                + w_covisit    * log(1 + co-visitation)       neighbours of the fresh last items
                + w_popularity * log(1 + interactions)        a popularity prior
                + w_affinity   * item-level score             the worker's item-level model

The weights are learned on the validation split only (``thinkahead tune-blend``) and recorded
in the model directory's ``serving.json`` (:class:`service.contracts.model.ServingConfig`). Every
term but the decoder's is known before the engine round, which is what lets the scoring plan bound
prefixes out of the top k without asking the engine (``service.contracts.scoring``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from service.contracts.affinity import NO_AFFINITY, Affinity
from service.contracts.catalog import Catalog
from service.contracts.covisit import feature, top_scored
from service.contracts.tokens import Code


class FusionWeights(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    offline: float = Field(default=0.0, ge=0)
    covisit: float = Field(default=0.0, ge=0)
    popularity: float = Field(default=0.0, ge=0)
    affinity: float = Field(default=0.0, ge=0)


class ItemFeatures:
    """The terms of the fused score that do not need the engine, for one request."""

    def __init__(
        self,
        catalog: Catalog,
        covisit: Mapping[str, float],
        affinity: Affinity = NO_AFFINITY,
    ) -> None:
        self.catalog = catalog
        self.covisit = covisit
        self.affinity = affinity

    def covisit_of(self, code: Code) -> float:
        item = self.catalog.item_at(code)
        return feature(self.covisit.get(item, 0.0)) if item is not None else 0.0

    def popularity_of(self, code: Code) -> float:
        row = self.catalog.row_by_code.get(code)
        return math.log1p(float(self.catalog.popularity[row])) if row is not None else 0.0

    def bonus(self, code: Code, weights: FusionWeights) -> float:
        """Everything but the decoder and the offline prefix score."""
        total = 0.0
        if weights.covisit:
            total += weights.covisit * self.covisit_of(code)
        if weights.popularity:
            total += weights.popularity * self.popularity_of(code)
        if weights.affinity:
            total += weights.affinity * self.affinity.of(code)
        return total

    def bonus_with(self, weights: FusionWeights) -> Callable[[Code], float]:
        return lambda code: self.bonus(code, weights)


def fused(
    decoder: float, offline: float, code: Code, features: ItemFeatures, weights: FusionWeights
) -> float:
    return decoder + weights.offline * offline + features.bonus(code, weights)


def rank_fused(
    scored: Sequence[tuple[Code, float, float]],
    features: ItemFeatures,
    weights: FusionWeights,
) -> list[tuple[Code, float]]:
    """(code, decoder log-prob, offline score) -> (code, fused score), best first, ties by code
    so the order is deterministic."""
    out = [
        (code, fused(dec, off, code, features, weights))
        for code, dec, off in scored
        if math.isfinite(dec)
    ]
    out.sort(key=lambda cs: (-cs[1], cs[0]))
    return out


def covisit_prefixes(
    catalog: Catalog, covisit: Mapping[str, float], n: int
) -> list[tuple[int, int]]:
    """(a, b) of the n best co-visitation neighbours: candidates beside the snapshot's."""
    out: list[tuple[int, int]] = []
    for item in top_scored(covisit, n):
        code = catalog.code_of(item)
        if code is not None and code[:2] not in out:
            out.append(code[:2])
    return out


def extra_prefixes(
    catalog: Catalog,
    covisit: Mapping[str, float],
    covisit_candidates: int,
    affinity: Affinity = NO_AFFINITY,
    affinity_candidates: int = 0,
) -> list[tuple[int, int]]:
    """The candidates beside the snapshot's prefixes: (a, b) of the best co-visitation
    neighbours of the fresh history, then of the user's best item-level items, distinct."""
    out = covisit_prefixes(catalog, covisit, covisit_candidates)
    seen = set(out)
    for ab in affinity.prefixes(affinity_candidates):
        if ab not in seen:
            seen.add(ab)
            out.append(ab)
    return out
