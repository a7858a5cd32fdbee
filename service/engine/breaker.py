"""Engine circuit breaker: closed -> open after N engine errors in a row; a background probe
(half-open) retries the engine every interval and closes the breaker on success.

Why a probe and not the classic "let the next request through": unchanged-history and cold
requests may never call the engine, so a breaker that waits for traffic can stay open (full
decode off) indefinitely after the engine is back. The probe recovers it with no request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from enum import IntEnum

log = logging.getLogger(__name__)


class BreakerState(IntEnum):
    # Values are the gauge's values: alerts read "> 0" as "not closed".
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self, failures: int, on_change: Callable[[BreakerState], None] | None = None
    ) -> None:
        self.failures = failures
        self.state = BreakerState.CLOSED
        self._consecutive = 0
        self._on_change = on_change

    def _set(self, state: BreakerState) -> None:
        if state is self.state:
            return
        log.warning("event=engine_breaker from=%s to=%s", self.state.name, state.name)
        self.state = state
        if self._on_change is not None:
            self._on_change(state)

    def allow(self) -> bool:
        """Whether a request may call the engine: only when closed. While half-open the probe
        is the single trial; requests keep answering from fallbacks meanwhile."""
        return self.state is BreakerState.CLOSED

    def record_success(self) -> None:
        self._consecutive = 0
        self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self._consecutive += 1
        if self.state is not BreakerState.CLOSED or self._consecutive >= self.failures:
            self._set(BreakerState.OPEN)

    def trip(self) -> None:
        """Open at once (a failed warm-up: no point waiting for N request failures)."""
        self._consecutive = max(self._consecutive, self.failures)
        self._set(BreakerState.OPEN)

    async def probe_once(self, probe: Callable[[], Awaitable[object]], timeout_s: float) -> None:
        if self.state is BreakerState.CLOSED:
            return
        self._set(BreakerState.HALF_OPEN)
        try:
            async with asyncio.timeout(timeout_s):
                await probe()
        except Exception as exc:  # any failure of the probe keeps the engine out of traffic
            log.info("event=engine_probe_failed error=%s: %s", type(exc).__name__, exc)
            self._set(BreakerState.OPEN)
        else:
            self.record_success()

    async def run_probes(
        self, probe: Callable[[], Awaitable[object]], interval_s: float, timeout_s: float
    ) -> None:
        """Forever (cancel to stop): every ``interval_s``, probe the engine unless closed."""
        while True:
            await asyncio.sleep(interval_s)
            await self.probe_once(probe, timeout_s)
