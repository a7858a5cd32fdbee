"""The REST routes: each translates JSON -> a front-end call -> JSON in a few lines. The gate
and the body cap run before them (:mod:`.middleware`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.access.gate import current_call
from service.api.frontend import Frontend
from service.api.rest.middleware import TRANSPORT
from service.api.rest.protocol import (
    ERROR_RESPONSES,
    AlternativeOut,
    EventsBody,
    EventsOut,
    ItemOut,
    RationaleOut,
    RecommendBody,
    RecommendOut,
    SemanticIdOut,
    TimingsOut,
)
from service.core import Explanation, Recommendation, RecommendQuery

# Authentication happens in ApiMiddleware; this only documents the scheme in the OpenAPI
# schema (auto_error=False: it never refuses anything itself).
BEARER = HTTPBearer(auto_error=False, description="API key; scopes: recommend, events")
SECURED = {"responses": ERROR_RESPONSES, "dependencies": [Depends(BEARER)]}


def _frontend(request: Request) -> Frontend:
    return request.app.state.frontend  # type: ignore[no-any-return]


Front = Annotated[Frontend, Depends(_frontend)]
router = APIRouter()


def to_response(rec: Recommendation) -> RecommendOut:
    return RecommendOut(
        items=[
            ItemOut(
                item_id=i.item_id,
                score=i.score,
                semantic_id=SemanticIdOut(a=i.code[0], b=i.code[1], c=i.code[2]),
            )
            for i in rec.items
        ],
        source=rec.source.value,
        degraded=rec.degraded,
        degraded_reason=rec.degraded_reason.value if rec.degraded_reason is not None else None,
        model_version=rec.model_version,
        catalog_version=rec.catalog_version,
        snapshot_id=rec.snapshot_id,
        timings=TimingsOut(**vars(rec.timings)),
        reasoning=rec.reasoning,
        request_id=rec.request_id,
        backfilled=rec.backfilled,
        rationale=_rationale(rec.rationale),
        reasoning_absent=rec.reasoning_absent.value if rec.reasoning_absent else None,
    )


def _rationale(found: Explanation | None) -> RationaleOut | None:
    if found is None:
        return None
    return RationaleOut(
        category=found.category,
        words=list(found.words),
        probability=found.probability,
        evidence_item_ids=list(found.evidence_item_ids),
        alternatives=[
            AlternativeOut(category=a.category, probability=a.probability)
            for a in found.alternatives
        ],
        basis=found.basis,
    )


@router.post("/v1/recommend", response_model=RecommendOut, **SECURED)  # type: ignore[arg-type]
async def recommend(
    body: RecommendBody,
    front: Front,
    x_request_id: Annotated[str | None, Header(max_length=64)] = None,
) -> RecommendOut:
    rec = await front.recommend(
        RecommendQuery(
            user_id=body.user_id,
            k=body.k,
            recent_item_ids=tuple(body.recent_item_ids),
            exclude_item_ids=tuple(body.exclude_item_ids),
            budget_ms=body.budget_ms,
            include_reasoning=body.include_reasoning,
            strategy=body.strategy,
            request_id=x_request_id,
        )
    )
    call = current_call()
    if call is not None:
        call.source = rec.source.value
    return to_response(rec)


@router.post("/v1/events", response_model=EventsOut, **SECURED)  # type: ignore[arg-type]
async def events(body: EventsBody, front: Front, response: Response) -> EventsOut:
    result = await front.append_events(body.user_id, body.item_ids, body.idempotency_key)
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        front.metrics.events.labels(TRANSPORT).inc(len(body.item_ids))
    return EventsOut(history_length=result.history_length, unknown_item_ids=result.unknown_item_ids)


@router.get("/livez")
async def livez(front: Front) -> JSONResponse:
    # A dead in-process engine never comes back: let the orchestrator restart the pod.
    # Redis or snapshot trouble is not a liveness failure (readiness and fallbacks cover it).
    if not front.alive():
        return JSONResponse({"status": "engine_dead"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(front: Front) -> JSONResponse:
    checks = await front.readiness()
    ready = all(checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(front: Front) -> PlainTextResponse:
    data = generate_latest(front.metrics.registry)
    return PlainTextResponse(data, media_type=CONTENT_TYPE_LATEST)
