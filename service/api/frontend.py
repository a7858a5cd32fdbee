"""What the transports may reach of a serving process: the two use cases, the health answers,
the metrics and the gate every API call passes. :mod:`service.app` builds it over the runtime;
the adapters never see the runtime itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from service.access.gate import Gate
from service.core import EventsResult, Recommendation, RecommendQuery
from service.metrics import Metrics


@dataclass(frozen=True)
class Frontend:
    recommend: Callable[[RecommendQuery], Awaitable[Recommendation]]
    append_events: Callable[[str, Sequence[str], str | None], Awaitable[EventsResult]]
    readiness: Callable[[], Awaitable[dict[str, bool]]]  # check name -> ok
    alive: Callable[[], bool]  # False once the in-process engine is dead for good
    metrics: Metrics  # the events counter, and /metrics
    gate: Gate
