"""One request's deadline and the one stage timer of the chain's reads, engine rounds and
in-process encodes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from prometheus_client import Histogram

from service.core.types import Timings

Stage = Literal["redis", "decode", "encode"]


class Clock:
    """Started when the request is; ``stage_seconds`` is the stage histogram
    (``thinkahead_stage_duration_seconds``)."""

    def __init__(self, budget_s: float, stage_seconds: Histogram) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s
        self._stage_seconds = stage_seconds
        self._spent: dict[Stage, float] = {"redis": 0.0, "decode": 0.0, "encode": 0.0}

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    @asynccontextmanager
    async def stage(self, name: Stage, floor_s: float) -> AsyncIterator[None]:
        """Runs the block under the rest of the budget (at least ``floor_s``, so a late step
        still gets its chance; ``TimeoutError`` past it), adds its time to the request's
        ``name`` stage and observes it in the histogram, however the block ends."""
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(max(self.remaining(), floor_s)):
                yield
        finally:
            elapsed = time.perf_counter() - t0
            self._spent[name] += elapsed
            self._stage_seconds.labels(name).observe(elapsed)

    def timings(self) -> Timings:
        total = time.perf_counter() - self.start
        return Timings(self._spent["redis"] * 1e3, self._spent["decode"] * 1e3, total * 1e3)
