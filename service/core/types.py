"""What the recommend and events use cases take and answer, transport-free: the query, the
answer with its source and degraded reason, and the id rule both transports enforce."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from service.contracts.tokens import Code
from service.core.explain import Explanation, RationaleAbsent
from service.errors import InvalidRequest

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
ID_RULE = "1-128 characters from A-Z a-z 0-9 _ . : @ -"


class Source(StrEnum):
    THINK_AHEAD = "think_ahead"
    # after fresh events, the entry's stored answer re-ranked without an engine round (the
    # engine round would not fit the budget, or the settings say so)
    THINK_AHEAD_RERANK = "think_ahead_rerank"
    FULL_DECODE = "full_decode"
    # no usable entry, a known history: the item-level model on it, fused with co-visitation
    ITEM_LEVEL = "fallback_item_level"
    COVISITATION = "fallback_covisitation"
    PREFIX_POPULAR = "fallback_prefix_popular"
    GLOBAL_POPULAR = "fallback_global_popular"


class Strategy(StrEnum):
    THINK_AHEAD = "think_ahead"
    FULL_DECODE = "full_decode"


class DegradedReason(StrEnum):
    """Why an answer is not think-ahead's: the ``degraded_reason`` on the wire and the
    ``reason`` label of ``thinkahead_fallbacks_total``."""

    NO_SNAPSHOT = "no_snapshot"
    NO_PREFIXES = "no_prefixes"  # a cold user, or a value with no prefix
    VERSION_MISMATCH = "version_mismatch"
    STALE_SNAPSHOT = "stale_snapshot"
    CORRUPT_VALUE = "corrupt_value"
    PREFIXES_EXCLUDED = "prefixes_excluded"
    BUDGET_EXCEEDED = "budget_exceeded"
    REDIS_UNAVAILABLE = "redis_unavailable"
    ENGINE_UNAVAILABLE = "engine_unavailable"
    ALL_EXCLUDED = "all_excluded"  # nothing in the catalog is left to recommend


class Degraded(Exception):
    """A step of the recommend chain cannot answer; the next one answers, flagged ``reason``."""

    def __init__(self, reason: DegradedReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


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
    degraded_reason: DegradedReason | None
    model_version: str
    catalog_version: str
    snapshot_id: str | None
    timings: Timings
    reasoning: str | None
    request_id: str
    backfilled: int = 0  # tail items topped up by popularity when the candidates ran short
    # include_reasoning: the entry's rationale, structured, or why there is none
    rationale: Explanation | None = None
    reasoning_absent: RationaleAbsent | None = None

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
