"""Everything a serving process holds, created on start and closed on stop (one lifespan)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from service import __version__
from service.access.admission import Admission
from service.access.auth import Authenticator, KeyStore
from service.access.gate import Gate
from service.access.ratelimit import RateLimiter
from service.config import Settings
from service.contracts.catalog import Catalog
from service.contracts.model import ModelInfo, load_model_info, load_serving_config
from service.contracts.snapshot import Keyspace
from service.core import Events, Recommender
from service.core.corrupt import CorruptValues
from service.core.fresh_items import FreshItems
from service.core.reads import Reads
from service.core.rounds import EngineRounds
from service.engine.base import Engine, ScoreRequest
from service.engine.breaker import BreakerState, CircuitBreaker
from service.metrics import Metrics
from service.storage.redis import connect
from service.storage.snapshot_watch import SnapshotWatcher
from service.storage.store import SnapshotStore

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    catalog: Catalog
    model: ModelInfo
    engine: Engine
    store: SnapshotStore
    watcher: SnapshotWatcher
    breaker: CircuitBreaker
    core: Recommender
    events: Events
    metrics: Metrics
    gate: Gate
    draining: bool = False

    def catalog_and_model_ok(self) -> bool:
        """The loaded artifacts agree with each other and with what serves: a non-empty catalog,
        the model built for it, the engine serving that model, and an active snapshot (if any)
        built for the same pair."""
        cat, model = self.catalog, self.model
        ok = (
            len(cat) > 0
            and model.manifest.catalog_version == cat.version
            and model.token_ids.codebook_size == cat.codebook_size
            and self.engine.model_version == model.version
        )
        manifest = self.watcher.active.manifest if self.watcher.active is not None else None
        if manifest is not None:
            ok = ok and (manifest.catalog_version, manifest.model_version) == (
                cat.version,
                model.version,
            )
        return ok

    async def readiness(self) -> dict[str, bool]:
        active = self.watcher.active
        checks = {
            "redis": await self.store.ping(),
            "engine": await self.engine.check_health(),
            "engine_breaker": self.breaker.state is not BreakerState.OPEN,
            "catalog_and_model": self.catalog_and_model_ok(),
            "snapshot": active is not None and active.problem is None,
            "accepting": not self.draining,
        }
        self.metrics.ready.set(1 if all(checks.values()) else 0)
        return checks


def make_engine(settings: Settings, model: ModelInfo) -> Engine:
    engine = settings.engine
    if engine.mode == "remote":
        from service.engine.remote import RemoteVllmEngine

        assert engine.remote_url is not None
        return RemoteVllmEngine(
            engine.remote_url, model.version, engine.remote_model, engine.remote_timeout_s
        )
    from service.engine.vllm_engine import VllmAsyncEngine

    return VllmAsyncEngine(model.path, engine.vllm, model.version)


@asynccontextmanager
async def open_runtime(settings: Settings, engine: Engine | None = None) -> AsyncIterator[Runtime]:
    catalog = Catalog.load(settings.catalog_dir)
    model = load_model_info(settings.model_dir, catalog)
    scoring = settings.recommend.scoring(load_serving_config(settings.model_dir))
    metrics = Metrics()
    metrics.build.info(
        {"version": __version__, "model_version": model.version, "catalog_version": catalog.version}
    )
    store = SnapshotStore(
        connect(settings.redis),
        Keyspace(settings.redis.prefix, settings.redis.history_prefix),
        settings.redis.history_cap,
        settings.redis.idempotency_window_s,
        settings.redis.events_maxlen,
        writer=connect(settings.redis, settings.redis.write_timeout_ms),
    )
    keys = settings.auth.keys_file
    auth = Authenticator(KeyStore(keys, settings.auth.reload_s) if keys is not None else None)
    engine = engine or make_engine(settings, model)
    breaker = _breaker(settings, metrics)
    watcher = SnapshotWatcher(
        store, catalog.version, model.version, settings.redis.snapshot_poll_s, metrics
    )
    recommend = settings.recommend
    fresh_items = (
        FreshItems.load(settings.model_dir, catalog) if recommend.fresh_item_model else None
    )
    reads = Reads(store, watcher, catalog, CorruptValues(metrics), recommend.covisit_cache_items)
    core = Recommender(
        catalog,
        model,
        reads,
        EngineRounds(engine, breaker, metrics),
        recommend,
        scoring,
        metrics,
        settings.redis.max_snapshot_age_s,
        fresh_items,
    )
    events = Events(catalog, store, metrics, recommend.max_list_items)
    admission = Admission(recommend.max_in_flight, metrics.in_flight)
    gate = Gate(auth, RateLimiter(), admission, metrics)
    probe_task: asyncio.Task[None] | None = None
    try:
        await watcher.refresh()
        watcher.start()
        if not await _warm_up(catalog, model, engine):
            breaker.trip()  # the probe brings the engine in once it answers
        probes = settings.engine.breaker
        probe_task = asyncio.create_task(
            breaker.run_probes(
                lambda: _probe(catalog, model, engine),
                probes.probe_interval_s,
                probes.probe_timeout_s,
            ),
            name="engine-probe",
        )
        log.info(
            "event=runtime_ready model=%s catalog=%s items=%d auth=%s fresh_items=%s",
            model.version,
            catalog.version,
            len(catalog),
            "keys" if auth.enabled else "open",
            fresh_items.version if fresh_items is not None else "off",
        )
        yield Runtime(
            settings, catalog, model, engine, store, watcher, breaker, core, events, metrics, gate
        )
    finally:
        if probe_task is not None:
            probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe_task
        await watcher.stop()
        await engine.close()
        await store.close()
        if fresh_items is not None:
            fresh_items.close()


def _breaker(settings: Settings, metrics: Metrics) -> CircuitBreaker:
    def on_change(state: BreakerState) -> None:
        metrics.breaker_state.set(int(state))
        metrics.breaker_transitions.labels(state.name.lower()).inc()

    metrics.breaker_state.set(int(BreakerState.CLOSED))
    return CircuitBreaker(settings.engine.breaker.failures, on_change)


async def _probe(catalog: Catalog, model: ModelInfo, engine: Engine) -> None:
    """One engine step on the empty history: cheap, and proves the engine answers (a health
    endpoint can be up while generation is broken)."""
    ids = model.token_ids
    allowed = tuple(ids.level_ids("a", catalog.valid_a[:8]))
    await engine.score([ScoreRequest(tuple(ids.history([])), allowed, top_n=1)])


async def _warm_up(catalog: Catalog, model: ModelInfo, engine: Engine) -> bool:
    """One full decode so the first real request does not pay for lazy engine setup."""
    from service.contracts.beam import BeamSearch, run_searches_async
    from service.contracts.constraint import Constraint

    search = BeamSearch(model.token_ids.history([]), model.token_ids, Constraint(catalog), 4)
    try:
        await run_searches_async([search], engine.score)
    except Exception as exc:  # a dead engine must not stop the process: readiness says so
        log.warning("event=warm_up_failed error=%s", exc)
        return False
    return True
