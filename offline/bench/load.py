"""A closed-loop load generator over real HTTP: ``concurrency`` clients, each sending its next
request as soon as the previous answer arrives, for a fixed time after a warm-up; and what the
bench reads back from the locust mix (tests/load/locustfile.py): its recommend samples and CSV
rows, the tags of a recommend sent 2 s after its event."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np


@dataclass
class LoadResult:
    scenario: str
    concurrency: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    server_total_ms: list[float] = field(default_factory=list)
    redis_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)
    sources: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.array([np.nan])

        def pct(values: list[float], q: float) -> float:
            return round(float(np.percentile(values, q)), 2) if values else float("nan")

        overhead = [t - d for t, d in zip(self.server_total_ms, self.decode_ms, strict=True)]
        client_minus_decode = [
            c - d for c, d in zip(self.latencies_ms, self.decode_ms, strict=True)
        ]
        return {
            "scenario": self.scenario,
            "concurrency": self.concurrency,
            "requests": len(self.latencies_ms),
            "throughput_rps": round(len(self.latencies_ms) / self.seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p95_ms": round(float(np.percentile(lat, 95)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "redis_p50_ms": pct(self.redis_ms, 50),
            "decode_p50_ms": pct(self.decode_ms, 50),
            "decode_p99_ms": pct(self.decode_ms, 99),
            "server_overhead_p50_ms": pct(overhead, 50),
            "server_overhead_p99_ms": pct(overhead, 99),
            "end_to_end_minus_decode_p50_ms": pct(client_minus_decode, 50),
            "sources": dict(self.sources),
            "errors": dict(self.errors),
        }


async def _client(
    http: httpx.AsyncClient,
    bodies: Sequence[dict[str, Any]],
    stop_at: float,
    record_from: float,
    result: LoadResult,
    rng: random.Random,
) -> None:
    while time.perf_counter() < stop_at:
        body = rng.choice(bodies)
        t0 = time.perf_counter()
        try:
            reply = await http.post("/v1/recommend", json=body)
        except httpx.HTTPError as exc:
            if t0 >= record_from:
                result.errors[type(exc).__name__] += 1
            continue
        elapsed = (time.perf_counter() - t0) * 1e3
        if t0 < record_from:
            continue
        if reply.status_code != 200:
            result.errors[str(reply.status_code)] += 1
            continue
        data = reply.json()
        result.latencies_ms.append(elapsed)
        result.server_total_ms.append(data["timings"]["total_ms"])
        result.redis_ms.append(data["timings"]["redis_ms"])
        result.decode_ms.append(data["timings"]["decode_ms"])
        result.sources[data["source"]] += 1


async def run_load(
    base_url: str,
    scenario: str,
    bodies: Sequence[dict[str, Any]],
    concurrency: int,
    seconds: float,
    warmup_s: float = 2.0,
    seed: int = 0,
) -> LoadResult:
    result = LoadResult(scenario, concurrency, seconds)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:
        now = time.perf_counter()
        record_from, stop_at = now + warmup_s, now + warmup_s + seconds
        await asyncio.gather(
            *(
                _client(http, bodies, stop_at, record_from, result, random.Random(seed + i))
                for i in range(concurrency)
            )
        )
    return result


# The locust mix (tests/load/locustfile.py). A recommend sent 2 s after its user's event is
# reported under its name tagged by whether its answer needed an engine round
# (``timings.decode_ms`` is 0 exactly when it did not), so locust's CSV counts both.
NO_ENGINE_ROUND, ENGINE_ROUND = "no engine round", "engine round"
AFTER_EVENT_2S = "2s after event"
# The mix's event requests, by transport: with a recommend right after, and 2 s before one.
EVENT_NAMES = {
    "rest": ("events", "events (recommend 2s later)"),
    "grpc": ("AppendEvents", "AppendEvents (Recommend 2s later)"),
}


def tagged(name: str, decode_ms: float) -> str:
    return f"{name} ({NO_ENGINE_ROUND if decode_ms == 0 else ENGINE_ROUND})"


def untagged(name: str) -> tuple[str, str | None]:
    """A locust name without its engine-round tag, and the tag as ``engine_round`` (yes / no;
    None when the name carries none)."""
    for tag, engine_round in ((NO_ENGINE_ROUND, "no"), (ENGINE_ROUND, "yes")):
        suffix = f" ({tag})"
        if name.endswith(suffix):
            return name[: -len(suffix)], engine_round
    return name, None


def transport_of(request_type: str) -> str:
    """locust's request type as a transport: the gRPC users report "grpc", REST ones a method."""
    return "grpc" if request_type.lower() == "grpc" else "rest"


def _share(free: int, total: int) -> dict[str, Any]:
    return {
        "recommends": total,
        "no_engine_round": free,
        "share": round(free / total, 4) if total else None,
    }


def engine_free_after_event(rows: Sequence[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """From locust's CSV rows: recommends sent 2 s after their event, per transport and in
    all, and the share of them answered without an engine round."""
    counts: dict[str, Counter[str]] = {}
    for row in rows:
        name, engine_round = untagged(row.get("Name", ""))
        if engine_round is None or AFTER_EVENT_2S not in name:
            continue
        n = int(float(row.get("Request Count") or 0))
        for key in (transport_of(row.get("Type", "")), "all"):
            counts.setdefault(key, Counter())[engine_round] += n
    counts.setdefault("all", Counter())
    return {k: _share(c["no"], c["no"] + c["yes"]) for k, c in sorted(counts.items())}


def locust_totals(rows: Sequence[dict[str, str]]) -> dict[str, Any]:
    """From locust's CSV rows: aggregate throughput and failures, failures per transport, and
    the rate of event requests (the rows named in ``EVENT_NAMES``)."""
    event_names = {n for names in EVENT_NAMES.values() for n in names}
    aggregated = next((r for r in rows if r.get("Name") == "Aggregated"), {})
    failures: Counter[str] = Counter()
    events_rps = 0.0
    for row in rows:
        if row.get("Name") == "Aggregated":
            continue
        failures[transport_of(row.get("Type", ""))] += int(float(row.get("Failure Count") or 0))
        if row.get("Name") in event_names:
            events_rps += float(row.get("Requests/s") or 0)
    return {
        "throughput_rps": round(float(aggregated.get("Requests/s") or 0), 1),
        "requests": int(float(aggregated.get("Request Count") or 0)),
        "failures": int(float(aggregated.get("Failure Count") or 0)),
        "failures_by_transport": dict(sorted(failures.items())),
        "events_per_s": round(events_rps, 2),
    }


@dataclass(frozen=True)
class Sample:
    """One recommend of the locust mix, as the locustfile records it (THINKAHEAD_LOAD_SAMPLES):
    transport, kind (its locust name without the engine-round tag), ms, answered or not."""

    transport: str
    kind: str
    ms: float
    ok: bool

    def line(self) -> str:
        return f"{self.transport}\t{self.kind}\t{self.ms:.3f}\t{int(self.ok)}"

    @classmethod
    def parse(cls, line: str) -> Sample:
        transport, kind, ms, ok = line.rstrip("\n").split("\t")
        return cls(transport, kind, float(ms), ok == "1")


def read_samples(text: str) -> list[Sample]:
    return [Sample.parse(line) for line in text.splitlines() if line.strip()]


def _latency(samples: Sequence[Sample]) -> dict[str, Any]:
    ok = [s.ms for s in samples if s.ok]

    def pct(q: float) -> float | None:
        return round(float(np.percentile(ok, q)), 1) if ok else None

    return {
        "requests": len(samples),
        "failures": len(samples) - len(ok),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
    }


def recommend_latency(samples: Sequence[Sample], seconds: float) -> dict[str, dict[str, Any]]:
    """Client-side recommend latency per transport: every recommend kind together (p50 / p99
    over the answered ones, failures, recommends per second over ``seconds``) and per kind."""
    out: dict[str, dict[str, Any]] = {}
    for transport in sorted({s.transport for s in samples}):
        mine = [s for s in samples if s.transport == transport]
        kinds: dict[str, list[Sample]] = {}
        for s in mine:
            kinds.setdefault(s.kind, []).append(s)
        out[transport] = {
            **_latency(mine),
            "recommends_per_s": round(len(mine) / seconds, 1) if seconds > 0 else None,
            "kinds": {k: _latency(v) for k, v in sorted(kinds.items())},
        }
    return out
