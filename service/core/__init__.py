"""The recommend and events use cases, transport-free; REST and gRPC are thin adapters over them.

By role: ``types`` (queries, answers, sources, degraded reasons, the id rule), ``policy`` (the
recommend chain: read -> judge the snapshot -> think-ahead -> full decode -> fallbacks),
``context`` (one request's state), ``clock`` (its deadline and the one stage timer), ``reads``
(Redis reads of the snapshot), ``rounds`` (engine rounds behind the breaker), ``corrupt`` (the
one decode-or-count helper), ``ranking`` (popularity, backfill, answers without the engine) and
``events`` (history appends, idempotent or not), ``explain`` (the stored rationale, rendered).
"""

from service.core.events import Events
from service.core.explain import Explanation, RationaleAbsent
from service.core.policy import Recommender
from service.core.types import (
    ID_PATTERN,
    ID_RULE,
    DegradedReason,
    EventsResult,
    Recommendation,
    RecommendQuery,
    ScoredItem,
    Source,
    Strategy,
    Timings,
)

__all__ = [
    "ID_PATTERN",
    "ID_RULE",
    "DegradedReason",
    "Events",
    "EventsResult",
    "Explanation",
    "RationaleAbsent",
    "RecommendQuery",
    "Recommendation",
    "Recommender",
    "ScoredItem",
    "Source",
    "Strategy",
    "Timings",
]
