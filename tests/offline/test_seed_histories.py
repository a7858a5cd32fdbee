"""Seeded histories are the events the snapshot was computed from: ``holdout_last`` applies."""

from __future__ import annotations

import redis

from offline.data import read_interactions
from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
from service.contracts.snapshot import Keyspace


def test_seed_history_honours_holdout_last(tiny_world, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    run = ThinkAheadRun(
        tiny_world.model_dir,
        tiny_world.catalog_dir,
        tiny_world.interactions_csv,
        redis_url,
        ThinkAheadJob(prefixes=4, beam=4, holdout_last=2),
    )
    seqs = read_interactions(tiny_world.interactions_csv)
    assert run.seed_histories(tiny_world.interactions_csv) == len(seqs)
    client = redis.Redis.from_url(redis_url)
    for user, items in list(zip(seqs.users, seqs.items, strict=True))[:20]:
        stored = [v.decode() for v in client.lrange(Keyspace().history(user), 0, -1)]
        assert stored[::-1] == items[:-2][-50:]  # newest first in Redis
