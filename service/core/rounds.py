"""The engine as the recommend chain uses it: one scoring round under the request's deadline,
behind the circuit breaker, counted in the queue gauge and timed as the decode stage; full
decode, and whether it fits what is left of a budget."""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque

from service.contracts.beam import BeamSearch, run_searches_async
from service.core.clock import Clock
from service.core.types import Degraded, DegradedReason
from service.engine.base import Engine, EngineError, ScoreRequest, TokenLogprobs
from service.engine.breaker import CircuitBreaker
from service.metrics import Metrics

log = logging.getLogger(__name__)
ROUND_FLOOR_S = 0.0005  # a round still gets this long when the budget is already spent
ROUND_MEMORY_S = 5.0  # half-life of the round-time estimate without new measurements
ROUND_SAMPLES = 8  # lone rounds whose median is the estimate


class EngineRounds:
    def __init__(self, engine: Engine, breaker: CircuitBreaker, metrics: Metrics) -> None:
        self.engine = engine
        self.breaker = breaker
        self.metrics = metrics
        self._full_decode_s = 0.0  # running estimate, decides whether full decode fits a budget
        # the last rounds that ran with no other in flight (seconds): what one more costs
        self._lone_rounds: deque[float] = deque(maxlen=ROUND_SAMPLES)
        self._learned_at = 0.0
        self.rounds_in_flight = 0

    @property
    def healthy(self) -> bool:
        """False while the engine breaker is open or probing: skip full decode, fall back."""
        return self.breaker.allow()

    def full_decode_fits(self, clock: Clock) -> bool:
        return clock.remaining() > self._full_decode_s * 1.1

    def round_fits(self, clock: Clock, target_s: float | None = None) -> bool:
        """Whether one more round would end within the budget and, when given, within
        ``target_s``: rounds queue behind the ones in flight on a busy engine, so it waits
        about a lone round per round ahead of it. A lone round is the median of the last
        ``ROUND_SAMPLES`` rounds that ran with no other in flight: on an idle engine its cost,
        on a loaded box what CPU contention adds (then fresh users are re-ranked instead). On
        an idle engine the estimate halves every ``ROUND_MEMORY_S`` without a new measurement,
        so an engine judged too slow is tried again; while rounds are in flight it holds."""
        idle_round = statistics.median(self._lone_rounds) if self._lone_rounds else 0.0
        if self.rounds_in_flight == 0:
            age = time.monotonic() - self._learned_at
            idle_round *= 0.5 ** (age / ROUND_MEMORY_S)
        expected = idle_round * (1 + self.rounds_in_flight) * 1.2
        within_target = target_s is None or expected <= target_s
        return within_target and clock.remaining() > expected

    async def score(
        self, requests: list[ScoreRequest], clock: Clock, request_id: str
    ) -> list[TokenLogprobs]:
        """One round; raises :class:`Degraded` when the budget runs out or the engine fails
        (or its breaker is open: a background probe retries it)."""
        try:
            return await self._score(requests, clock)
        except TimeoutError:
            raise Degraded(DegradedReason.BUDGET_EXCEEDED) from None
        except EngineError as exc:
            log.warning("event=engine_error request_id=%s error=%s", request_id, exc)
            raise Degraded(DegradedReason.ENGINE_UNAVAILABLE) from exc

    async def _score(self, requests: list[ScoreRequest], clock: Clock) -> list[TokenLogprobs]:
        if not self.breaker.allow():
            raise EngineError("engine circuit breaker open; a background probe retries it")
        self.metrics.engine_queue.inc(len(requests))
        alone = self.rounds_in_flight == 0
        self.rounds_in_flight += 1
        t0 = time.perf_counter()
        try:
            async with clock.stage("decode", ROUND_FLOOR_S):
                results = await self.engine.score(requests)
            self.breaker.record_success()
            return results
        except EngineError:
            self.breaker.record_failure()
            raise
        finally:
            self.rounds_in_flight -= 1
            self.metrics.engine_queue.dec(len(requests))
            if alone:  # the engine's own cost, no queue ahead
                self._learn_round(time.perf_counter() - t0, cut=clock.remaining() <= 0)

    def _learn_round(self, elapsed: float, cut: bool) -> None:
        """A round the deadline cut took at least its budget: the estimate goes straight to
        that (every sample becomes it); otherwise one more sample for the median, so a single
        slow first round does not price the engine for long."""
        if cut:
            worst = max([elapsed, *self._lone_rounds])
            self._lone_rounds.extend([worst] * (self._lone_rounds.maxlen or 1))
        else:
            self._lone_rounds.append(elapsed)
        self._learned_at = time.monotonic()

    async def full_decode(self, search: BeamSearch, clock: Clock, request_id: str) -> None:
        """Runs ``search`` to the end (rounds as :meth:`score`), and learns how long it took."""
        t0 = time.perf_counter()
        await run_searches_async([search], lambda reqs: self.score(reqs, clock, request_id))
        elapsed = time.perf_counter() - t0
        est = self._full_decode_s
        self._full_decode_s = elapsed if est == 0 else 0.8 * est + 0.2 * elapsed
