"""Service configuration: one pydantic-settings object, env prefix ``THINKAHEAD_`` and ``__``
between nested sections (``THINKAHEAD_REDIS__URL``); CLI flags override."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.contracts.fusion import FusionWeights
from service.contracts.manifest import MAX_HISTORY
from service.contracts.model import ServingConfig
from service.contracts.think_ahead import ScoringSettings
from service.engine.vllm_engine import VllmOptions

MAX_LIST_ITEMS = 200  # hard cap of id lists in one request (the API schema documents it)


def _describe(name: str) -> str | None:
    return ScoringSettings.model_fields[name].description


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False
    prefix: str = Field(default="ta", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    history_prefix: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,32}$",
        description="prefix of users' history lists; None: the snapshot prefix",
    )
    socket_timeout_ms: int = Field(
        default=100, ge=1, description="reads: the request's budget decides, not the driver"
    )
    write_timeout_ms: int = Field(
        default=1000,
        ge=1,
        description="history appends and the events stream: an append cut off by a timeout may "
        "still have been applied, and a caller's retry without an idempotency key would append "
        "it twice, so a write outwaits a short stall that a read would fall back from",
    )
    connect_timeout_ms: int = Field(default=100, ge=1)
    max_connections: int = Field(default=128, ge=1)
    history_cap: int = Field(default=MAX_HISTORY, ge=1, le=1000)
    snapshot_poll_s: float = Field(default=1.0, gt=0)
    max_snapshot_age_s: float = Field(default=3 * 86400, gt=0)
    events_maxlen: int = Field(
        default=100_000,
        ge=0,
        description="users who acted are added to the events stream (ta:events) the re-think "
        "worker reads, trimmed to about this many entries; 0: no stream",
    )
    idempotency_window_s: float = Field(
        default=86400,
        gt=0,
        description="how long an events idempotency key is remembered (a retry within it is "
        "answered from the first call, not appended again)",
    )


class BreakerSettings(BaseModel):
    """Engine circuit breaker: after ``failures`` engine errors in a row requests stop calling
    the engine (fallbacks answer at once); a background probe retries it every
    ``probe_interval_s`` and closes the breaker on the first success."""

    failures: int = Field(default=3, ge=1)
    probe_interval_s: float = Field(default=2.0, gt=0)
    probe_timeout_s: float = Field(default=2.0, gt=0)


class EngineSettings(BaseModel):
    mode: Literal["local", "remote"] = "local"
    remote_url: str | None = None
    remote_model: str | None = Field(default=None, description="served model name; None: first")
    remote_timeout_s: float = Field(default=5.0, gt=0)
    vllm: VllmOptions = Field(default_factory=VllmOptions)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)

    @model_validator(mode="after")
    def _remote_needs_url(self) -> EngineSettings:
        if self.mode == "remote" and not self.remote_url:
            raise ValueError("engine.mode=remote needs engine.remote_url")
        return self


class RecommendSettings(BaseModel):
    default_budget_ms: int = Field(default=250, ge=1)
    max_budget_ms: int = Field(default=2000, ge=1)
    max_k: int = Field(default=100, ge=1)
    max_prefixes: int = Field(default=32, ge=1, le=256, description="M prefixes used online")
    fusion: FusionWeights | None = Field(
        default=None,
        description="weights of the fused online score; None: the model directory's "
        "serving.json (learned on the validation split by `thinkahead tune-blend`), else the "
        "decoder alone",
    )
    covisit_candidates: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LIST_ITEMS,
        description="co-visitation neighbours of the fresh history added to the candidates; "
        "None: serving.json",
    )
    affinity_candidates: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LIST_ITEMS,
        description="the user's best items under the item-level model (stored by the worker) "
        "added to the candidates; None: serving.json",
    )
    covisit_cache_items: int = Field(
        default=100_000,
        ge=0,
        description="items whose co-visitation neighbours are cached in-process (per snapshot)",
    )
    # the scoring's own descriptions: one wording for the setting, the job and the flags
    reuse_snapshot_b: bool = Field(default=True, description=_describe("reuse_snapshot_b"))
    reuse_snapshot_c: bool = Field(default=True, description=_describe("reuse_snapshot_c"))
    fresh_path: Literal["auto", "engine", "rerank"] = Field(
        default="auto",
        description="after fresh events (no re-thought entry yet): 'engine' scores the "
        "candidates in one engine round; 'rerank' re-ranks the entry's stored answer for the "
        "fresh history without one (with the fresh item-level scores when fresh_item_model "
        "is on and the model has items/); 'auto' re-ranks when the service encodes the fresh "
        "history (on Beauty validation that answer keeps 105% of the engine round's NDCG@10: "
        "benchmarks/beauty/fresh-paths.md), else takes the round unless the rounds in flight "
        "say it would not end within the budget or within fresh_round_target_ms",
    )
    fresh_round_target_ms: float | None = Field(
        default=100.0,
        gt=0,
        description="auto: an engine round after fresh events is taken only when it would end "
        "within this long (a lone round, the median of the last ones, x the rounds in flight "
        "and this one); otherwise the stored answer is re-ranked without one. On an idle CPU "
        "engine a round fits; under load, where contention slows every round, fresh users are "
        "re-ranked; on a GPU many rounds fit. None: the budget alone decides",
    )
    fresh_item_model: bool = Field(
        default=True,
        description="after fresh events, the no-engine answer encodes the fresh history with the "
        "model directory's item-level model (its items/), in-process on one thread: about 1 ms "
        "and items x dim x 4 bytes of memory (3.1 MB for Beauty); off: it re-ranks with the "
        "item-level scores the worker stored for the history before the events",
    )
    full_decode_beam: int = Field(default=20, ge=1)
    max_list_items: int = Field(default=MAX_LIST_ITEMS, ge=1, le=MAX_LIST_ITEMS)
    max_in_flight: int = Field(default=64, ge=1)
    exclude_history: bool = True

    def scoring(self, serving: ServingConfig) -> ScoringSettings:
        """The think-ahead scoring this service runs: the model's serving.json with these
        settings' overrides on top."""
        overrides: dict[str, Any] = {
            "prefixes": self.max_prefixes,
            "exclude_history": self.exclude_history,
            "reuse_snapshot_b": self.reuse_snapshot_b,
            "reuse_snapshot_c": self.reuse_snapshot_c,
        }
        learned = {
            "weights": self.fusion,
            "covisit_candidates": self.covisit_candidates,
            "affinity_candidates": self.affinity_candidates,
        }
        overrides |= {name: v for name, v in learned.items() if v is not None}
        return serving.scoring(**overrides)

    @model_validator(mode="after")
    def _budgets(self) -> RecommendSettings:
        if self.default_budget_ms > self.max_budget_ms:
            raise ValueError("default_budget_ms exceeds max_budget_ms")
        return self


class AuthSettings(BaseModel):
    keys_file: Path | None = Field(
        default=None,
        description="JSON keys file ({'keys': [{'name', 'sha256', 'scopes', 'rate_per_s', "
        "'burst'}]}); None: no authentication, allowed on loopback binds only",
    )
    reload_s: float = Field(default=1.0, gt=0, description="how often the file is re-checked")
    insecure: bool = Field(
        default=False, description="serve without keys on a non-loopback bind (--insecure)"
    )


class TlsSettings(BaseModel):
    """Server TLS for both transports; ``client_ca_file`` turns on mTLS (client certificates
    signed by that CA are required)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _pairs(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("tls.client_ca_file (mTLS) needs tls.cert_file and tls.key_file")
        return self  # the files are checked when the server starts (service.app)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="THINKAHEAD_", env_nested_delimiter="__", extra="forbid"
    )

    model_dir: Path
    catalog_dir: Path
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    drain_s: float = Field(default=10.0, ge=0)
    log_level: str = "info"
    max_body_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        description="request body cap (REST, refused with 413 before parsing) and gRPC max "
        "message size",
    )
    redis: RedisSettings = Field(default_factory=RedisSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    recommend: RecommendSettings = Field(default_factory=RecommendSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
