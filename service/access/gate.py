"""The one front door both transports go through: authentication, scope, per-key rate limit,
admission, timing and the request / rejection metrics of every API call.

The REST middleware and the gRPC interceptor each open :meth:`Gate.call` around the handler,
so a call is refused, timed and counted identically whichever transport carried it. Handlers
report what only they know (the answer's source, an error turned into a response) on the
:class:`Call` found through :func:`current_call`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from service.access.admission import Admission
from service.access.auth import Authenticator, Principal
from service.access.ratelimit import RateLimiter
from service.errors import ServiceError
from service.metrics import Metrics

# API method -> the scope a key needs for it.
SCOPE_OF = {"recommend": "recommend", "events": "events"}
# Outcomes that are refusals before (or instead of) work: counted as rejected, by reason.
REJECTION_REASON = {
    "invalid_request": "invalid",
    "unauthenticated": "unauthenticated",
    "permission_denied": "permission_denied",
    "rate_limited": "rate_limited",
    "overloaded": "overloaded",
    "payload_too_large": "payload_too_large",
}
NO_KEY = "none"  # key label of a call refused before a key was known


@dataclass
class Call:
    transport: str
    method: str
    principal: Principal | None = None
    outcome: str = "ok"
    source: str = "none"

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, ServiceError):
            self.outcome = exc.type
        elif isinstance(exc, asyncio.CancelledError):
            self.outcome = "cancelled"  # the client went away; not a server error
        else:
            self.outcome = "internal_error"


_CURRENT: ContextVar[Call | None] = ContextVar("thinkahead_call", default=None)


def current_call() -> Call | None:
    """The call being served in this task (None outside the gate, e.g. in unit tests)."""
    return _CURRENT.get()


class Gate:
    def __init__(
        self, auth: Authenticator, limiter: RateLimiter, admission: Admission, metrics: Metrics
    ) -> None:
        self.auth = auth
        self.limiter = limiter
        self.admission = admission
        self.metrics = metrics

    @asynccontextmanager
    async def call(
        self, transport: str, method: str, authorization: str | None
    ) -> AsyncIterator[Call]:
        """Authorise, rate-limit and admit one call; time and count it however it ends.
        Raises the refusal (a :class:`ServiceError`) for the transport to map."""
        call = Call(transport, method)
        token = _CURRENT.set(call)
        t0 = time.perf_counter()
        try:
            call.principal = self.auth.authorize(authorization, SCOPE_OF[method])
            self.limiter.check(call.principal)
            async with self.admission.admit():
                yield call
        except BaseException as exc:
            call.fail(exc)
            raise
        finally:
            _CURRENT.reset(token)
            self._count(call, time.perf_counter() - t0)

    def _count(self, call: Call, elapsed: float) -> None:
        m = self.metrics
        key = call.principal.name if call.principal is not None else NO_KEY
        m.calls.labels(call.transport, call.method, call.outcome, key).inc()
        m.call_seconds.labels(call.transport, call.method).observe(elapsed)
        reason = REJECTION_REASON.get(call.outcome)
        if reason is not None:
            m.rejected.labels(reason).inc()
        if call.method == "recommend":
            m.requests.labels(call.transport, call.outcome, call.source).inc()
            m.request_seconds.labels(call.transport).observe(elapsed)
