"""Everything a serving process holds, created on start and closed on stop (one lifespan)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from service import __version__
from service.catalog import Catalog
from service.config import Settings
from service.core import Recommender
from service.engine.base import Engine
from service.metrics import Metrics
from service.model import ModelInfo, load_model_info, load_serving_config
from service.snapshot import Keyspace
from service.snapshot_watch import SnapshotWatcher
from service.store import SnapshotStore, connect

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    catalog: Catalog
    model: ModelInfo
    engine: Engine
    store: SnapshotStore
    watcher: SnapshotWatcher
    core: Recommender
    metrics: Metrics
    draining: bool = False
    extra: dict[str, object] = field(default_factory=dict)

    async def readiness(self) -> dict[str, bool]:
        active = self.watcher.active
        checks = {
            "redis": await self.store.ping(),
            "engine": await self.engine.check_health(),
            "catalog_and_model": True,
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
    recommend = settings.recommend
    if recommend.offline_weight is None:
        weight = float(load_serving_config(settings.model_dir).get("offline_weight", 0.0))  # type: ignore[arg-type]
        recommend = recommend.model_copy(update={"offline_weight": weight})
    metrics = Metrics()
    metrics.build.info(
        {"version": __version__, "model_version": model.version, "catalog_version": catalog.version}
    )
    store = SnapshotStore(
        connect(settings.redis),
        Keyspace(settings.redis.prefix, settings.redis.history_prefix),
        settings.redis.history_cap,
    )
    engine = engine or make_engine(settings, model)
    watcher = SnapshotWatcher(
        store, catalog.version, model.version, settings.redis.snapshot_poll_s, metrics
    )
    core = Recommender(
        catalog,
        model,
        engine,
        store,
        watcher,
        recommend,
        metrics,
        settings.redis.max_snapshot_age_s,
    )
    try:
        await watcher.refresh()
        watcher.start()
        await _warm_up(core)
        log.info(
            "event=runtime_ready model=%s catalog=%s items=%d",
            model.version,
            catalog.version,
            len(catalog),
        )
        yield Runtime(settings, catalog, model, engine, store, watcher, core, metrics)
    finally:
        await watcher.stop()
        await engine.close()
        await store.close()


async def _warm_up(core: Recommender) -> None:
    """One full decode so the first real request does not pay for lazy engine setup."""
    from service.beam import BeamSearch, run_searches_async
    from service.constraint import Constraint

    search = BeamSearch(
        core.model.token_ids.history([]), core.model.token_ids, Constraint(core.catalog), 4
    )
    try:
        await run_searches_async([search], core.engine.score)
    except Exception as exc:  # a dead engine must not stop the process: readiness says so
        log.warning("event=warm_up_failed error=%s", exc)
