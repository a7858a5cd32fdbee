"""The recommend use case, transport-free: REST and gRPC are thin adapters over this class.

Per request: one Redis round trip (C_u + history), one for the co-visitation neighbours of the
fresh last items (often served from an in-process cache), one engine round scoring whole items
under the fresh history, fused with the features that need no engine (``service.contracts.fusion``),
all under a deadline. Anything missing, mismatched, slow or down becomes a flagged fallback: full
decode when the budget allows, else co-visitation of the user's recent items, else popular
items under the user's prefixes, else global popular.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from service.config import RecommendSettings
from service.contracts.answers import unpack_answer
from service.contracts.beam import BeamSearch, run_searches_async
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.covisit import EMPTY as EMPTY_NEIGHBOURS
from service.contracts.covisit import (
    CovisitError,
    NeighbourCache,
    Neighbours,
    covisit_scores,
    recent_items,
)
from service.contracts.fusion import FusionWeights, ItemFeatures, rank_fused
from service.contracts.manifest import SnapshotManifest
from service.contracts.model import ModelInfo
from service.contracts.snapshot import CorruptValue, Prefix, UserPrefixes, history_digest
from service.contracts.think_ahead import ScoringSettings, ThinkAheadScorer
from service.contracts.tokens import Code
from service.engine.base import Engine, EngineError, ScoreRequest, TokenLogprobs
from service.engine.breaker import CircuitBreaker
from service.errors import InvalidRequest, RedisUnavailable
from service.metrics import Metrics
from service.storage.snapshot_watch import SnapshotWatcher
from service.storage.store import SnapshotStore, UserRead

T = TypeVar("T")
log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
ID_RULE = "1-128 characters from A-Z a-z 0-9 _ . : @ -"


class Source(StrEnum):
    THINK_AHEAD = "think_ahead"
    FULL_DECODE = "full_decode"
    COVISITATION = "fallback_covisitation"
    PREFIX_POPULAR = "fallback_prefix_popular"
    GLOBAL_POPULAR = "fallback_global_popular"


class Strategy(StrEnum):
    THINK_AHEAD = "think_ahead"
    FULL_DECODE = "full_decode"


@dataclass(frozen=True)
class RecommendQuery:
    user_id: str
    k: int = 10
    recent_item_ids: tuple[str, ...] = ()
    exclude_item_ids: tuple[str, ...] = ()
    budget_ms: int | None = None
    include_reasoning: bool = False
    strategy: Strategy = Strategy.THINK_AHEAD
    request_id: str | None = None


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float
    code: Code


@dataclass(frozen=True)
class Timings:
    redis_ms: float
    decode_ms: float
    total_ms: float


@dataclass(frozen=True)
class Recommendation:
    items: list[ScoredItem]
    source: Source
    degraded_reason: str | None
    model_version: str
    catalog_version: str
    snapshot_id: str | None
    timings: Timings
    reasoning: str | None
    request_id: str
    backfilled: int = 0  # tail items topped up by popularity when the candidates ran short

    @property
    def degraded(self) -> bool:
        return self.degraded_reason is not None


@dataclass(frozen=True)
class EventsResult:
    history_length: int
    unknown_item_ids: list[str]
    replayed: bool = False  # answered from an earlier call with the same idempotency key


def check_id(field: str, value: str) -> None:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise InvalidRequest(field, f"must be {ID_RULE}")


def check_ids(field: str, values: Sequence[str], limit: int) -> None:
    if len(values) > limit:
        raise InvalidRequest(field, f"at most {limit} ids, got {len(values)}")
    for i, value in enumerate(values):
        check_id(f"{field}[{i}]", value)


class _Clock:
    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s
        self.redis_s = 0.0
        self.decode_s = 0.0

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def timings(self) -> Timings:
        total = time.perf_counter() - self.start
        return Timings(self.redis_s * 1e3, self.decode_s * 1e3, total * 1e3)


@dataclass
class _Request:
    """One recommend request's state, passed along the chain instead of long argument lists."""

    q: RecommendQuery
    clock: _Clock
    request_id: str
    snapshot_id: str | None
    snapshot_value: bytes | None
    history: list[Code]  # the fresh history's codes (stored + recent), oldest first
    constraint: Constraint
    prompt: list[int]
    value: UserPrefixes | None = None
    manifest: SnapshotManifest | None = None  # the active snapshot's
    fresh_ids: list[str] = field(default_factory=list)  # stored history + recent, oldest first
    excluded_ids: set[str] = field(default_factory=set)
    # read on first use: a stored answer needs no co-visitation (and no second round trip)
    covisit: dict[str, float] | None = None

    @property
    def unchanged(self) -> bool:
        """The request scores under exactly the history its snapshot value was computed from:
        every offline score is the fresh one."""
        return (
            self.value is not None
            and not self.q.recent_item_ids
            and not self.q.exclude_item_ids
            and self.value.history_digest == history_digest(self.history)
        )


class Recommender:
    def __init__(
        self,
        catalog: Catalog,
        model: ModelInfo,
        engine: Engine,
        store: SnapshotStore,
        watcher: SnapshotWatcher,
        settings: RecommendSettings,
        scoring: ScoringSettings,
        metrics: Metrics,
        max_snapshot_age_s: float,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.catalog = catalog
        self.model = model
        self.engine = engine
        self.store = store
        self.watcher = watcher
        self.settings = settings
        self.scorer = ThinkAheadScorer(catalog, model.token_ids, scoring)
        self.metrics = metrics
        self.max_snapshot_age_s = max_snapshot_age_s
        self.breaker = breaker or CircuitBreaker(failures=3)
        self._full_decode_s = 0.0  # running estimate, decides whether full decode fits a budget
        self._neighbours = NeighbourCache(settings.covisit_cache_items)

    @property
    def engine_healthy(self) -> bool:
        """False while the engine breaker is open or probing: skip full decode, fall back."""
        return self.breaker.allow()

    # ----- validation ------------------------------------------------------------------
    def validate(self, q: RecommendQuery) -> None:
        s = self.settings
        check_id("user_id", q.user_id)
        if not 1 <= q.k <= s.max_k:
            raise InvalidRequest("k", f"must be between 1 and {s.max_k}, got {q.k}")
        check_ids("recent_item_ids", q.recent_item_ids, s.max_list_items)
        check_ids("exclude_item_ids", q.exclude_item_ids, s.max_list_items)
        if q.budget_ms is not None and not 1 <= q.budget_ms <= s.max_budget_ms:
            raise InvalidRequest("budget_ms", f"must be between 1 and {s.max_budget_ms}")

    # ----- recommend -------------------------------------------------------------------
    async def recommend(self, q: RecommendQuery) -> Recommendation:
        """read -> judge the snapshot -> think-ahead -> full decode -> fallbacks; each step
        answers or says why it could not."""
        self.validate(q)
        ctx, reason = await self._open(q)
        if q.strategy is Strategy.FULL_DECODE:
            return await self._fallbacks(ctx, None, forced=True)
        reason = reason or self._judge(ctx)
        if reason is None:
            answer, reason = await self._think_ahead(ctx)
            if answer is not None:
                return answer
        return await self._fallbacks(ctx, reason)

    async def _open(self, q: RecommendQuery) -> tuple[_Request, str | None]:
        """The request's context: one Redis round trip for the user's snapshot value and
        history (the co-visitation neighbours of the fresh last items, often cached, are read
        only when a step needs them: ``_request_covisit``)."""
        clock = _Clock((q.budget_ms or self.settings.default_budget_ms) / 1000)
        active = self.watcher.active
        snapshot_id = active.snapshot_id if active is not None else None
        usable = active is not None and active.problem is None
        read, reason = await self._read_user(snapshot_id if usable else None, q.user_id, clock)
        if reason is None and not usable:
            reason = active.problem if active is not None else "no_snapshot"
        fresh = [*read.history, *q.recent_item_ids]
        history, _unknown = self.catalog.codes_of(fresh)
        history = history[-self.model.max_history :]
        excluded_ids = set(q.exclude_item_ids) | (
            set(fresh) if self.scorer.settings.exclude_history else set()
        )
        ctx = _Request(
            q=q,
            clock=clock,
            request_id=q.request_id or uuid.uuid4().hex[:16],
            snapshot_id=snapshot_id,
            snapshot_value=read.snapshot_value,
            history=history,
            constraint=self.scorer.constraint(
                history, self.catalog.codes_of(q.exclude_item_ids)[0]
            ),
            prompt=self.model.token_ids.history(history),
            manifest=active.manifest if usable and active is not None else None,
            fresh_ids=fresh,
            excluded_ids=excluded_ids,
        )
        return ctx, reason

    async def _request_covisit(self, ctx: _Request) -> dict[str, float]:
        """Co-visitation scores of the fresh history's neighbours, read once per request."""
        if ctx.covisit is None:
            ctx.covisit = (
                await self._covisit(ctx.snapshot_id, ctx.fresh_ids, ctx.excluded_ids, ctx.clock)
                if ctx.snapshot_id is not None and ctx.fresh_ids
                else {}
            )
        return ctx.covisit

    def _judge(self, ctx: _Request) -> str | None:
        """Decode and judge the user's snapshot value; None when think-ahead can use it."""
        value, reason = self._decode_value(ctx.snapshot_value)
        ctx.value = value
        return reason

    async def _read_user(
        self, snapshot_id: str | None, user_id: str, clock: _Clock
    ) -> tuple[UserRead, str | None]:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(max(clock.remaining(), 0.001)):
                read = await self.store.read_user(snapshot_id, user_id)
            return read, None
        except TimeoutError:
            return UserRead(None, []), "budget_exceeded"
        except RedisUnavailable as exc:
            log.warning("event=redis_read_failed error=%s", exc)
            return UserRead(None, []), "redis_unavailable"
        finally:
            clock.redis_s = time.perf_counter() - t0
            self.metrics.stage_seconds.labels("redis").observe(clock.redis_s)

    async def _covisit(
        self, snapshot_id: str, fresh: list[str], excluded: set[str], clock: _Clock
    ) -> dict[str, float]:
        """Co-visitation scores of the neighbours of the fresh last items; cached neighbour
        lists when Redis is slow or down (what cannot be read counts as no neighbours)."""
        recent = [i for i in recent_items(fresh) if i in self.catalog.row_of]
        found: dict[str, Neighbours] = {}
        missing = []
        for item in recent:
            cached = self._neighbours.get(snapshot_id, item)
            if cached is None:
                missing.append(item)
            else:
                found[item] = cached
        if missing and clock.remaining() > 0:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(max(clock.remaining(), 0.001)):
                    raws = await self.store.read_covisit(snapshot_id, missing)
                for item, raw in zip(missing, raws, strict=True):
                    value = self._decode_neighbours(raw)
                    self._neighbours.put(snapshot_id, item, value)
                    found[item] = value
            except (TimeoutError, RedisUnavailable) as exc:
                log.warning("event=covisit_read_failed error=%r", exc)
            finally:
                elapsed = time.perf_counter() - t0
                clock.redis_s += elapsed
                self.metrics.stage_seconds.labels("redis").observe(elapsed)
        return covisit_scores(fresh, found, excluded)

    def _decode_neighbours(self, raw: bytes | None) -> Neighbours:
        if raw is None:
            return EMPTY_NEIGHBOURS
        try:
            return Neighbours.decode(raw)
        except CovisitError as exc:
            self.metrics.corrupt_values.labels("covisit").inc()
            log.warning("event=corrupt_value what=covisit error=%s", exc)
            return EMPTY_NEIGHBOURS

    def _decode_value(self, raw: bytes | None) -> tuple[UserPrefixes | None, str | None]:
        if raw is None:
            return None, "no_prefixes"
        try:
            value = UserPrefixes.decode(raw)
        except CorruptValue as exc:
            self.metrics.corrupt_values.labels("snapshot_user").inc()
            log.warning("event=corrupt_value error=%s", exc)
            return None, "corrupt_value"
        if (
            value.catalog_version != self.catalog.version
            or value.model_version != self.model.version
        ):
            return None, "version_mismatch"
        if time.time() - value.computed_at > self.max_snapshot_age_s:
            return None, "stale_snapshot"
        if not value.prefixes:
            return None, "no_prefixes"
        return value, None

    async def _score(self, requests: list[ScoreRequest], clock: _Clock) -> list[TokenLogprobs]:
        if not self.breaker.allow():
            raise EngineError("engine circuit breaker open; a background probe retries it")
        t0 = time.perf_counter()
        self.metrics.engine_queue.inc(len(requests))
        try:
            async with asyncio.timeout(max(clock.remaining(), 0.0005)):
                results = await self.engine.score(requests)
            self.breaker.record_success()
            return results
        except EngineError:
            self.breaker.record_failure()
            raise
        finally:
            self.metrics.engine_queue.dec(len(requests))
            elapsed = time.perf_counter() - t0
            clock.decode_s += elapsed
            self.metrics.stage_seconds.labels("decode").observe(elapsed)

    def use_scoring(self, settings: ScoringSettings) -> None:
        """Score with ``settings`` from the next request on."""
        self.scorer = ThinkAheadScorer(self.catalog, self.model.token_ids, settings)

    def answer_scoring(self, manifest: SnapshotManifest) -> ScoringSettings:
        """How this service scores an unchanged user under ``manifest``'s snapshot."""
        settings = self.scorer.settings
        prefixes = min(settings.prefixes, manifest.prefixes_per_user)
        return settings.model_copy(update={"prefixes": prefixes})

    def _stored_answer(self, ctx: _Request) -> list[ScoredItem] | None:
        """The snapshot's whole answer, when this request would be scored exactly as the
        worker scored it: no engine round at all."""
        value, manifest = ctx.value, ctx.manifest
        if value is None or manifest is None or not value.answer or not ctx.unchanged:
            return None
        if not self.answer_scoring(manifest).serves(
            manifest.answers_key, manifest.answer_items, ctx.q.k
        ):
            return None
        ranked = self._unpacked("snapshot_answer", unpack_answer, value.answer, None)
        if ranked is None:
            return None
        # the constraint is the one the worker used; checking it keeps a damaged value from
        # ever serving an excluded or unknown item
        return self._items([(c, s) for c, s in ranked if ctx.constraint.allows(c)], ctx.q.k)

    async def _think_ahead(self, ctx: _Request) -> tuple[Recommendation | None, str | None]:
        value = ctx.value
        assert value is not None
        stored = self._stored_answer(ctx)
        if stored:
            self.metrics.precomputed_answers.inc()
            return self._answer(ctx, stored, Source.THINK_AHEAD, None), None
        plan = self.scorer.plan(
            value,
            ctx.history,
            await self._request_covisit(ctx),
            ctx.q.k,
            constraint=ctx.constraint,
            unchanged=ctx.unchanged,
            on_corrupt=self._corrupt,
        )
        if plan.empty:
            return None, "prefixes_excluded"
        try:
            results = await self._score(plan.requests, ctx.clock) if plan.requests else []
        except TimeoutError:
            return None, "budget_exceeded"
        except EngineError as exc:
            log.warning("event=engine_error request_id=%s error=%s", ctx.request_id, exc)
            return None, "engine_unavailable"
        items = self._items(self.scorer.rank(plan, results), ctx.q.k)
        if not items:
            return None, "prefixes_excluded"
        return self._answer(ctx, items, Source.THINK_AHEAD, None), None

    def _corrupt(self, key_type: str, exc: ValueError) -> None:
        """A damaged packed field of a snapshot value: counted and logged; the request goes on
        as if the field were absent."""
        self.metrics.corrupt_values.labels(key_type).inc()
        log.warning("event=corrupt_value what=%s error=%s", key_type, exc)

    def _unpacked(self, key_type: str, unpack: Callable[[bytes], T], raw: bytes, default: T) -> T:
        try:
            return unpack(raw)
        except ValueError as exc:
            self._corrupt(key_type, exc)
            return default

    async def _full_decode(self, ctx: _Request) -> list[ScoredItem]:
        t0 = time.perf_counter()
        width = max(ctx.q.k, self.settings.full_decode_beam)
        search = BeamSearch(ctx.prompt, self.model.token_ids, ctx.constraint, width)
        await run_searches_async([search], lambda reqs: self._score(reqs, ctx.clock))
        elapsed = time.perf_counter() - t0
        est = self._full_decode_s
        self._full_decode_s = elapsed if est == 0 else 0.8 * est + 0.2 * elapsed
        return self._items([(b.code, b.score) for b in search.beams], ctx.q.k)  # type: ignore[misc]

    async def _fallbacks(
        self, ctx: _Request, reason: str | None, forced: bool = False
    ) -> Recommendation:
        """Full decode when the engine is up and the budget allows it, else co-visitation of
        the user's recent items, else popular items under the user's prefixes, else global
        popular."""
        engine_ok = reason not in ("engine_unavailable", "budget_exceeded")
        fits = ctx.clock.remaining() > self._full_decode_s * 1.1
        if forced or (engine_ok and self.engine_healthy and fits):
            try:
                items = await self._full_decode(ctx)
                if items:
                    return self._answer(ctx, items, Source.FULL_DECODE, reason)
                # the trie search never dead-ends: nothing decoded means nothing is allowed
                reason = reason or "all_excluded"
            except TimeoutError:
                reason = reason or "budget_exceeded"
            except EngineError as exc:
                reason = reason or "engine_unavailable"
                log.warning("event=engine_error request_id=%s error=%s", ctx.request_id, exc)
        reason = reason or "unknown"
        items = self._covisit_items(ctx, await self._request_covisit(ctx))
        if items:
            return self._answer(ctx, items, Source.COVISITATION, reason)
        prefixes = list(ctx.value.prefixes) if ctx.value is not None else []
        source, items = self._popular(prefixes, ctx.constraint, ctx.q.k)
        return self._answer(ctx, items, source, reason)

    def _covisit_items(self, ctx: _Request, covisit: dict[str, float]) -> list[ScoredItem]:
        """The fused score's terms that need no engine, over the co-visitation neighbours."""
        features = ItemFeatures(self.catalog, covisit)
        weights = FusionWeights(
            covisit=1.0, popularity=min(self.scorer.settings.weights.popularity, 1.0)
        )
        scored = [
            (code, 0.0, 0.0)
            for item in covisit
            if (code := self.catalog.code_of(item)) is not None and ctx.constraint.allows(code)
        ]
        return self._items(rank_fused(scored, features, weights), ctx.q.k)

    def _popular(
        self,
        prefixes: list[Prefix],
        constraint: Constraint,
        k: int,
        skip: frozenset[int] = frozenset(),
    ) -> tuple[Source, list[ScoredItem]]:
        """The most popular allowed items under the user's prefixes, topped up with global
        popular items; never an excluded item."""
        cat = self.catalog
        under = {
            int(r)
            for p in prefixes
            for r in cat.rows_under_ab.get((p.a, p.b), ())
            if int(r) not in skip and constraint.allows(cat.code_at(int(r)))
        }
        chosen = sorted(under, key=lambda r: (-cat.popularity[r], r))[:k]
        source = Source.PREFIX_POPULAR if chosen else Source.GLOBAL_POPULAR
        taken = set(chosen) | skip
        for row in cat.rows_by_popularity:
            if len(chosen) >= k:
                break
            row = int(row)
            if row not in taken and constraint.allows(cat.code_at(row)):
                chosen.append(row)
        items = [
            ScoredItem(cat.item_ids[r], float(cat.popularity[r]), cat.code_at(r)) for r in chosen
        ]
        return source, items

    def _items(self, scored: list[tuple[Code, float]], k: int) -> list[ScoredItem]:
        items: list[ScoredItem] = []
        for code, score in scored:
            if not math.isfinite(score):
                continue
            item = self.catalog.item_at(code)
            if item is not None:
                items.append(ScoredItem(item, score, code))
            if len(items) == k:
                break
        return items

    def _answer(
        self, ctx: _Request, items: list[ScoredItem], source: Source, reason: str | None
    ) -> Recommendation:
        if reason is not None:
            self.metrics.fallbacks.labels(reason, source.value).inc()
        backfilled = 0
        if len(items) < ctx.q.k:
            items, backfilled = self._backfill(items, ctx.constraint, ctx.q.k)
        value = ctx.value
        return Recommendation(
            items=items,
            source=source,
            degraded_reason=reason,
            model_version=self.model.version,
            catalog_version=self.catalog.version,
            snapshot_id=ctx.snapshot_id,
            timings=ctx.clock.timings(),
            reasoning=value.reasoning if (ctx.q.include_reasoning and value is not None) else None,
            request_id=ctx.request_id,
            backfilled=backfilled,
        )

    def _backfill(
        self, items: list[ScoredItem], constraint: Constraint, k: int
    ) -> tuple[list[ScoredItem], int]:
        """Top a short answer up with popular items, scored below every model-scored item."""
        rows = frozenset(self.catalog.row_of[i.item_id] for i in items)
        _, extra = self._popular([], constraint, k - len(items), skip=rows)
        floor = min((i.score for i in items), default=0.0)
        filled = [ScoredItem(e.item_id, floor - 1.0 - n, e.code) for n, e in enumerate(extra)]
        return items + filled, len(filled)

    # ----- events ----------------------------------------------------------------------
    async def append_events(
        self, user_id: str, item_ids: Sequence[str], idempotency_key: str | None = None
    ) -> EventsResult:
        check_id("user_id", user_id)
        if not item_ids:
            raise InvalidRequest("item_ids", "at least one id")
        check_ids("item_ids", item_ids, self.settings.max_list_items)
        known = [i for i in item_ids if i in self.catalog.row_of]
        unknown = [i for i in item_ids if i not in self.catalog.row_of]
        if idempotency_key is not None:
            return await self._append_once(user_id, item_ids, known, unknown, idempotency_key)
        if not known:
            length = len((await self.store.read_user(None, user_id)).history)
            return EventsResult(length, unknown)
        length = await self.store.append_history(user_id, known)
        return EventsResult(length, unknown)

    async def _append_once(
        self,
        user_id: str,
        item_ids: Sequence[str],
        known: list[str],
        unknown: list[str],
        key: str,
    ) -> EventsResult:
        """A retried batch (same user, same key, within the window) is not appended again and
        answers as the first call did; the same key with another batch is refused."""
        check_id("idempotency_key", key)
        digest = hashlib.sha256("\n".join(item_ids).encode()).hexdigest()[:32]
        length, prior = await self.store.append_history_once(user_id, known, key, digest)
        if prior is None:
            return EventsResult(length, unknown)
        if prior != digest:
            raise InvalidRequest("idempotency_key", "already used for a different batch")
        self.metrics.idempotent_replays.inc()
        return EventsResult(length, unknown, replayed=True)
