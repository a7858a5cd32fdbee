"""REST adapter: FastAPI routes translating JSON <-> the transport-free core.

The app is built over a runtime that :mod:`service.app` opened (it also starts gRPC on the same
event loop); this module only translates. Authentication, the body cap, rate limits,
admission, timing and call metrics live in one ASGI middleware (:class:`ApiMiddleware`) over the
runtime's :class:`~service.access.gate.Gate`, shared with the gRPC interceptor; the routes only
translate.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.access.gate import current_call
from service.config import MAX_LIST_ITEMS, Settings
from service.core import ID_PATTERN, ID_RULE, Recommendation, RecommendQuery, Strategy
from service.errors import (
    INTERNAL_MESSAGE,
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unauthenticated,
)
from service.runtime import Runtime

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
# Authentication happens in ApiMiddleware; this only documents the scheme in the OpenAPI
# schema (auto_error=False: it never refuses anything itself).
BEARER = HTTPBearer(auto_error=False, description="API key; scopes: recommend, events")
API_ROUTES = {"/v1/recommend": "recommend", "/v1/events": "events"}


def error_response(exc: ServiceError) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="thinkahead"'
    return JSONResponse(exc.body(), status_code=exc.http_status, headers=headers or None)


async def bounded_receive(headers: Headers, receive: Receive, cap: int) -> Receive:
    """A ``receive`` that never hands the app more than ``cap`` body bytes: a declared
    Content-Length over the cap is refused before one byte is read; a chunked body is read
    here up to the cap and replayed. Raises :class:`PayloadTooLarge`."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > cap:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds {cap}")
        return receive  # the server holds the body to its declared length
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return receive  # disconnected: let the app see it
        body += message.get("body", b"")
        if len(body) > cap:
            raise PayloadTooLarge(f"request body exceeds {cap} bytes")
        if not message.get("more_body", False):
            break
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    return replay


class ApiMiddleware:
    """Every call to an API route passes the runtime's gate (auth, rate limit, admission,
    metrics) and the body cap; health, readiness, metrics and docs stay open."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = API_ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if method is None:
            await self.app(scope, receive, send)
            return
        gate = scope["app"].state.rt.gate
        headers = Headers(scope=scope)
        try:
            async with gate.call("http", method, headers.get("authorization")):
                receive = await bounded_receive(headers, receive, self.max_body_bytes)
                await self.app(scope, receive, send)
        except ServiceError as exc:  # refused by the gate or the cap: nothing was sent yet
            await error_response(exc)(scope, receive, send)


def _record(exc: ServiceError) -> None:
    call = current_call()
    if call is not None:
        call.fail(exc)


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
    )


def _field_of(loc: tuple[Any, ...]) -> str:
    field = ""
    for part in loc:
        if part == "body":
            continue
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    return field or "body"


def create_app(settings: Settings, runtime: Runtime | None) -> FastAPI:
    """The REST app over ``runtime``; ``None`` builds the routes alone (schema, route listing)."""
    app = FastAPI(
        title="thinkahead",
        version=__version__,
        description="Think-Ahead generative recommendation: precomputed semantic-ID prefixes "
        "completed online by a constrained decoder, with flagged fallbacks.",
    )
    app.state.rt = runtime

    def rt(request: Request) -> Runtime:
        return request.app.state.rt  # type: ignore[no-any-return]

    app.add_middleware(ApiMiddleware, max_body_bytes=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid"}
        field = _field_of(tuple(first.get("loc", ())))
        return await _service_error(request, InvalidRequest(field, str(first.get("msg"))))

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        _record(exc)
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("event=unhandled path=%s", request.url.path)
        body = ErrorOut(
            error=ErrorDetail(message=INTERNAL_MESSAGE, type="internal_error", code=500)
        )
        return JSONResponse(body.model_dump(), status_code=500)

    secured = {"responses": ERROR_RESPONSES, "dependencies": [Depends(BEARER)]}

    @app.post("/v1/recommend", response_model=RecommendOut, **secured)  # type: ignore[arg-type]
    async def recommend(
        body: RecommendBody,
        request: Request,
        x_request_id: Annotated[str | None, Header(max_length=64)] = None,
    ) -> RecommendOut:
        rec = await rt(request).core.recommend(
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

    @app.post("/v1/events", response_model=EventsOut, **secured)  # type: ignore[arg-type]
    async def events(body: EventsBody, request: Request, response: Response) -> EventsOut:
        runtime_ = rt(request)
        result = await runtime_.events.append(body.user_id, body.item_ids, body.idempotency_key)
        if result.replayed:
            response.headers["Idempotent-Replayed"] = "true"
        else:
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
