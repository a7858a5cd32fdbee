"""The REST side of the one gate: every call to an API route passes the gate (auth, rate limit,
admission, metrics) and the body cap in one ASGI middleware; health, readiness, metrics and docs
stay open. Also the one mapping of a :class:`ServiceError` to an HTTP response."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Overloaded, PayloadTooLarge, ServiceError, Unauthenticated

TRANSPORT = "http"
API_ROUTES = {"/v1/recommend": "recommend", "/v1/events": "events"}  # path -> API method


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
    """The gate of the app's front end (``app.state.frontend``) and the body cap around every
    API route."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = API_ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if method is None:
            await self.app(scope, receive, send)
            return
        gate = scope["app"].state.frontend.gate
        headers = Headers(scope=scope)
        try:
            async with gate.call(TRANSPORT, method, headers.get("authorization")):
                receive = await bounded_receive(headers, receive, self.max_body_bytes)
                await self.app(scope, receive, send)
        except ServiceError as exc:  # refused by the gate or the cap: nothing was sent yet
            await error_response(exc)(scope, receive, send)
