"""The same think-ahead job on Ray: actors over user shards, each with its own vLLM engine.

The driver resolves the snapshot (new or resumed) and publishes it; actors compute and write
shards and mark them done, exactly as the in-process loop does, so a crashed actor's shard is
simply redone by the next run. On a cluster: ``ray start --head`` on one node, ``ray start
--address=HEAD:6379`` on the GPU nodes, then ``thinkahead think-ahead --ray --ray-address auto
--ray-workers N`` (one actor per GPU: ``num_gpus=1`` is requested when CUDA is present).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from offline.thinkahead.entries import CovisitSource
from offline.thinkahead.publish import SnapshotWriter, connect_sync
from offline.thinkahead.worker import (
    Summary,
    ThinkAheadJob,
    ThinkAheadRun,
    item_source,
    local_engine_factory,
    make_thinker,
    process_shard,
    reasoner_for,
    scoring_settings,
)
from service.contracts.catalog import Catalog
from service.contracts.model import load_model_info
from service.contracts.snapshot import Keyspace


class ShardWorker:
    """One engine per actor, loaded once, reused for every shard it is given."""

    def __init__(
        self, model_dir: str, catalog_dir: str, redis_url: str, job: dict[str, Any], cluster: bool
    ) -> None:
        catalog = Catalog.load(catalog_dir)
        model = load_model_info(model_dir, catalog)
        self.job = ThinkAheadJob(**job)
        self.thinker = make_thinker(
            local_engine_factory(Path(model_dir))(),
            model,
            catalog,
            self.job,
            scoring_settings(Path(model_dir), self.job),
            CovisitSource.load(Path(catalog_dir), catalog),
            item_source(Path(model_dir), catalog, self.job),
            reasoner_for(model, catalog, Path(catalog_dir), self.job.paths),
        )
        self.writer = SnapshotWriter(
            connect_sync(redis_url, cluster=cluster),
            Keyspace(self.job.key_prefix, self.job.history_prefix),
            self.job.ttl_s,
        )

    def process(
        self,
        snapshot_id: str,
        index: int,
        users: list[str],
        histories: list[list[tuple[int, int, int]]],
    ) -> int:
        values = process_shard(self.thinker, self.job, users, histories, lambda n: None)
        self.writer.write_shard(snapshot_id, index, values)
        return len(users)


def run_on_ray(
    run: ThinkAheadRun,
    workers: int = 1,
    address: str | None = None,
    progress: bool = True,
    local_mode: bool = False,
) -> Summary:
    import ray
    from ray.util import ActorPool

    if not ray.is_initialized():
        ray.init(
            address=address,
            local_mode=local_mode,
            include_dashboard=False,
            ignore_reinit_error=True,
            log_to_driver=False,
        )
    started = time.monotonic()
    manifest, done = run.open_snapshot()
    todo = [s for s in run.shards if s[0] not in done]
    gpus = 1 if _has_cuda() else 0
    actor_cls = ray.remote(num_gpus=gpus)(ShardWorker)
    actors = (
        [
            actor_cls.remote(
                str(run.model_dir),
                str(run.catalog_dir),
                run.redis_url,
                run.job.model_dump(),
                run.cluster,
            )
            for _ in range(max(1, min(workers, len(todo))))
        ]
        if todo
        else []
    )
    bar = tqdm(
        total=sum(len(s[1]) for s in todo),
        desc="think-ahead (ray)",
        unit="user",
        disable=not progress,
    )
    if actors:
        pool = ActorPool(actors)
        jobs = pool.map_unordered(
            lambda actor, shard: actor.process.remote(manifest.snapshot_id, *shard), todo
        )
        for n in jobs:
            bar.update(n)
    bar.close()
    return run.finish(manifest, started, resumed=len(done))


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
