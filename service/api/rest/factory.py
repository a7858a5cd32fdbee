"""The REST app: the routes over a front end, the gate middleware, and the error handlers that
give every error the one body shape (``{"error": {"message", "type", "code"}}``)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service import __version__
from service.access.gate import current_call
from service.api.frontend import Frontend
from service.api.rest.middleware import ApiMiddleware, error_response
from service.api.rest.protocol import ErrorDetail, ErrorOut
from service.api.rest.router import router
from service.config import Settings
from service.errors import INTERNAL_MESSAGE, InvalidRequest, ServiceError

log = logging.getLogger(__name__)


def create_app(settings: Settings, frontend: Frontend | None) -> FastAPI:
    """The REST app over ``frontend``; ``None`` builds the routes alone (schema, route
    listing). :mod:`service.app` serves it beside gRPC on one event loop."""
    app = FastAPI(
        title="thinkahead",
        version=__version__,
        description="Think-Ahead generative recommendation: precomputed semantic-ID prefixes "
        "completed online by a constrained decoder, with flagged fallbacks.",
    )
    app.state.frontend = frontend
    app.add_middleware(ApiMiddleware, max_body_bytes=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid"}
        field = _field_of(tuple(first.get("loc", ())))
        return await _service_error(request, InvalidRequest(field, str(first.get("msg"))))

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        call = current_call()
        if call is not None:
            call.fail(exc)
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("event=unhandled path=%s", request.url.path)
        body = ErrorOut(
            error=ErrorDetail(message=INTERNAL_MESSAGE, type="internal_error", code=500)
        )
        return JSONResponse(body.model_dump(), status_code=500)

    app.include_router(router)
    return app


def _field_of(loc: tuple[Any, ...]) -> str:
    field = ""
    for part in loc:
        if part == "body":
            continue
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    return field or "body"
