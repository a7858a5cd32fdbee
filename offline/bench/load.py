"""A closed-loop load generator over real HTTP: ``concurrency`` clients, each sending its next
request as soon as the previous answer arrives, for a fixed time after a warm-up."""

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
