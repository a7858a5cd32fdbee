"""The recommend chain, transport-free: REST and gRPC are thin adapters over :class:`Recommender`.

Per request: one Redis round trip (C_u + history), one for the co-visitation neighbours of the
fresh last items (often served from an in-process cache); the stored answer for an unchanged
history; after fresh events the stored answer re-ranked with the fresh history encoded by the
item-level model (or one engine round scoring whole items under the fresh history), fused with
the features that need no engine (``service.contracts.fusion``), all under a deadline. Anything
missing, mismatched, slow or down becomes a flagged fallback: the item-level model on the known
history, else full decode when the budget allows, else co-visitation of the user's recent items,
else popular items under the user's prefixes, else global popular.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, cast

from service.config import RecommendSettings
from service.contracts.answers import unpack_answer
from service.contracts.beam import BeamSearch
from service.contracts.catalog import Catalog
from service.contracts.manifest import SnapshotManifest
from service.contracts.model import ModelInfo
from service.contracts.snapshot import UserPrefixes
from service.contracts.think_ahead import ScoringSettings, ThinkAheadScorer, entry_history
from service.contracts.tokens import Code
from service.core.clock import Clock
from service.core.context import RequestContext, snapshot_problem
from service.core.explain import Explanation, RationaleAbsent, explain
from service.core.ranking import backfill, covisitation, item_level, popular, top_items
from service.core.reads import Reads
from service.core.rounds import EngineRounds
from service.core.types import (
    Degraded,
    DegradedReason,
    Recommendation,
    RecommendQuery,
    ScoredItem,
    Source,
    Strategy,
    check_id,
    check_ids,
)
from service.errors import InvalidRequest
from service.metrics import Metrics
from service.storage.store import UserRead

if TYPE_CHECKING:  # torch stays out of the chain's imports
    from service.core.fresh_items import FreshItems

# Answers made from the user's snapshot entry: they may show its rationale.
_FROM_ENTRY = frozenset({Source.THINK_AHEAD, Source.THINK_AHEAD_RERANK})
# After these, full decode is not tried: the engine just failed, or the budget is spent.
_ENGINE_SPENT = frozenset({DegradedReason.ENGINE_UNAVAILABLE, DegradedReason.BUDGET_EXCEEDED})


class Recommender:
    """The recommend use case: validates a query and answers it, from think-ahead or a flagged
    fallback; nothing here knows HTTP or gRPC."""

    def __init__(
        self,
        catalog: Catalog,
        model: ModelInfo,
        reads: Reads,
        rounds: EngineRounds,
        settings: RecommendSettings,
        scoring: ScoringSettings,
        metrics: Metrics,
        max_snapshot_age_s: float,
        fresh_items: FreshItems | None = None,
    ) -> None:
        """``fresh_items``: the item-level model, to encode a fresh history for the no-engine
        answer after an event (None: that answer uses the entry's stored item-level scores)."""
        self.catalog = catalog
        self.fresh_items = fresh_items
        self.model = model
        self.reads = reads
        self.corrupt = reads.corrupt  # the one decode-or-count helper, shared with the reads
        self.rounds = rounds
        self.settings = settings
        self.scorer = ThinkAheadScorer(catalog, model.token_ids, scoring)
        self.metrics = metrics
        self.max_snapshot_age_s = max_snapshot_age_s
        # a user with no history and no exclusions decodes the same empty prompt under the
        # same constraint: decoded once per beam width, then answered without the engine
        self._no_history_beams: dict[int, list[tuple[Code, float]]] = {}

    def validate(self, q: RecommendQuery) -> None:
        s = self.settings
        check_id("user_id", q.user_id)
        if not 1 <= q.k <= s.max_k:
            raise InvalidRequest("k", f"must be between 1 and {s.max_k}, got {q.k}")
        check_ids("recent_item_ids", q.recent_item_ids, s.max_list_items)
        check_ids("exclude_item_ids", q.exclude_item_ids, s.max_list_items)
        if q.budget_ms is not None and not 1 <= q.budget_ms <= s.max_budget_ms:
            raise InvalidRequest("budget_ms", f"must be between 1 and {s.max_budget_ms}")

    def use_scoring(self, settings: ScoringSettings) -> None:
        """Score with ``settings`` from the next request on."""
        self.scorer = ThinkAheadScorer(self.catalog, self.model.token_ids, settings)

    def answer_scoring(self, manifest: SnapshotManifest) -> ScoringSettings:
        """How this service scores an unchanged user under ``manifest``'s snapshot."""
        settings = self.scorer.settings
        prefixes = min(settings.prefixes, manifest.prefixes_per_user)
        return settings.model_copy(update={"prefixes": prefixes})

    # ----- the chain -------------------------------------------------------------------
    async def recommend(self, q: RecommendQuery) -> Recommendation:
        """read -> judge the snapshot -> think-ahead -> full decode -> fallbacks; each step
        answers or raises :class:`Degraded` with why it could not."""
        self.validate(q)
        ctx = await self._open(q)
        if q.strategy is Strategy.FULL_DECODE:
            return await self._full_decode(ctx, None)
        try:
            ctx.value = self._judge(ctx)
            return await self._think_ahead(ctx, ctx.value)
        except Degraded as exc:
            reason = exc.reason
        answer = await self._item_level(ctx, reason)
        if answer is not None:
            return answer
        rounds = self.rounds
        if reason not in _ENGINE_SPENT and rounds.healthy and rounds.full_decode_fits(ctx.clock):
            return await self._full_decode(ctx, reason)
        return await self._without_engine(ctx, reason)

    async def _open(self, q: RecommendQuery) -> RequestContext:
        """The request's context: one Redis round trip for the user's snapshot value and
        history (the co-visitation neighbours of the fresh last items, often cached, are read
        only when a step needs them: :meth:`_covisit`)."""
        clock = Clock(
            (q.budget_ms or self.settings.default_budget_ms) / 1000, self.metrics.stage_seconds
        )
        active = self.reads.active()
        problem = snapshot_problem(active)
        usable = active if problem is None else None
        try:
            read = await self.reads.user(
                None if usable is None else usable.snapshot_id, q.user_id, clock
            )
        except Degraded as exc:
            read, problem = UserRead(None, []), exc.reason
        fresh = [*read.history, *q.recent_item_ids]
        history = self.catalog.codes_of(fresh)[0][-self.model.max_history :]
        excluded_ids = set(q.exclude_item_ids) | (
            set(fresh) if self.scorer.settings.exclude_history else set()
        )
        return RequestContext(
            q=q,
            clock=clock,
            request_id=q.request_id or uuid.uuid4().hex[:16],
            snapshot_id=active.snapshot_id if active is not None else None,
            snapshot_value=read.snapshot_value,
            history=history,
            constraint=self.scorer.constraint(
                history, self.catalog.codes_of(q.exclude_item_ids)[0]
            ),
            prompt=self.model.token_ids.history(history),
            problem=problem,
            manifest=usable.manifest if usable is not None else None,
            fresh_ids=fresh,
            excluded_ids=excluded_ids,
        )

    def _judge(self, ctx: RequestContext) -> UserPrefixes:
        """The user's snapshot value when think-ahead can use it; else raises why not."""
        if ctx.problem is not None:
            raise Degraded(ctx.problem)
        if ctx.snapshot_value is None:
            raise Degraded(DegradedReason.NO_PREFIXES)
        value = self.corrupt.decode("snapshot_user", UserPrefixes.decode, ctx.snapshot_value, None)
        if value is None:
            raise Degraded(DegradedReason.CORRUPT_VALUE)
        if (value.catalog_version, value.model_version) != (
            self.catalog.version,
            self.model.version,
        ):
            raise Degraded(DegradedReason.VERSION_MISMATCH)
        if time.time() - value.computed_at > self.max_snapshot_age_s:
            raise Degraded(DegradedReason.STALE_SNAPSHOT)
        if not value.prefixes:
            raise Degraded(DegradedReason.NO_PREFIXES)
        return value

    async def _think_ahead(self, ctx: RequestContext, value: UserPrefixes) -> Recommendation:
        stored = self._stored_answer(ctx, value)
        if stored:
            self.metrics.precomputed_answers.inc()
            return self._answer(ctx, stored, Source.THINK_AHEAD, None)
        plan = self.scorer.plan(
            value,
            ctx.history,
            await self._covisit(ctx),
            ctx.q.k,
            constraint=ctx.constraint,
            unchanged=ctx.unchanged,
            on_corrupt=self.corrupt.count,
        )
        if plan.empty:
            raise Degraded(DegradedReason.PREFIXES_EXCLUDED)
        requests = plan.requests
        if requests and self._rerank_instead(ctx):
            reranked = await self._rerank(ctx, value)
            if reranked:
                return self._answer(ctx, reranked, Source.THINK_AHEAD_RERANK, None)
        results = await self.rounds.score(requests, ctx.clock, ctx.request_id) if requests else []
        items = top_items(self.catalog, self.scorer.rank(plan, results), ctx.q.k)
        if not items:
            raise Degraded(DegradedReason.PREFIXES_EXCLUDED)
        return self._answer(ctx, items, Source.THINK_AHEAD, None)

    def _rerank_instead(self, ctx: RequestContext) -> bool:
        mode = self.settings.fresh_path
        if mode == "engine" or ctx.manifest is None:
            return False
        if mode == "rerank" or self.fresh_items is not None:
            return True  # with the fresh encode the re-rank is the better answer, not a cheaper one
        target_ms = self.settings.fresh_round_target_ms
        target_s = None if target_ms is None else target_ms / 1000
        return not self.rounds.round_fits(ctx.clock, target_s)

    async def _rerank(self, ctx: RequestContext, value: UserPrefixes) -> list[ScoredItem] | None:
        """The fresh-event answer without an engine round: the entry's stored answer re-ranked
        for the fresh co-visitation and, with :attr:`fresh_items`, the fresh history's
        item-level scores (``ThinkAheadScorer.rerank``); None when the entry stores no answer
        for this scoring."""
        manifest = ctx.manifest
        if manifest is None or manifest.answers_key != self.answer_scoring(manifest).key():
            return None
        old = entry_history(value, ctx.history)
        fresh = await self._covisit(ctx)
        stale = fresh
        if old is not None and ctx.snapshot_id is not None:
            old_ids = [i for c in old if (i := self.catalog.item_at(c)) is not None]
            stale = await self.reads.covisit(ctx.snapshot_id, old_ids, set(old_ids), ctx.clock)
        fresh_affinity = None
        if self.fresh_items is not None:
            fresh_affinity = await self.fresh_items.affinity(
                ctx.history, self.scorer.settings.exclude_history, ctx.clock
            )
        ranked = self.scorer.rerank(
            value,
            ctx.history,
            fresh,
            stale,
            ctx.constraint,
            self.corrupt.count,
            fresh_affinity=fresh_affinity,
        )
        return top_items(self.catalog, ranked, ctx.q.k) if ranked else None

    def _stored_answer(self, ctx: RequestContext, value: UserPrefixes) -> list[ScoredItem] | None:
        """The snapshot's whole answer, when this request would be scored exactly as the
        worker scored it: no engine round at all."""
        manifest = ctx.manifest
        if manifest is None or not value.answer or not ctx.unchanged:
            return None
        if not self.answer_scoring(manifest).serves(
            manifest.answers_key, manifest.answer_items, ctx.q.k
        ):
            return None
        ranked = self.corrupt.decode("snapshot_answer", unpack_answer, value.answer, None)
        if ranked is None:
            return None
        # the constraint is the one the worker used; checking it keeps a damaged value from
        # ever serving an excluded or unknown item
        return top_items(
            self.catalog, [(c, s) for c, s in ranked if ctx.constraint.allows(c)], ctx.q.k
        )

    async def _full_decode(
        self, ctx: RequestContext, reason: DegradedReason | None
    ) -> Recommendation:
        """``reason``: why think-ahead did not answer (None: the query asked for full decode)."""
        width = max(ctx.q.k, self.settings.full_decode_beam)
        shared = not ctx.history and not ctx.excluded_ids
        beams = self._no_history_beams.get(width) if shared else None
        if beams is None:
            search = BeamSearch(ctx.prompt, self.model.token_ids, ctx.constraint, width)
            try:
                await self.rounds.full_decode(search, ctx.clock, ctx.request_id)
            except Degraded as exc:
                return await self._without_engine(ctx, reason or exc.reason)
            beams = [(cast(Code, b.code), b.score) for b in search.beams]
            if shared:
                self._no_history_beams[width] = beams
        items = top_items(self.catalog, beams, ctx.q.k)
        if not items:  # the trie search never dead-ends: nothing decoded, nothing is allowed
            return await self._without_engine(ctx, reason or DegradedReason.ALL_EXCLUDED)
        return self._answer(ctx, items, Source.FULL_DECODE, reason)

    async def _item_level(
        self, ctx: RequestContext, reason: DegradedReason
    ) -> Recommendation | None:
        """No usable entry but a known history: the item-level model on it (the service's
        fresh encode: about 1 ms, no engine), fused with its co-visitation. Before full decode:
        on Beauty test one item-level model alone reaches R@10 .0990 where the (distilled)
        decoder's full decode reaches .0831. None
        without the model, a history or the budget for an encode."""
        if self.fresh_items is None or not ctx.history:
            return None
        affinity = await self.fresh_items.affinity(
            ctx.history, self.scorer.settings.exclude_history, ctx.clock
        )
        if affinity is None or not affinity.ranked:
            return None
        covisit = await self._covisit(ctx)
        weights = self.scorer.settings.rerank_weights
        items = item_level(self.catalog, affinity, covisit, ctx.constraint, weights, ctx.q.k)
        return self._answer(ctx, items, Source.ITEM_LEVEL, reason) if items else None

    async def _without_engine(self, ctx: RequestContext, reason: DegradedReason) -> Recommendation:
        """Co-visitation of the user's recent items, else popular items under the user's
        prefixes, else global popular."""
        weight = self.scorer.settings.weights.popularity
        items = covisitation(
            self.catalog, await self._covisit(ctx), ctx.constraint, weight, ctx.q.k
        )
        if items:
            return self._answer(ctx, items, Source.COVISITATION, reason)
        prefixes = ctx.value.prefixes if ctx.value is not None else ()
        source, items = popular(self.catalog, prefixes, ctx.constraint, ctx.q.k)
        return self._answer(ctx, items, source, reason)

    async def _covisit(self, ctx: RequestContext) -> dict[str, float]:
        """Co-visitation scores of the fresh history's neighbours, read once per request."""
        if ctx.covisit is None:
            ctx.covisit = (
                await self.reads.covisit(
                    ctx.snapshot_id, ctx.fresh_ids, ctx.excluded_ids, ctx.clock
                )
                if ctx.snapshot_id is not None and ctx.fresh_ids
                else {}
            )
        return ctx.covisit

    def _answer(
        self,
        ctx: RequestContext,
        items: list[ScoredItem],
        source: Source,
        reason: DegradedReason | None,
    ) -> Recommendation:
        if reason is not None:
            self.metrics.fallbacks.labels(reason.value, source.value).inc()
        backfilled = 0
        if len(items) < ctx.q.k:
            items, backfilled = backfill(self.catalog, items, ctx.constraint, ctx.q.k)
        reasoning, rationale, absent = self._reasoning(ctx, source)
        timings = ctx.clock.timings()
        self.metrics.answers.labels("yes" if timings.decode_ms > 0 else "no").inc()
        return Recommendation(
            items=items,
            source=source,
            degraded_reason=reason,
            model_version=self.model.version,
            catalog_version=self.catalog.version,
            snapshot_id=ctx.snapshot_id,
            timings=timings,
            reasoning=reasoning,
            request_id=ctx.request_id,
            backfilled=backfilled,
            rationale=rationale,
            reasoning_absent=absent,
        )

    def _reasoning(
        self, ctx: RequestContext, source: Source
    ) -> tuple[str | None, Explanation | None, RationaleAbsent | None]:
        """(text, structured rationale, why there is none) for ``include_reasoning``: the
        entry's, only with the answer that came from it."""
        if not ctx.q.include_reasoning:
            return None, None, None
        if ctx.value is None:
            return None, None, RationaleAbsent.NO_ENTRY
        if source not in _FROM_ENTRY:
            return None, None, RationaleAbsent.FALLBACK_ANSWER
        found = explain(ctx.value, self.catalog.categories, self.corrupt)
        if isinstance(found, Explanation):
            return found.text, found, None
        if ctx.value.reasoning:  # a chat model's free text
            return ctx.value.reasoning, None, None
        return None, None, found
