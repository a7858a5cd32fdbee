"""The recommend use case, transport-free: REST and gRPC are thin adapters over this class.

Per request: one Redis round trip (C_u + history), one engine round scoring whole items under
the fresh history, all under a deadline. Anything missing, mismatched, slow or down becomes a
flagged fallback: full decode when the budget allows, else popular items under the user's
prefixes, else global popular.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum

from service.beam import BeamSearch, run_searches_async
from service.breaker import CircuitBreaker
from service.catalog import Catalog
from service.config import RecommendSettings
from service.constraint import Constraint
from service.engine.base import Engine, EngineError, ScoreRequest, TokenLogprobs
from service.errors import InvalidRequest, Overloaded, RedisUnavailable
from service.metrics import Metrics
from service.model import ModelInfo
from service.scoring import combine, plan_item_scoring
from service.snapshot import CorruptValue, Prefix, UserPrefixes, history_digest
from service.snapshot_watch import SnapshotWatcher
from service.store import SnapshotStore, UserRead
from service.tokens import Code

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
ID_RULE = "1-128 characters from A-Z a-z 0-9 _ . : @ -"


class Source(StrEnum):
    THINK_AHEAD = "think_ahead"
    FULL_DECODE = "full_decode"
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


class Recommender:
    def __init__(
        self,
        catalog: Catalog,
        model: ModelInfo,
        engine: Engine,
        store: SnapshotStore,
        watcher: SnapshotWatcher,
        settings: RecommendSettings,
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
        self.metrics = metrics
        self.max_snapshot_age_s = max_snapshot_age_s
        self.in_flight = 0
        self.breaker = breaker or CircuitBreaker(failures=3)
        self._full_decode_s = 0.0  # running estimate, decides whether full decode fits a budget

    # ----- admission -------------------------------------------------------------------
    @asynccontextmanager
    async def admission(self) -> AsyncIterator[None]:
        if self.in_flight >= self.settings.max_in_flight:
            # Counted (rejected, by reason) by the transports' one gate, like every refusal.
            raise Overloaded(f"more than {self.settings.max_in_flight} requests in flight")
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

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
        self.validate(q)
        clock = _Clock((q.budget_ms or self.settings.default_budget_ms) / 1000)
        request_id = q.request_id or uuid.uuid4().hex[:16]
        active = self.watcher.active
        usable = active is not None and active.problem is None
        snapshot_id = active.snapshot_id if active is not None else None

        read, reason = await self._read_user(snapshot_id if usable else None, q.user_id, clock)
        history = self._history_codes(read.history, q.recent_item_ids)
        constraint = self._constraint(history, read.history, q)
        prompt = self.model.token_ids.history(history)

        if q.strategy is Strategy.FULL_DECODE:
            return await self._full_or_fallback(
                q, clock, prompt, constraint, [], None, request_id, snapshot_id, forced=True
            )
        prefixes: list[Prefix] = []
        value: UserPrefixes | None = None
        if reason is None:
            reason = None if usable else (active.problem if active else "no_snapshot")
        if reason is None:
            value, reason = self._decode_value(read.snapshot_value)
            if value is not None:
                prefixes = list(value.prefixes[: self.settings.max_prefixes])
        if reason is None:
            try:
                unchanged = (
                    value is not None
                    and not q.recent_item_ids
                    and not q.exclude_item_ids
                    and value.history_digest == history_digest(history)
                )
                items = await self._think_ahead(
                    prompt, prefixes, constraint, q.k, clock, reuse_prefix_scores=unchanged
                )
            except TimeoutError:
                reason = "budget_exceeded"
            except EngineError as exc:
                reason = "engine_unavailable"
                log.warning("event=engine_error request_id=%s error=%s", request_id, exc)
            else:
                if items:
                    return self._answer(
                        items,
                        Source.THINK_AHEAD,
                        None,
                        clock,
                        snapshot_id,
                        value,
                        q,
                        request_id,
                        constraint,
                    )
                reason = "prefixes_excluded"
        return await self._full_or_fallback(
            q, clock, prompt, constraint, prefixes, reason, request_id, snapshot_id, value=value
        )

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

    def _history_codes(self, stored: list[str], recent: Sequence[str]) -> list[Code]:
        codes, _unknown = self.catalog.codes_of([*stored, *recent])
        return codes[-self.model.max_history :]

    def _constraint(self, history: list[Code], stored: list[str], q: RecommendQuery) -> Constraint:
        excluded = list(history) if self.settings.exclude_history else []
        excluded += self.catalog.codes_of(q.exclude_item_ids)[0]
        return Constraint(self.catalog, excluded)

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

    async def _think_ahead(
        self,
        prompt: list[int],
        prefixes: list[Prefix],
        constraint: Constraint,
        k: int,
        clock: _Clock,
        reuse_prefix_scores: bool = False,
    ) -> list[ScoredItem]:
        weight = self.settings.offline_weight or 0.0
        plan = plan_item_scoring(
            prompt,
            prefixes,
            constraint,
            self.model.token_ids,
            top_c=k,
            reuse_prefix_scores=reuse_prefix_scores,
            prune_for=(k, weight),
        )
        if not plan.prefixes:
            return []
        results = await self._score(plan.requests, clock) if plan.requests else []
        scored = combine(plan, results, self.model.token_ids, weight)
        return self._items([(s.code, s.score) for s in scored], k)

    async def _full_decode(
        self, prompt: list[int], constraint: Constraint, k: int, clock: _Clock
    ) -> list[ScoredItem]:
        t0 = time.perf_counter()
        width = max(k, self.settings.full_decode_beam)
        search = BeamSearch(prompt, self.model.token_ids, constraint, width)
        await run_searches_async([search], lambda reqs: self._score(reqs, clock))
        elapsed = time.perf_counter() - t0
        est = self._full_decode_s
        self._full_decode_s = elapsed if est == 0 else 0.8 * est + 0.2 * elapsed
        return self._items([(b.code, b.score) for b in search.beams], k)  # type: ignore[misc]

    async def _full_or_fallback(
        self,
        q: RecommendQuery,
        clock: _Clock,
        prompt: list[int],
        constraint: Constraint,
        prefixes: list[Prefix],
        reason: str | None,
        request_id: str,
        snapshot_id: str | None,
        forced: bool = False,
        value: UserPrefixes | None = None,
    ) -> Recommendation:
        engine_ok = reason not in ("engine_unavailable", "budget_exceeded")
        fits = clock.remaining() > self._full_decode_s * 1.1
        if forced or (engine_ok and self.engine_healthy and fits):
            try:
                items = await self._full_decode(prompt, constraint, q.k, clock)
                if items:
                    return self._answer(
                        items,
                        Source.FULL_DECODE,
                        reason,
                        clock,
                        snapshot_id,
                        value,
                        q,
                        request_id,
                        constraint,
                    )
            except TimeoutError:
                reason = reason or "budget_exceeded"
            except EngineError as exc:
                reason = reason or "engine_unavailable"
                log.warning("event=engine_error request_id=%s error=%s", request_id, exc)
        source, items = self._popular(prefixes, constraint, q.k)
        return self._answer(
            items,
            source,
            reason or "unknown",
            clock,
            snapshot_id,
            value,
            q,
            request_id,
            constraint,
        )

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
            item = self.catalog.item_at(code)
            if item is not None:
                items.append(ScoredItem(item, score, code))
            if len(items) == k:
                break
        return items

    def _answer(
        self,
        items: list[ScoredItem],
        source: Source,
        reason: str | None,
        clock: _Clock,
        snapshot_id: str | None,
        value: UserPrefixes | None,
        q: RecommendQuery,
        request_id: str,
        constraint: Constraint,
    ) -> Recommendation:
        if reason is not None:
            self.metrics.fallbacks.labels(reason, source.value).inc()
        backfilled = 0
        if len(items) < q.k:
            items, backfilled = self._backfill(items, constraint, q.k)
        reasoning = value.reasoning if (q.include_reasoning and value is not None) else None
        return Recommendation(
            items=items,
            source=source,
            degraded_reason=reason,
            model_version=self.model.version,
            catalog_version=self.catalog.version,
            snapshot_id=snapshot_id,
            timings=clock.timings(),
            reasoning=reasoning,
            request_id=request_id,
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
