"""The REST API's request, response and error bodies (what the OpenAPI schema shows)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.config import MAX_LIST_ITEMS
from service.core import ID_PATTERN, ID_RULE, Strategy

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN.pattern, max_length=128)]
IdList = Annotated[list[Id], Field(max_length=MAX_LIST_ITEMS)]


class RecommendBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id = Field(description=f"the user's id ({ID_RULE}); unknown users get a fallback")
    k: int = Field(default=10, ge=1, description="number of items, 1..max_k (100 by default)")
    recent_item_ids: IdList = Field(default_factory=list, description="events not yet sent")
    exclude_item_ids: IdList = Field(default_factory=list)
    budget_ms: int | None = Field(
        default=None, ge=1, description="latency budget; server default if absent, capped"
    )
    include_reasoning: bool = False
    strategy: Strategy = Strategy.THINK_AHEAD


class SemanticIdOut(BaseModel):
    a: int
    b: int
    c: int


class ItemOut(BaseModel):
    item_id: str
    score: float
    semantic_id: SemanticIdOut


class TimingsOut(BaseModel):
    redis_ms: float
    decode_ms: float
    total_ms: float


class AlternativeOut(BaseModel):
    category: str
    probability: float


class RationaleOut(BaseModel):
    """Why these items: the category the model expects the user's next item in, before it
    named one (its rationale, thought ahead by the worker)."""

    category: str = Field(description="category path, e.g. 'Makeup > Nails > Nail Polish'")
    words: list[str] = Field(description="the path's levels")
    probability: float = Field(description="P(category | history) under the model")
    evidence_item_ids: list[str] = Field(
        description="the user's history items in that category, newest first"
    )
    alternatives: list[AlternativeOut] = Field(description="the next likeliest categories")
    basis: Literal["stated", "answer"] = Field(
        description="stated: the model named the category before the item (a reasoning "
        "model); answer: the category's share of the model's own ranked answer"
    )


class RecommendOut(BaseModel):
    items: list[ItemOut]
    source: str
    degraded: bool
    degraded_reason: str | None
    model_version: str
    catalog_version: str
    snapshot_id: str | None
    timings: TimingsOut
    reasoning: str | None = Field(
        default=None, description="include_reasoning: the rationale as text"
    )
    request_id: str
    backfilled: int = Field(
        default=0, description="tail items topped up by popularity (too few candidates)"
    )
    rationale: RationaleOut | None = Field(
        default=None, description="include_reasoning: the rationale, structured"
    )
    reasoning_absent: str | None = Field(
        default=None,
        description="include_reasoning without a rationale, why: no_entry (no snapshot entry "
        "for the user), fallback_answer, no_rationale (the model does not reason), "
        "corrupt_rationale",
    )


class EventsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id
    item_ids: IdList = Field(min_length=1, description="oldest first")
    idempotency_key: Id | None = Field(
        default=None,
        description="a retry with the same key for the same user within the server's window "
        "is not appended again and answers as the first call did (header "
        "Idempotent-Replayed: true); the same key with another batch is a 422",
    )


class EventsOut(BaseModel):
    history_length: int
    unknown_item_ids: list[str]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int
    field: str | None = None


class ErrorOut(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "missing or unknown API key"},
    403: {"model": ErrorOut, "description": "the API key lacks this route's scope"},
    413: {"model": ErrorOut, "description": "request body over the cap (refused unparsed)"},
    422: {"model": ErrorOut, "description": "invalid request"},
    429: {
        "model": ErrorOut,
        "description": "overloaded or the key's rate limit; retry after Retry-After seconds",
    },
    503: {"model": ErrorOut, "description": "a dependency is down and no fallback could answer"},
}
