"""Every Prometheus metric the service exports, in one place (one registry per service)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Milliseconds matter here: 1 ms .. 5 s.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.0,
    5.0,
)
PREFIX = "thinkahead"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests_total",
            "Recommend requests by transport, outcome and answer source.",
            ["transport", "outcome", "source"],
            registry=r,
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "End-to-end recommend latency inside the server.",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            f"{PREFIX}_stage_duration_seconds",
            "Time per request stage (redis, decode, encode).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            f"{PREFIX}_fallbacks_total",
            "Answers not from think-ahead, by reason.",
            ["reason", "source"],
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_in_flight_requests",
            "API calls being served (recommend and events; the admission limit counts both).",
            registry=r,
        )
        self.rejected = Counter(
            f"{PREFIX}_rejected_requests_total",
            "Requests refused before work (admission limit, invalid input).",
            ["reason"],
            registry=r,
        )
        self.snapshot_age = Gauge(
            f"{PREFIX}_snapshot_age_seconds",
            "Age of the active think-ahead snapshot (since it was built); -1 when none.",
            registry=r,
        )
        self.snapshot_info = Gauge(
            f"{PREFIX}_snapshot_compatible",
            "1 when the active snapshot matches the loaded model and catalog.",
            registry=r,
        )
        self.snapshot_flips = Counter(
            f"{PREFIX}_snapshot_changes_total", "Active snapshot changes seen.", registry=r
        )
        self.engine_queue = Gauge(
            f"{PREFIX}_engine_queue_depth",
            "Engine requests submitted and not answered.",
            registry=r,
        )
        self.corrupt_values = Counter(
            f"{PREFIX}_corrupt_values_total",
            "Redis values ignored because they could not be decoded.",
            ["key_type"],
            registry=r,
        )
        self.precomputed_answers = Counter(
            f"{PREFIX}_precomputed_answers_total",
            "Think-ahead answers served from the snapshot's stored ranking (unchanged history): "
            "no engine round.",
            registry=r,
        )
        self.answers = Counter(
            f"{PREFIX}_answers_total",
            "Recommend answers by whether an engine round was needed (engine_round yes / no): "
            "stored answers, re-ranked stored answers and engine-free fallbacks are 'no'.",
            ["engine_round"],
            registry=r,
        )
        self.events = Counter(
            f"{PREFIX}_events_total",
            "Item events appended, by transport.",
            ["transport"],
            registry=r,
        )
        # Every API call through the one REST middleware / gRPC interceptor, counted the same
        # way over both transports. ``key`` is the API key's name (never the key itself), a
        # bounded set from the keys file; "anonymous" when auth is off, "none" when refused
        # before a key was known.
        self.calls = Counter(
            f"{PREFIX}_api_calls_total",
            "API calls by transport, method, outcome and API key name.",
            ["transport", "method", "outcome", "key"],
            registry=r,
        )
        self.call_seconds = Histogram(
            f"{PREFIX}_api_call_duration_seconds",
            "API call latency inside the server, auth and admission included.",
            ["transport", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.breaker_state = Gauge(
            f"{PREFIX}_engine_breaker_state",
            "Engine circuit breaker: 0 closed, 1 half-open (probing), 2 open.",
            registry=r,
        )
        self.breaker_transitions = Counter(
            f"{PREFIX}_engine_breaker_transitions_total",
            "Engine circuit breaker state changes, by the state entered.",
            ["state"],
            registry=r,
        )
        self.unannounced = Counter(
            f"{PREFIX}_events_unannounced_total",
            "Events stored whose user could not be added to the re-think stream (Redis "
            "failed between the append and the announce): re-thought at the next event or "
            "the nightly snapshot.",
            registry=r,
        )
        self.idempotent_replays = Counter(
            f"{PREFIX}_idempotent_replays_total",
            "Events batches answered from an earlier call with the same idempotency key.",
            registry=r,
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 when /readyz would answer ready.", registry=r)
        self.build = Info(f"{PREFIX}_build", "Service, model and catalog versions.", registry=r)
