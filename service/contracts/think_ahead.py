"""The think-ahead scorer: how one user's snapshot entry and fresh history become a ranking.

The one home of the served scoring. The service (per request), the worker (each user's stored
answer), ``thinkahead eval`` / ``tune-blend`` and the bench all build their engine requests
with :meth:`ThinkAheadScorer.plan` and rank the answers with :meth:`ThinkAheadScorer.rank`,
under one frozen :class:`ScoringSettings` read from the model's ``serving.json`` (learned on
validation by ``thinkahead tune-blend``), overridden by the service's settings or a job's
flags. Its :meth:`~ScoringSettings.key` names the settings that decide an unchanged user's
answer: the worker records it in the snapshot manifest, and the service serves a stored answer
only under the same key.

A plan's candidates are the entry's top ``prefixes`` (a, b) prefixes plus the prefixes of the
best co-visitation neighbours of the fresh history and of the user's best item-level items
(``service.contracts.fusion.extra_prefixes``); the requests and their bounds are
``service.contracts.scoring``'s, the fused score ``service.contracts.fusion``'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from service.contracts.affinity import NO_AFFINITY, Affinity
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.covisit import top_scored
from service.contracts.fusion import (
    FusionWeights,
    ItemFeatures,
    covisit_prefixes,
    extra_prefixes,
    rank_fused,
)
from service.contracts.manifest import sha256_hex
from service.contracts.packed import unpack_scored
from service.contracts.rationale import DEFAULT_RATIONALE, RationaleSettings
from service.contracts.scoring import (
    Pruning,
    ScoredCode,
    ScoringPlan,
    candidate_prefixes,
    combine,
    plan_item_scoring,
)
from service.contracts.snapshot import UserPrefixes, history_digest
from service.contracts.tokens import Code, TokenIds
from service.engine.base import ScoreRequest, TokenLogprobs

# Without a serving.json (no tune-blend run for this model): what tune-blend learned on Beauty's
# validation split for an earlier model (benchmarks/beauty/HISTORY.md), the defaults for any
# catalog, tuned on nothing of its own. Later models' tunes moved within a flat optimum (their
# grids' top ten settings within 1%; benchmarks/beauty/serving.json is the served model's).
# Without an item-level model the affinity terms are 0.
DEFAULT_WEIGHTS = FusionWeights(offline=0.0, covisit=4.0, popularity=0.1, affinity=2.0)
DEFAULT_COVISIT_CANDIDATES = 10
DEFAULT_AFFINITY_CANDIDATES = 10
DEFAULT_PREFIXES = 32
# The no-engine fresh answer's, as `thinkahead tune-rerank` chose them on Beauty's validation
# split (benchmarks/beauty/fresh-paths.md): the stored decoder terms, computed for the history
# before the event, count a quarter; the fresh item-level scores twice.
DEFAULT_RERANK_WEIGHTS = FusionWeights(offline=0.0, covisit=4.0, popularity=0.0, affinity=2.0)
DEFAULT_RERANK_STORED = 0.25


class RerankSettings(BaseModel):
    """How the no-engine fresh answer weighs what it knows: the stored answer's decoder and
    offline terms (computed for the history before the fresh events), the fresh co-visitation,
    and the fresh history's item-level scores when the service encodes it
    (``service.core.fresh_items``). Chosen on validation (``benchmarks/beauty/fresh-paths.md``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weights: FusionWeights | None = Field(
        default_factory=lambda: DEFAULT_RERANK_WEIGHTS,
        description="the fused score's weights here (None: the served ones)",
    )
    stored: float = Field(
        default=DEFAULT_RERANK_STORED,
        ge=0,
        description="scale of the stored decoder and offline terms: they describe the history "
        "before the fresh events",
    )
    affinity_candidates: int = Field(
        default=20,
        ge=0,
        description="the fresh history's best item-level items added to the candidates",
    )


class ScoringSettings(BaseModel):
    """Everything that decides a user's served ranking besides the model, the catalog and the
    snapshot entry itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weights: FusionWeights = Field(default_factory=lambda: DEFAULT_WEIGHTS)
    covisit_candidates: int = Field(
        default=DEFAULT_COVISIT_CANDIDATES,
        ge=0,
        description="co-visitation neighbours of the fresh history added to the candidates",
    )
    affinity_candidates: int = Field(
        default=DEFAULT_AFFINITY_CANDIDATES,
        ge=0,
        description="the user's best item-level items (stored by the worker) added to the "
        "candidates",
    )
    prefixes: int = Field(
        default=DEFAULT_PREFIXES, ge=1, le=256, description="M snapshot prefixes used online"
    )
    exclude_history: bool = True
    # Approximations on the fresh-event path only: they never change an unchanged user's answer
    # (the snapshot's scores are then exact), so they stay out of the key.
    reuse_snapshot_b: bool = Field(
        default=True,
        description="after fresh events, reuse log P(b | a) from the snapshot: one engine "
        "request for the first tokens instead of one per distinct first token",
    )
    reuse_snapshot_c: bool = Field(
        default=True,
        description="reuse log P(c | a, b) stored in the snapshot, renormalised over the c's "
        "still allowed: no engine request for the c step of a prefix whose allowed c's were "
        "all stored (exact for an unchanged history)",
    )
    rerank: RerankSettings = Field(
        default_factory=lambda: RerankSettings(),
        description="the no-engine answer after fresh events (THINK_AHEAD_RERANK)",
    )
    # what the worker's answer rationale mixes in; it changes no ranking, so not in the key
    rationale: RationaleSettings = DEFAULT_RATIONALE

    @property
    def rerank_weights(self) -> FusionWeights:
        """The no-engine answers' weights: the re-rank's own, else the served ones."""
        return self.rerank.weights or self.weights

    def key(self) -> str:
        """The hash that keys stored answers. Terms left at zero stay out of it, so snapshots
        published before those terms existed keep serving their stored answers."""
        weights = self.weights.model_dump(mode="json")
        if not weights["affinity"]:
            del weights["affinity"]
        body: dict[str, object] = {
            "weights": weights,
            "covisit_candidates": self.covisit_candidates,
            "prefixes": self.prefixes,
            "exclude_history": self.exclude_history,
        }
        if self.affinity_candidates:
            body["affinity_candidates"] = self.affinity_candidates
        return sha256_hex(json.dumps(body, sort_keys=True).encode())

    def serves(self, stored_key: str | None, stored_items: int, k: int) -> bool:
        """Whether answers stored under ``stored_key``, ranked to ``stored_items``, hold this
        scoring's top ``k``: pruning for the top N keeps every candidate the top k needs."""
        return stored_key == self.key() and k <= stored_items


T = TypeVar("T")
OnCorrupt = Callable[[str, ValueError], None]  # (field, error): a damaged packed field


def _ignore(_field: str, _error: ValueError) -> None:
    return None


@dataclass(frozen=True)
class ThinkAheadPlan:
    """One user's engine requests and everything needed to rank their answers."""

    scoring: ScoringPlan
    features: ItemFeatures
    snapshot_ab: frozenset[tuple[int, int]]
    covisit_ab: tuple[tuple[int, int], ...]  # best first
    affinity_ab: tuple[tuple[int, int], ...]  # best first

    @property
    def requests(self) -> list[ScoreRequest]:
        return self.scoring.requests

    @property
    def empty(self) -> bool:
        """No candidate left (every prefix's items excluded)."""
        return not self.scoring.prefixes


class ThinkAheadScorer:
    """Pure and transport-free: no I/O, no engine. Callers send :attr:`ThinkAheadPlan.requests`
    to their engine (one round) and hand the answers to :meth:`rank`."""

    def __init__(self, catalog: Catalog, ids: TokenIds, settings: ScoringSettings) -> None:
        self.catalog = catalog
        self.ids = ids
        self.settings = settings

    def constraint(self, history: Sequence[Code], exclude: Sequence[Code] = ()) -> Constraint:
        """What the ranking may return: catalog items, minus the history (when the settings
        exclude it) and ``exclude``."""
        excluded = [*history] if self.settings.exclude_history else []
        return Constraint(self.catalog, [*excluded, *exclude])

    def extras(
        self, covisit: Mapping[str, float], affinity: Affinity = NO_AFFINITY
    ) -> list[tuple[int, int]]:
        """The candidates beside the entry's prefixes, best first, distinct."""
        s = self.settings
        return extra_prefixes(
            self.catalog, covisit, s.covisit_candidates, affinity, s.affinity_candidates
        )

    def plan(
        self,
        value: UserPrefixes,
        history: Sequence[Code],
        covisit: Mapping[str, float],
        k: int,
        *,
        constraint: Constraint | None = None,
        unchanged: bool | None = None,
        prune: bool = True,
        on_corrupt: OnCorrupt = _ignore,
    ) -> ThinkAheadPlan:
        """The requests that score ``value``'s candidates under the fresh ``history``.

        ``covisit``: co-visitation scores of the fresh history's neighbours (history items
        removed). ``constraint``: default :meth:`constraint` of the history. ``unchanged``:
        the history is exactly the one the entry was computed from, so its prefix scores are
        the fresh ones; None: judged by the entry's history digest (the caller must say False
        when it excludes more than the history). ``prune``: bound prefixes out of the top ``k``
        before asking the engine (False scores every candidate: to learn the weights).
        ``on_corrupt``: told of a packed field that does not unpack; the plan goes on as if it
        were absent."""
        s = self.settings
        if unchanged is None:
            unchanged = value.history_digest == history_digest(history)
        affinity = _unpack("snapshot_affinity", Affinity.unpack, value.affinity, on_corrupt)
        c_tails = (
            _unpack("snapshot_c", unpack_scored, value.c_tails, on_corrupt)
            if s.reuse_snapshot_c
            else None
        )
        features = ItemFeatures(self.catalog, covisit, affinity or NO_AFFINITY)
        snapshot = value.prefixes[: s.prefixes]
        covisit_ab = covisit_prefixes(self.catalog, covisit, s.covisit_candidates)
        affinity_ab = features.affinity.prefixes(s.affinity_candidates)
        candidates = candidate_prefixes(
            snapshot,
            dict.fromkeys([*covisit_ab, *affinity_ab]),
            reuse_prefix_scores=unchanged,
            extra_heads=value.covisit_heads,
            first_tokens=value.first_tokens if s.reuse_snapshot_b else (),
            c_tails=c_tails or (),
        )
        scoring = plan_item_scoring(
            self.ids.history(history),
            candidates,
            constraint if constraint is not None else self.constraint(history),
            self.ids,
            top_c=k,
            prune=Pruning(k, s.weights.offline, features.bonus_with(s.weights)) if prune else None,
        )
        return ThinkAheadPlan(
            scoring,
            features,
            frozenset((p.a, p.b) for p in snapshot),
            tuple(covisit_ab),
            tuple(affinity_ab),
        )

    def rerank(
        self,
        value: UserPrefixes,
        history: Sequence[Code],
        covisit: Mapping[str, float],
        stale_covisit: Mapping[str, float],
        constraint: Constraint | None = None,
        on_corrupt: OnCorrupt = _ignore,
        fresh_affinity: Affinity | None = None,
    ) -> list[tuple[Code, float]] | None:
        """The fresh-event answer without an engine round: the entry's stored answer (ranked
        under the history it was computed from) re-scored for the fresh history, plus the
        fresh candidates it lacked; None when the entry stores no answer.

        A stored item keeps its decoder and offline terms (scaled by ``rerank.stored``) and
        swaps its co-visitation feature (``stale_covisit``: the scores under the entry's
        history) for the fresh one; with ``fresh_affinity`` (the fresh history's best
        item-level items, encoded by the service) its item-level feature too. A new candidate
        (the fresh events' co-visitation neighbours, the fresh item-level items) has no decoder
        or offline term without the engine: it gets the lowest of the stored items' (it was not
        in the top answer, so the decoder put it lower), plus its own features. Measured
        against the engine path on validation (``thinkahead eval --stale-events 1 --fresh-path
        rerank``)."""
        s = self.settings
        raw = _unpack("snapshot_answer", unpack_scored, value.answer, on_corrupt)
        if not raw:
            return None
        stored = _unpack("snapshot_affinity", Affinity.unpack, value.affinity, on_corrupt)
        stored = stored or NO_AFFINITY
        fresh_items = fresh_affinity if fresh_affinity is not None else stored
        fresh = ItemFeatures(self.catalog, covisit, fresh_items)
        stale = ItemFeatures(self.catalog, stale_covisit, stored)
        allowed = constraint if constraint is not None else self.constraint(history)
        rest: dict[Code, float] = {}  # decoder + offline terms of the stored items
        for code, score in raw:
            rest[code] = score - stale.bonus(code, s.weights)
        floor = min(rest.values())
        codes = (self.catalog.code_of(item) for item in top_scored(covisit, s.covisit_candidates))
        new = [c for c in codes if c is not None]
        if fresh_affinity is not None:
            new.extend(code for code, _ in fresh_affinity.ranked[: s.rerank.affinity_candidates])
        weights = s.rerank_weights
        scale = s.rerank.stored
        ranked = [
            (c, scale * base + fresh.bonus(c, weights))
            for c, base in [
                *rest.items(),
                *((n, floor) for n in dict.fromkeys(new) if n not in rest),
            ]
            if allowed.allows(c)
        ]
        ranked.sort(key=lambda cs: (-cs[1], cs[0]))
        return ranked

    def scored(self, plan: ThinkAheadPlan, results: Sequence[TokenLogprobs]) -> list[ScoredCode]:
        """Every candidate item with its decoder log-prob and offline score, in plan order."""
        return combine(plan.scoring, results, self.ids)

    def rank(
        self,
        plan: ThinkAheadPlan,
        results: Sequence[TokenLogprobs],
        weights: FusionWeights | None = None,
    ) -> list[tuple[Code, float]]:
        """The engine's answers fused into the served ranking, best first. ``weights``: other
        than the settings' (the fallback's re-ranking, tune-blend's grid)."""
        scored = self.scored(plan, results)
        return rank_fused(
            [(s.code, s.decoder, s.offline) for s in scored],
            plan.features,
            weights if weights is not None else self.settings.weights,
        )


def entry_history(
    value: UserPrefixes, history: Sequence[Code], max_events: int = 8
) -> Sequence[Code] | None:
    """The history ``value`` was computed from, when ``history`` is it plus up to
    ``max_events`` fresh events (None: another history, or further behind)."""
    for n in range(1, min(max_events, len(history)) + 1):
        if history_digest(history[:-n]) == value.history_digest:
            return history[:-n]
    return None


def _unpack(
    field: str, unpack: Callable[[bytes], T], raw: bytes, on_corrupt: OnCorrupt
) -> T | None:
    """A packed field of a snapshot entry; None when it is absent or damaged (told)."""
    if not raw:
        return None
    try:
        return unpack(raw)
    except ValueError as exc:
        on_corrupt(field, exc)
        return None
