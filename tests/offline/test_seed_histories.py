"""Seeded histories are the events the snapshot was computed from: ``holdout_last`` applies."""

from __future__ import annotations

from pathlib import Path

import redis
from typer.testing import CliRunner

from offline.cli import app
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


def test_history_load_command_replaces_lists_with_the_latest_events(
    redis_url: str, tmp_path: Path
) -> None:
    csv = tmp_path / "interactions.csv"
    rows = [f"u1,i{t},{t}" for t in range(6)] + [f"u2,i{9 - t},{t}" for t in range(3)]
    csv.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    client = redis.Redis.from_url(redis_url)
    client.rpush(Keyspace().history("u1"), "stale-item")
    args = ["history", "load", "--interactions", str(csv), "--redis", redis_url]
    result = CliRunner().invoke(app, [*args, "--holdout-last", "1", "--cap", "3"])
    assert result.exit_code == 0, result.output
    assert "histories loaded: 2" in result.output
    newest_first = [v.decode() for v in client.lrange(Keyspace().history("u1"), 0, -1)]
    assert newest_first == ["i4", "i3", "i2"]  # i5 held out, capped at 3, stale item gone
    assert [v.decode() for v in client.lrange(Keyspace().history("u2"), 0, -1)] == ["i8", "i9"]
