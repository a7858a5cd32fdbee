"""The service's own view of a load run: recommend latency per transport from its Prometheus
histogram, the difference of two scrapes of ``/metrics``.

It separates what the server spends from what a load generator adds: the locust REST and gRPC
users share one gevent loop, so a client-side gap shows up in locust's medians but not here.
"""

from __future__ import annotations

import math

import httpx
from prometheus_client.parser import text_string_to_metric_families

HISTOGRAM = "thinkahead_request_duration_seconds"
Buckets = dict[str, dict[float, float]]  # transport -> upper bound -> cumulative count


def scrape_buckets(base_url: str, timeout: float = 10.0) -> Buckets:
    return parse_buckets(httpx.get(f"{base_url}/metrics", timeout=timeout).text)


def parse_buckets(text: str) -> Buckets:
    out: Buckets = {}
    for family in text_string_to_metric_families(text):
        if family.name != HISTOGRAM:
            continue
        for sample in family.samples:
            if sample.name == f"{HISTOGRAM}_bucket":
                bound = float(sample.labels["le"])
                out.setdefault(sample.labels["transport"], {})[bound] = sample.value
    return out


def quantile(counts: dict[float, float], q: float) -> float | None:
    """The q-quantile of a cumulative histogram, linear within its bucket (as PromQL's
    histogram_quantile); None when it is empty or falls in the +Inf bucket."""
    bounds = sorted(counts)
    total = counts[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        if counts[bound] >= rank:
            if math.isinf(bound):
                return None
            share = (rank - below) / max(counts[bound] - below, 1e-12)
            return lower + (bound - lower) * share
        lower, below = bound, counts[bound]
    return None


def server_latency(before: Buckets, after: Buckets) -> dict[str, dict[str, float | None]]:
    """Per transport: recommends served between the scrapes and their server-side p50 / p99
    in ms."""
    out: dict[str, dict[str, float | None]] = {}
    for transport, counts in sorted(after.items()):
        earlier = before.get(transport, {})
        delta = {b: c - earlier.get(b, 0.0) for b, c in counts.items()}
        p50, p99 = quantile(delta, 0.5), quantile(delta, 0.99)
        out[transport] = {
            "requests": delta.get(math.inf, 0.0),
            "p50_ms": None if p50 is None else round(p50 * 1e3, 1),
            "p99_ms": None if p99 is None else round(p99 * 1e3, 1),
        }
    return out
