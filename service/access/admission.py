"""Admission fails fast: past the in-flight limit a call is refused at once (429 /
RESOURCE_EXHAUSTED), never queued."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import Gauge

from service.errors import Overloaded


class Admission:
    """Counts the API calls in flight (recommend and events alike) against ``max_in_flight``;
    ``gauge`` follows the count."""

    def __init__(self, max_in_flight: int, gauge: Gauge) -> None:
        self.max_in_flight = max_in_flight
        self.gauge = gauge
        self.in_flight = 0

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Holds one slot for the block; raises :class:`Overloaded` when none is free (the
        gate counts the refusal, by reason, like every other)."""
        if self.in_flight >= self.max_in_flight:
            raise Overloaded(f"more than {self.max_in_flight} requests in flight")
        self.in_flight += 1
        self.gauge.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.gauge.dec()
