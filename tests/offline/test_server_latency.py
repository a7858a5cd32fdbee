"""The bench's server-side latency per transport, from the service's real metrics registry."""

from __future__ import annotations

import math

import pytest
from prometheus_client import generate_latest

from offline.bench.server_latency import parse_buckets, quantile, server_latency
from service.metrics import Metrics


def scrape(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_latency_between_two_scrapes_counts_only_the_run_per_transport() -> None:
    metrics = Metrics()
    for _ in range(50):  # before the run: slow requests that must not count
        metrics.request_seconds.labels("rest").observe(1.5)
    before = parse_buckets(scrape(metrics))
    for _ in range(90):
        metrics.request_seconds.labels("rest").observe(0.004)  # bucket (2.5 ms, 5 ms]
    for _ in range(10):
        metrics.request_seconds.labels("rest").observe(0.4)
    for _ in range(20):
        metrics.request_seconds.labels("grpc").observe(0.04)  # bucket (30 ms, 50 ms]
    got = server_latency(before, parse_buckets(scrape(metrics)))
    assert set(got) == {"rest", "grpc"}
    assert got["rest"]["requests"] == 100 and got["grpc"]["requests"] == 20
    assert 2.5 < got["rest"]["p50_ms"] <= 5.0  # type: ignore[operator]
    assert 300 < got["rest"]["p99_ms"] <= 500  # type: ignore[operator]
    assert 30 < got["grpc"]["p50_ms"] <= 50  # type: ignore[operator]


def test_quantile_interpolates_within_a_bucket_and_knows_when_it_cannot() -> None:
    counts = {0.01: 0.0, 0.02: 10.0, math.inf: 10.0}
    assert quantile(counts, 0.5) == pytest.approx(0.015)
    assert quantile({0.01: 0.0, math.inf: 0.0}, 0.5) is None  # no requests
    assert quantile({0.01: 1.0, math.inf: 10.0}, 0.5) is None  # beyond the last bound
