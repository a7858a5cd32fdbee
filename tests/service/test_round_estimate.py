"""How the core prices one more engine round: the median of the last lone rounds, times the
rounds it would queue behind; a cut round prices the engine at its budget."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from service.core.clock import Clock
from service.core.rounds import ROUND_SAMPLES, EngineRounds
from service.core.types import Degraded
from service.engine.base import ScoreRequest
from service.engine.breaker import CircuitBreaker
from service.metrics import Metrics
from tests.fake_engine import FakeEngine

REQUEST = [ScoreRequest(prompt=(1, 2), allowed=(3, 4, 5), want=(3, 4, 5))]


def rounds_over(engine: FakeEngine) -> tuple[EngineRounds, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return EngineRounds(engine, CircuitBreaker(failures=3), metrics), metrics


async def test_one_slow_first_round_does_not_price_the_engine_for_long() -> None:
    engine = FakeEngine()
    rounds, metrics = rounds_over(engine)
    clock = lambda: Clock(2.0, metrics.stage_seconds)  # noqa: E731
    assert rounds.round_fits(clock(), target_s=0.1)  # nothing learned yet
    engine.delay_s = 0.3  # a cold first round
    await rounds.score(REQUEST, clock(), "r1")
    assert not rounds.round_fits(clock(), target_s=0.1)
    assert rounds.round_fits(clock())  # the budget alone would still take it
    engine.delay_s = 0.02
    for n in range(2):
        await rounds.score(REQUEST, clock(), f"r{n + 2}")
    assert rounds.round_fits(clock(), target_s=0.1)  # the median is a fast round again


async def test_a_round_the_deadline_cut_prices_the_engine_at_its_budget() -> None:
    engine = FakeEngine()
    rounds, metrics = rounds_over(engine)
    for n in range(ROUND_SAMPLES):
        await rounds.score(REQUEST, Clock(2.0, metrics.stage_seconds), f"fast{n}")
    assert rounds.round_fits(Clock(0.05, metrics.stage_seconds))  # fast rounds fit 50 ms
    engine.delay_s = 0.2
    with pytest.raises(Degraded):  # cut at its 50 ms deadline
        await rounds.score(REQUEST, Clock(0.05, metrics.stage_seconds), "cut")
    assert not rounds.round_fits(Clock(0.05, metrics.stage_seconds))
    assert rounds.round_fits(Clock(2.0, metrics.stage_seconds))
