"""One error taxonomy, mapped once per transport (HTTP status, gRPC code).

Error bodies share one shape: ``{"error": {"message", "type", "code"}}`` (+ ``field``).
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    type = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "code": self.http_status}}


class InvalidRequest(ServiceError):
    http_status = 422
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    type = "invalid_request"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def body(self) -> dict[str, object]:
        body = super().body()
        body["error"]["field"] = self.field  # type: ignore[index]
        return body


class Unauthenticated(ServiceError):
    """No API key, or one the keys file does not hold."""

    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    type = "unauthenticated"


class PermissionDenied(ServiceError):
    """A known key without the scope the call needs."""

    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    type = "permission_denied"


class PayloadTooLarge(ServiceError):
    """A request body over the cap, refused before it is parsed."""

    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    type = "payload_too_large"


class Overloaded(ServiceError):
    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    type = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimited(Overloaded):
    """The caller's key spent its token bucket; the other keys are unaffected."""

    type = "rate_limited"


class DependencyUnavailable(ServiceError):
    """A dependency is down and no fallback could answer."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    type = "unavailable"


class RedisUnavailable(DependencyUnavailable):
    """Raised at the Redis boundary for any connection, timeout or protocol failure."""


INTERNAL_MESSAGE = "internal error; see the server log for details"
