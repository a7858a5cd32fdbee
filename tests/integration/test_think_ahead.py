"""The think-ahead worker against a real redis-server and real vLLM (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from offline.thinkahead.publish import PublishError
from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.model import load_model_info
from service.contracts.snapshot import Keyspace, UserPrefixes

pytestmark = pytest.mark.vllm
KEYS = Keyspace("ta")


def run_job(world, url, engine, **job):  # type: ignore[no-untyped-def]
    run = ThinkAheadRun(
        world.model_dir, world.catalog_dir, world.interactions_csv, url, ThinkAheadJob(**job)
    )
    return run, run.run(lambda: engine, progress=False)


def test_snapshot_holds_every_user_with_valid_ranked_prefixes(tiny_world, redis_url, batch_engine):  # type: ignore[no-untyped-def]
    run, summary = run_job(tiny_world, redis_url, batch_engine, prefixes=8, beam=8, ttl_s=600)
    r = redis.Redis.from_url(redis_url)
    sid = r.get(KEYS.current).decode()
    assert sid == summary.snapshot_id
    assert summary.written == len(run.plan.users) > 0
    manifest = json.loads(r.get(KEYS.manifest(sid)))
    assert manifest["parameters"]["status"] == "complete"
    assert manifest["num_users"] == summary.written
    catalog = Catalog.load(tiny_world.catalog_dir)
    model = load_model_info(tiny_world.model_dir, catalog)
    for user, history in zip(run.plan.users[:50], run.plan.histories[:50], strict=True):
        value = UserPrefixes.decode(r.get(KEYS.user(sid, user)))
        assert value.model_version == model.version
        assert value.catalog_version == catalog.version
        assert len(value.prefixes) == 8
        scores = [p.score for p in value.prefixes]
        assert scores == sorted(scores, reverse=True) and scores[0] <= 0
        constraint = Constraint(catalog, history)
        assert all(constraint.has_prefix(p.a, p.b) for p in value.prefixes)
        ttl = r.ttl(KEYS.user(sid, user))
        assert 0 < ttl <= 600
    assert r.get(KEYS.pending) is None


def test_prefixes_match_a_direct_two_token_beam_search(tiny_world, redis_url, batch_engine):  # type: ignore[no-untyped-def]
    from service.contracts.beam import BeamSearch, run_searches

    run, summary = run_job(tiny_world, redis_url, batch_engine, prefixes=4, beam=4)
    r = redis.Redis.from_url(redis_url)
    catalog = run.catalog
    user, history = run.plan.users[3], run.plan.histories[3]
    search = BeamSearch(
        run.model.token_ids.history(history),
        run.model.token_ids,
        Constraint(catalog, history),
        4,
        depth=2,
    )
    run_searches([search], batch_engine.score_batch)
    value = UserPrefixes.decode(r.get(KEYS.user(summary.snapshot_id, user)))
    assert [(p.a, p.b) for p in value.prefixes] == [b.code for b in search.beams]


def test_second_run_flips_current_and_retires_the_first(tiny_world, redis_url, batch_engine):  # type: ignore[no-untyped-def]
    _, first = run_job(tiny_world, redis_url, batch_engine, prefixes=4, beam=4)
    time.sleep(1.1)  # snapshot ids have second resolution
    _, second = run_job(tiny_world, redis_url, batch_engine, prefixes=6, beam=6, grace_s=0)
    r = redis.Redis.from_url(redis_url)
    assert second.snapshot_id != first.snapshot_id
    assert r.get(KEYS.current).decode() == second.snapshot_id
    assert second.previous_snapshot == first.snapshot_id
    assert first.snapshot_id in second.cleaned
    assert list(r.scan_iter(match=KEYS.user_pattern(first.snapshot_id))) == []


def test_users_with_unknown_items_are_skipped_and_counted(
    tiny_world, redis_url, batch_engine, tmp_path
):  # type: ignore[no-untyped-def]
    inter = tmp_path / "inter.csv"
    text = tiny_world.interactions_csv.read_text()
    inter.write_text(text + "ghost,999999,0\nghost,1,1\n")
    run = ThinkAheadRun(
        tiny_world.model_dir,
        tiny_world.catalog_dir,
        inter,
        redis_url,
        ThinkAheadJob(prefixes=4, beam=4),
    )
    summary = run.run(lambda: batch_engine, progress=False)
    assert summary.skipped_unknown == 1
    r = redis.Redis.from_url(redis_url)
    assert r.get(KEYS.user(summary.snapshot_id, "ghost")) is None


def test_redis_unavailable_fails_clearly_and_leaves_current(
    tiny_world, redis_url, batch_engine, redis_server
):  # type: ignore[no-untyped-def]
    _, first = run_job(tiny_world, redis_url, batch_engine, prefixes=4, beam=4)
    dead = "redis://127.0.0.1:1/0"
    with pytest.raises(PublishError, match="unreachable"):
        ThinkAheadRun(
            tiny_world.model_dir,
            tiny_world.catalog_dir,
            tiny_world.interactions_csv,
            dead,
            ThinkAheadJob(prefixes=4, beam=4),
        ).run(lambda: batch_engine, progress=False)
    r = redis.Redis.from_url(redis_url)
    assert r.get(KEYS.current).decode() == first.snapshot_id


def test_killed_run_resumes_without_losing_or_duplicating_users(
    tiny_world, redis_url, batch_engine
):  # type: ignore[no-untyped-def]
    args = [
        sys.executable,
        "-m",
        "offline.cli",
        "think-ahead",
        *tiny_world.cli_args(),
        "--redis",
        redis_url,
        "--prefixes",
        "4",
        "--beam",
        "4",
        "--shard-size",
        "20",
        "--batch-users",
        "10",
        "--no-progress",
    ]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 300
    sid = None
    while time.monotonic() < deadline and proc.poll() is None:
        raw = r.get(KEYS.pending)
        if raw is not None and r.scard(KEYS.done_shards(raw.decode())) >= 3:
            sid = raw.decode()
            break
        time.sleep(0.05)
    assert sid is not None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert r.get(KEYS.current) is None  # nothing published by the killed run
    done_before = r.scard(KEYS.done_shards(sid))

    run, summary = run_job(
        tiny_world, redis_url, batch_engine, prefixes=4, beam=4, shard_size=20, batch_users=10
    )
    assert summary.snapshot_id == sid
    assert summary.resumed_shards >= done_before >= 3
    assert r.get(KEYS.current).decode() == sid
    keys = list(r.scan_iter(match=f"ta:snap:{sid}:u:*"))
    assert len(keys) == len(run.plan.users) == summary.written


def test_cli_publishes_with_the_torch_engine_and_sizes_the_snapshot(tiny_world, redis_url):  # type: ignore[no-untyped-def]
    """The plain-PyTorch engine (a CPU box's nightly run) publishes a complete snapshot, and
    ``snapshot-size`` prices it per user with the shared table apart."""
    base = [sys.executable, "-m", "offline.cli"]
    publish = subprocess.run(
        [*base, "think-ahead", *tiny_world.cli_args(), "--redis", redis_url, "--prefixes", "4",
         "--engine", "torch", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert publish.returncode == 0, publish.stderr[-2000:]
    summary = json.loads(publish.stdout[publish.stdout.index("{") :])
    r = redis.Redis.from_url(redis_url)
    assert r.get(KEYS.current).decode() == summary["snapshot_id"]
    sized = subprocess.run(
        [*base, "snapshot-size", "--redis", redis_url], capture_output=True, text=True, timeout=60
    )
    assert sized.returncode == 0, sized.stderr[-2000:]
    size = json.loads(sized.stdout)
    assert size["snapshot_id"] == summary["snapshot_id"]
    assert size["users"] == size["user_value_keys"] == summary["written"] > 0
    stored = sum(
        r.memory_usage(k, samples=0) for k in r.scan_iter(match=KEYS.user(size["snapshot_id"], "*"))
    )
    assert size["user_values_per_user"] == round(stored / summary["written"])
    assert size["covisit_table_keys"] > 0 and size["covisit_table_bytes"] > 0


def test_cli_refuses_ray_with_the_torch_engine(tiny_world, redis_url):  # type: ignore[no-untyped-def]
    got = subprocess.run(
        [sys.executable, "-m", "offline.cli", "think-ahead", *tiny_world.cli_args(),
         "--redis", redis_url, "--ray", "--engine", "torch", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert got.returncode != 0 and "--ray runs one vLLM engine per actor" in got.stderr
