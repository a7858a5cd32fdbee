"""Per-key token buckets: a key's calls refill at ``rate_per_s`` up to ``burst``; one key
spending its budget never slows another. In-process, so the limit holds per replica."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from service.access.auth import Principal
from service.errors import RateLimited


@dataclass
class TokenBucket:
    rate_per_s: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Takes one token and returns 0, or returns the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class RateLimiter:
    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, principal: Principal, now: float | None = None) -> None:
        """Raises :class:`RateLimited` (429 + Retry-After) when the key's bucket is empty."""
        rate = principal.rate_per_s
        if rate is None:
            return
        now = time.monotonic() if now is None else now
        burst = float(principal.burst or max(1.0, rate))
        bucket = self._buckets.get(principal.name)
        # A reloaded keys file may change a key's limits: start that key's bucket afresh.
        if bucket is None or bucket.rate_per_s != rate or bucket.burst != burst:
            bucket = self._buckets[principal.name] = TokenBucket(rate, burst, burst, now)
        wait = bucket.take(now)
        if wait > 0:
            raise RateLimited(
                f"rate limit of key {principal.name!r} ({rate:g}/s, burst {burst:g}) reached",
                retry_after_s=max(1, math.ceil(wait)),
            )
