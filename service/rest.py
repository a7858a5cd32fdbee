"""REST adapter: FastAPI routes translating JSON <-> the transport-free core.

The lifespan owns the runtime (catalog, model, engine, Redis) and the gRPC server, so one
process and one event loop serve both transports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service import __version__
from service.config import MAX_LIST_ITEMS, Settings
from service.core import ID_PATTERN, ID_RULE, Recommendation, RecommendQuery, Strategy
from service.errors import INTERNAL_MESSAGE, Overloaded, ServiceError
from service.runtime import Runtime, open_runtime

log = logging.getLogger(__name__)
TRANSPORT = "http"


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


class RecommendOut(BaseModel):
    items: list[ItemOut]
    source: str
    degraded: bool
    degraded_reason: str | None
    model_version: str
    catalog_version: str
    snapshot_id: str | None
    timings: TimingsOut
    reasoning: str | None = None
    request_id: str
    backfilled: int = Field(
        default=0, description="tail items topped up by popularity (too few candidates)"
    )


class EventsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id
    item_ids: IdList = Field(min_length=1, description="oldest first")


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
    422: {"model": ErrorOut, "description": "invalid request"},
    429: {"model": ErrorOut, "description": "overloaded; retry after Retry-After seconds"},
    503: {"model": ErrorOut, "description": "a dependency is down and no fallback could answer"},
}


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
        degraded_reason=rec.degraded_reason,
        model_version=rec.model_version,
        catalog_version=rec.catalog_version,
        snapshot_id=rec.snapshot_id,
        timings=TimingsOut(**vars(rec.timings)),
        reasoning=rec.reasoning,
        request_id=rec.request_id,
        backfilled=rec.backfilled,
    )


def _field_of(loc: tuple[Any, ...]) -> str:
    field = ""
    for part in loc:
        if part == "body":
            continue
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    return field or "body"


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """The app; with ``runtime`` given (tests, embedding) the lifespan does not open one."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if runtime is not None:
            app.state.rt = runtime
            yield
            return
        from service.grpc_api import start_grpc, stop_grpc

        async with open_runtime(settings) as rt:
            app.state.rt = rt
            grpc_server = await start_grpc(rt)
            try:
                yield
            finally:
                rt.draining = True
                await stop_grpc(grpc_server, rt)

    app = FastAPI(
        title="thinkahead",
        version=__version__,
        description="Think-Ahead generative recommendation: precomputed semantic-ID prefixes "
        "completed online by a constrained decoder, with flagged fallbacks.",
        lifespan=lifespan,
    )

    def rt(request: Request) -> Runtime:
        return request.app.state.rt  # type: ignore[no-any-return]

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid"}
        field = _field_of(tuple(first.get("loc", ())))
        rt(request).metrics.rejected.labels("invalid").inc()
        detail = ErrorDetail(
            message=f"{field}: {first.get('msg')}", type="invalid_request", code=422, field=field
        )
        return JSONResponse(ErrorOut(error=detail).model_dump(), status_code=422)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
        if exc.http_status == 422:
            rt(request).metrics.rejected.labels("invalid").inc()
        return JSONResponse(exc.body(), status_code=exc.http_status, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("event=unhandled path=%s", request.url.path)
        body = ErrorOut(
            error=ErrorDetail(message=INTERNAL_MESSAGE, type="internal_error", code=500)
        )
        return JSONResponse(body.model_dump(), status_code=500)

    @app.post("/v1/recommend", response_model=RecommendOut, responses=ERROR_RESPONSES)
    async def recommend(
        body: RecommendBody,
        request: Request,
        x_request_id: Annotated[str | None, Header(max_length=64)] = None,
    ) -> RecommendOut:
        runtime_ = rt(request)
        metrics = runtime_.metrics
        t0 = time.perf_counter()
        outcome, source = "error", "none"
        try:
            async with runtime_.core.admission():
                rec = await runtime_.core.recommend(
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
            outcome, source = "ok", rec.source.value
            return to_response(rec)
        except ServiceError as exc:
            outcome = exc.type
            raise
        finally:
            metrics.requests.labels(TRANSPORT, outcome, source).inc()
            metrics.request_seconds.labels(TRANSPORT).observe(time.perf_counter() - t0)

    @app.post("/v1/events", response_model=EventsOut, responses=ERROR_RESPONSES)
    async def events(body: EventsBody, request: Request) -> EventsOut:
        runtime_ = rt(request)
        result = await runtime_.core.append_events(body.user_id, body.item_ids)
        runtime_.metrics.events.labels(TRANSPORT).inc(len(body.item_ids))
        return EventsOut(
            history_length=result.history_length, unknown_item_ids=result.unknown_item_ids
        )

    @app.get("/livez")
    async def livez(request: Request) -> JSONResponse:
        # A dead in-process engine never comes back: let the orchestrator restart the pod.
        # Redis or snapshot trouble is not a liveness failure (readiness and fallbacks cover it).
        if rt(request).engine.is_dead():
            return JSONResponse({"status": "engine_dead"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        checks = await rt(request).readiness()
        ready = all(checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> PlainTextResponse:
        data = generate_latest(rt(request).metrics.registry)
        return PlainTextResponse(data, media_type=CONTENT_TYPE_LATEST)

    return app
