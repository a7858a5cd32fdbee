"""The service's own view of a load run: recommend latency per transport from its Prometheus
histogram, the difference of two scrapes of ``/metrics``; likewise the share of answers that
needed no engine round, and the re-think worker's lag and throughput from its own registry.

It separates what the server spends from what a load generator adds: the locust REST and gRPC
users share one gevent loop, so a client-side gap shows up in locust's medians but not here.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

HISTOGRAM = "thinkahead_request_duration_seconds"
ANSWERS = "thinkahead_answers_total"  # label engine_round: yes | no
RETHINK_LAG = "thinkahead_rethink_lag_seconds"
RETHINK_USERS = "thinkahead_rethink_users_total"  # label outcome: written | stale | skipped
RETHINK_FAILURES = "thinkahead_rethink_failures_total"
RETHINK_BATCH_USERS = "thinkahead_rethink_batch_users"
RETHINK_PENDING = "thinkahead_rethink_stream_pending"
Buckets = dict[str, dict[float, float]]  # transport -> upper bound -> cumulative count


def scrape_text(base_url: str, timeout: float = 10.0) -> str:
    return httpx.get(f"{base_url}/metrics", timeout=timeout).text


def scrape_buckets(base_url: str, timeout: float = 10.0) -> Buckets:
    return parse_buckets(scrape_text(base_url, timeout))


def parse_histogram(text: str, name: str, label: str | None = None) -> Buckets:
    """A histogram's cumulative bucket counts, by the value of ``label`` ("" without one)."""
    out: Buckets = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                key = sample.labels.get(label, "") if label else ""
                out.setdefault(key, {})[float(sample.labels["le"])] = sample.value
    return out


def parse_buckets(text: str) -> Buckets:
    return parse_histogram(text, HISTOGRAM, "transport")


def sample_values(text: str, name: str, label: str | None = None) -> dict[str, float]:
    """Values of the samples called ``name`` (a counter's ``..._total``, a gauge, a histogram's
    ``..._count`` / ``..._sum``), summed by the value of ``label`` ("" without one)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = sample.labels.get(label, "") if label else ""
                out[key] = out.get(key, 0.0) + sample.value
    return out


def sample_delta(before: str, after: str, name: str, label: str | None = None) -> dict[str, float]:
    """``sample_values`` of the later scrape less those of the earlier one."""
    earlier = sample_values(before, name, label)
    return {k: v - earlier.get(k, 0.0) for k, v in sample_values(after, name, label).items()}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


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
        out[transport] = {
            "requests": delta.get(math.inf, 0.0),
            "p50_ms": _ms(quantile(delta, 0.5)),
            "p99_ms": _ms(quantile(delta, 0.99)),
        }
    return out


def engine_free_share(before: str, after: str) -> dict[str, float | None]:
    """Recommend answers between two scrapes of the service, and the share of them that needed
    no engine round (``thinkahead_answers_total{engine_round="no"}``)."""
    delta = sample_delta(before, after, ANSWERS, "engine_round")
    answers = delta.get("yes", 0.0) + delta.get("no", 0.0)
    free = delta.get("no", 0.0)
    return {
        "answers": answers,
        "no_engine_round": free,
        "share": round(free / answers, 4) if answers > 0 else None,
    }


def rethink_summary(
    before: str, after: str, cpu_seconds: float, seconds: float, backlog: int | None = None
) -> dict[str, Any]:
    """The re-think worker between two scrapes of its registry: the lag from stream entry to
    entry written (p50 / p99, interpolated within the histogram's buckets), users by outcome,
    failed batches, batches and their mean size, the stream backlog at the end (``backlog``
    as read from Redis, else the worker's gauge, set between batches), and users re-thought
    (written + stale: an engine pass each) per second of ``seconds`` and per CPU-second of the
    worker (``cpu_seconds`` over the same interval). The lag covers entries written: users
    still in the backlog at the end have none yet."""
    earlier = parse_histogram(before, RETHINK_LAG).get("", {})
    later = parse_histogram(after, RETHINK_LAG).get("", {})
    lag = {b: c - earlier.get(b, 0.0) for b, c in later.items()}
    outcomes = sample_delta(before, after, RETHINK_USERS, "outcome")
    users = {k: int(outcomes.get(k, 0.0)) for k in ("written", "stale", "skipped")}
    failures = sample_delta(before, after, RETHINK_FAILURES).get("", 0.0)
    batches = sample_delta(before, after, f"{RETHINK_BATCH_USERS}_count").get("", 0.0)
    batch_users = sample_delta(before, after, f"{RETHINK_BATCH_USERS}_sum").get("", 0.0)
    if backlog is None:
        gauge = sample_values(after, RETHINK_PENDING).get("")
        backlog = None if gauge is None else int(gauge)
    thought = users["written"] + users["stale"]
    return {
        "lag_p50_ms": _ms(quantile(lag, 0.5)) if lag else None,
        "lag_p99_ms": _ms(quantile(lag, 0.99)) if lag else None,
        "lag_observations": int(lag.get(math.inf, 0.0)),
        "users": users,
        "failures": int(failures),
        "batches": int(batches),
        "mean_batch_users": round(batch_users / batches, 2) if batches else None,
        "stream_backlog_at_end": backlog,
        "cpu_seconds": round(cpu_seconds, 2),
        "users_per_s": round(thought / seconds, 2) if seconds > 0 else None,
        "users_per_cpu_second": round(thought / cpu_seconds, 2) if cpu_seconds > 0 else None,
    }
