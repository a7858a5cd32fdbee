"""Redis Cluster: the think-ahead worker and the service's store against a real 3-master cluster
of local redis-server processes (``tests.helpers.start_redis_cluster``).

Plain per-node clients check where keys really live; the code under test only ever sees the
cluster client built by ``connect_sync(..., cluster=True)`` or ``service.storage.store.connect``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from offline.thinkahead.publish import PublishError, SnapshotWriter, connect_sync
from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
from service.config import RedisSettings
from service.contracts.manifest import SnapshotManifest
from service.contracts.snapshot import Keyspace, Prefix, UserPrefixes, history_digest
from service.errors import RedisUnavailable
from service.metrics import Metrics
from service.storage.redis import connect
from service.storage.snapshot_watch import SnapshotWatcher
from service.storage.store import SnapshotStore
from tests.helpers import RedisClusterProcess, free_port, start_redis_cluster

KEYS = Keyspace("ta")
USERS = [f"user-{i}" for i in range(200)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    started = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield started
    started.stop()


@pytest.fixture
def cluster_url(cluster: RedisClusterProcess) -> Iterator[str]:
    """The cluster, flushed on every node before and after the test."""
    cluster.flush()
    yield cluster.url
    cluster.flush()


def keys_per_node(cluster: RedisClusterProcess, pattern: str) -> list[int]:
    counts = []
    for client in cluster.node_clients():
        counts.append(sum(1 for _ in client.scan_iter(match=pattern, count=1000)))
        client.close()
    return counts


def eval_calls(cluster: RedisClusterProcess) -> list[int]:
    """EVAL commands each node has executed so far (INFO commandstats)."""
    calls = []
    for client in cluster.node_clients():
        stats = client.info("commandstats")
        calls.append(int(stats.get("cmdstat_eval", {}).get("calls", 0)))
        client.close()
    return calls


def value(model: str = "m1", catalog: str = "c1", n: int = 3) -> UserPrefixes:
    prefixes = tuple(Prefix(i, i + 1, -0.5 * (i + 1)) for i in range(n))
    return UserPrefixes(
        model, catalog, time.time(), prefixes, history_digest=history_digest([(1, 2, 3), (2, 3, 4)])
    )


def publish_synthetic(
    url: str, snapshot_id: str, users: list[str], model: str = "m1", catalog: str = "c1"
) -> SnapshotWriter:
    """A complete snapshot written the worker's way (begin, shards, publish), no engine."""
    writer = SnapshotWriter(connect_sync(url, cluster=True), KEYS, ttl_s=600)
    manifest = SnapshotManifest(
        snapshot_id=snapshot_id,
        model_version=model,
        catalog_version=catalog,
        parameters={"status": "building"},
    )
    writer.begin(manifest)
    half = len(users) // 2
    writer.write_shard(snapshot_id, 0, [(u, value(model, catalog)) for u in users[:half]])
    writer.write_shard(snapshot_id, 1, [(u, value(model, catalog)) for u in users[half:]])
    writer.publish(
        manifest.model_copy(update={"num_users": len(users), "parameters": {"status": "complete"}})
    )
    return writer


def run_job(world, url, engine, **job):  # type: ignore[no-untyped-def]
    run = ThinkAheadRun(
        world.model_dir,
        world.catalog_dir,
        world.interactions_csv,
        url,
        ThinkAheadJob(**job),
        cluster=True,
    )
    return run, run.run(lambda: engine, progress=False)


# --- helper sanity -------------------------------------------------------------------------


def test_cluster_helper_starts_three_masters_covering_every_slot(cluster, cluster_url):  # type: ignore[no-untyped-def]
    assert len(set(cluster.ports)) == 3
    for client in cluster.node_clients():
        info = client.execute_command("CLUSTER", "INFO").decode()
        assert "cluster_state:ok" in info
        assert "cluster_slots_assigned:16384" in info
        assert "cluster_size:3" in info
        client.close()


def test_user_keys_share_a_slot_and_users_spread_over_nodes(cluster, cluster_url):  # type: ignore[no-untyped-def]
    client = RedisCluster.from_url(cluster_url)
    for user in USERS[:50]:
        assert client.keyslot(KEYS.user("snap-1", user)) == client.keyslot(KEYS.history(user))
    nodes = {client.get_node_from_key(KEYS.history(u)).name for u in USERS}
    assert len(nodes) == 3
    client.close()


# --- the worker's writer, no engine ----------------------------------------------------------


def test_writer_publishes_and_cleans_a_snapshot_on_every_primary(cluster, cluster_url):  # type: ignore[no-untyped-def]
    publish_synthetic(cluster_url, "snap-a", USERS)
    per_node = keys_per_node(cluster, "ta:snap:snap-a:u:*")
    assert sum(per_node) == len(USERS)
    assert sum(1 for n in per_node if n > 0) > 1, per_node
    client = RedisCluster.from_url(cluster_url)
    assert client.get(KEYS.current) == b"snap-a"
    assert client.get(KEYS.pending) is None

    writer = publish_synthetic(cluster_url, "snap-b", USERS[:20])
    assert client.get(KEYS.current) == b"snap-b"
    assert writer.cleanup(grace_s=0) == ["snap-a"]
    assert keys_per_node(cluster, "ta:snap:snap-a:*") == [0, 0, 0]  # values, manifest, done
    assert sum(keys_per_node(cluster, "ta:snap:snap-b:u:*")) == 20
    assert client.zcard(KEYS.retired) == 0
    client.close()


def test_writer_seeds_histories_on_the_cluster(cluster, cluster_url):  # type: ignore[no-untyped-def]
    writer = SnapshotWriter(connect_sync(cluster_url, cluster=True), KEYS, ttl_s=600)
    histories = [(u, [f"i{j}" for j in range(i % 7 + 1)]) for i, u in enumerate(USERS)]
    assert writer.seed_histories(histories, cap=5) == len(USERS)
    assert writer.seed_histories(histories[:3], cap=5) == 3  # replaces, does not append
    per_node = keys_per_node(cluster, "ta:hist:*")
    assert sum(per_node) == len(USERS) and min(per_node) > 0, per_node
    client = RedisCluster.from_url(cluster_url)
    for user, items in histories:
        assert client.lrange(KEYS.history(user), 0, -1) == [i.encode() for i in items[-5:][::-1]]
    client.close()


def test_writer_on_an_unreachable_cluster_raises_publish_error() -> None:
    """The cluster client connects when built, so the error comes from ``connect_sync``."""
    with pytest.raises(PublishError, match="unreachable"):
        url = f"redis://127.0.0.1:{free_port()}"
        SnapshotWriter(connect_sync(url, cluster=True, retries=1), KEYS, 600).ping()


# --- the service's async store and snapshot watcher -----------------------------------------


def cluster_settings(url: str, **kw: object) -> RedisSettings:
    base: dict[str, object] = {"url": url, "cluster": True, "history_cap": 5}
    base.update(kw)
    return RedisSettings.model_validate(base)


def make_store(settings: RedisSettings) -> SnapshotStore:
    return SnapshotStore(connect(settings), Keyspace(settings.prefix), settings.history_cap)


async def test_store_reads_value_and_history_in_one_pipeline(cluster, cluster_url):  # type: ignore[no-untyped-def]
    publish_synthetic(cluster_url, "snap-s", USERS)
    writer = SnapshotWriter(connect_sync(cluster_url, cluster=True), KEYS, ttl_s=600)
    writer.seed_histories([(u, ["a", "b", "c"]) for u in USERS], cap=50)
    store = make_store(cluster_settings(cluster_url))
    try:
        pipelines = []
        original = store.client.pipeline

        def counting_pipeline(*args, **kwargs):  # type: ignore[no-untyped-def]
            pipe = original(*args, **kwargs)
            pipelines.append(pipe)
            return pipe

        store.client.pipeline = counting_pipeline
        for user in USERS[:40]:  # users on every node
            read = await store.read_user("snap-s", user)
            assert read.snapshot_value is not None
            decoded = UserPrefixes.decode(read.snapshot_value)
            assert decoded.model_version == "m1" and len(decoded.prefixes) == 3
            assert read.history == ["a", "b", "c"]
        assert len(pipelines) == 40

        missing = await store.read_user("snap-s", "nobody")
        assert missing.snapshot_value is None and missing.history == []
        no_snapshot = await store.read_user(None, USERS[0])
        assert no_snapshot.snapshot_value is None and no_snapshot.history == ["a", "b", "c"]
    finally:
        await store.close()


async def test_store_appends_history_atomically_on_the_users_node(cluster, cluster_url):  # type: ignore[no-untyped-def]
    """The first command of a fresh client is an append (what broke redis-py's transactional
    cluster pipeline); each append is one EVAL on the node owning the user's slot."""
    store = make_store(cluster_settings(cluster_url, history_cap=5))
    try:
        for user in USERS[:6]:  # users on more than one node
            before = eval_calls(cluster)
            assert await store.append_history(user, ["x1", "x2", "x3"]) == 3
            assert await store.append_history(user, ["x4", "x5", "x6", "x7"]) == 5  # capped
            after = eval_calls(cluster)
            owners = [i for i, n in enumerate(keys_per_node(cluster, KEYS.history(user))) if n]
            assert len(owners) == 1
            deltas = [a - b for a, b in zip(after, before, strict=True)]
            assert deltas[owners[0]] == 2 and sum(deltas) == 2, deltas
            read = await store.read_user(None, user)
            assert read.history == ["x3", "x4", "x5", "x6", "x7"]  # oldest first
    finally:
        await store.close()


async def test_store_current_snapshot_and_ping(cluster, cluster_url):  # type: ignore[no-untyped-def]
    store = make_store(cluster_settings(cluster_url))
    try:
        assert await store.ping() is True
        assert await store.current_snapshot() is None
        publish_synthetic(cluster_url, "snap-c", USERS[:10])
        found = await store.current_snapshot()
        assert found is not None
        sid, manifest = found
        assert sid == "snap-c"
        assert manifest is not None and manifest.parameters["status"] == "complete"
        assert manifest.num_users == 10
    finally:
        await store.close()


async def test_store_on_an_unreachable_cluster_is_redis_unavailable() -> None:
    store = make_store(cluster_settings(f"redis://127.0.0.1:{free_port()}"))
    try:
        assert await store.ping() is False
        with pytest.raises(RedisUnavailable):
            await store.read_user("snap", "u1")
        with pytest.raises(RedisUnavailable):
            await store.current_snapshot()
        with pytest.raises(RedisUnavailable):
            await store.append_history("u1", ["a"])
    finally:
        await store.close()


async def test_a_dead_primary_fails_its_users_fast_and_spares_the_others(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Own cluster (a node is killed). Users whose slot lives on the dead primary get
    RedisUnavailable at once (no driver retries: the request deadline decides), the others
    are served, and the same client recovers once the node is back."""
    own = start_redis_cluster(tmp_path / "cluster")
    store = make_store(cluster_settings(own.url))
    try:
        sync = RedisCluster.from_url(own.url)
        dead_port = own.ports[1]
        on_dead = [u for u in USERS if sync.get_node_from_key(KEYS.history(u)).port == dead_port]
        alive = [u for u in USERS if u not in on_dead]
        sync.close()
        assert on_dead and alive
        for user in USERS[:30]:
            await store.append_history(user, ["a", "b"])

        own.nodes[1].stop(kill=True)
        for user in on_dead[:5]:
            started = time.monotonic()
            with pytest.raises(RedisUnavailable):
                await store.read_user("snap", user)
            with pytest.raises(RedisUnavailable):
                await store.append_history(user, ["c"])
            assert time.monotonic() - started < 1.0
        for user in [u for u in alive if u in USERS[:30]][:5]:
            assert (await store.read_user("snap", user)).history == ["a", "b"]

        own.restart_node(1)  # back, empty (no persistence)
        assert (await store.read_user("snap", on_dead[0])).history == []
        assert await store.append_history(on_dead[0], ["c"]) == 1
    finally:
        await store.close()
        own.stop()


async def test_snapshot_watcher_follows_current_on_the_cluster(cluster, cluster_url):  # type: ignore[no-untyped-def]
    store = make_store(cluster_settings(cluster_url))
    metrics = Metrics()
    watcher = SnapshotWatcher(store, "c1", "m1", poll_s=0.05, metrics=metrics)
    try:
        await watcher.refresh()
        assert watcher.redis_ok and watcher.active is None

        publish_synthetic(cluster_url, "snap-w1", USERS[:10])
        await watcher.refresh()
        assert watcher.active is not None
        assert watcher.active.snapshot_id == "snap-w1" and watcher.active.problem is None

        watcher.start()  # the polling loop picks up a flip without a restart
        publish_synthetic(cluster_url, "snap-w2", USERS[:10], catalog="other")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and watcher.active.snapshot_id != "snap-w2":
            import asyncio

            await asyncio.sleep(0.02)
        assert watcher.active.snapshot_id == "snap-w2"
        assert watcher.active.problem == "version_mismatch"
        assert metrics.snapshot_flips._value.get() == 2
    finally:
        await watcher.stop()
        await store.close()


# --- the think-ahead worker with the real engine ---------------------------------------------


@pytest.mark.vllm
async def test_worker_snapshot_on_the_cluster_is_complete_and_read_by_the_store(
    tiny_world, batch_engine, cluster, cluster_url
):  # type: ignore[no-untyped-def]
    run, summary = run_job(tiny_world, cluster_url, batch_engine, prefixes=4, beam=4, ttl_s=600)
    sid = summary.snapshot_id
    client = RedisCluster.from_url(cluster_url)
    try:
        assert client.get(KEYS.current).decode() == sid
        assert client.get(KEYS.pending) is None
        manifest = json.loads(client.get(KEYS.manifest(sid)))
        assert manifest["parameters"]["status"] == "complete"
        assert manifest["num_users"] == summary.written == len(run.plan.users) > 0

        per_node = keys_per_node(cluster, f"ta:snap:{sid}:u:*")
        assert sum(per_node) == summary.written
        assert sum(1 for n in per_node if n > 0) > 1, per_node

        pipe = client.pipeline(transaction=False)
        for user in run.plan.users:
            pipe.get(KEYS.user(sid, user))
            pipe.ttl(KEYS.user(sid, user))
        replies = pipe.execute()
        for user, raw, ttl in zip(run.plan.users, replies[::2], replies[1::2], strict=True):
            assert raw is not None, user
            decoded = UserPrefixes.decode(raw)
            assert decoded.model_version == run.model.version
            assert decoded.catalog_version == run.catalog.version
            assert len(decoded.prefixes) == 4
            assert 0 < ttl <= 600

        seeded = run.seed_histories(Path(tiny_world.interactions_csv), cap=50)
        assert seeded >= len(run.plan.users)
    finally:
        client.close()

    store = make_store(cluster_settings(cluster_url, history_cap=50))
    try:
        found = await store.current_snapshot()
        assert found is not None and found[0] == sid
        for user in run.plan.users[:30]:
            read = await store.read_user(sid, user)
            assert read.snapshot_value is not None
            assert UserPrefixes.decode(read.snapshot_value).prefixes
            assert read.history  # the interactions log, oldest first
    finally:
        await store.close()


@pytest.mark.vllm
def test_second_worker_run_retires_and_cleans_the_first_on_every_node(
    tiny_world, batch_engine, cluster, cluster_url
):  # type: ignore[no-untyped-def]
    _, first = run_job(tiny_world, cluster_url, batch_engine, prefixes=4, beam=4)
    first_keys = keys_per_node(cluster, f"ta:snap:{first.snapshot_id}:u:*")
    assert sum(1 for n in first_keys if n > 0) > 1, first_keys
    time.sleep(1.1)  # snapshot ids have second resolution
    _, second = run_job(tiny_world, cluster_url, batch_engine, prefixes=6, beam=6, grace_s=0)
    assert second.snapshot_id != first.snapshot_id
    assert second.previous_snapshot == first.snapshot_id
    assert second.cleaned == [first.snapshot_id]
    assert keys_per_node(cluster, f"ta:snap:{first.snapshot_id}:*") == [0, 0, 0]
    assert sum(keys_per_node(cluster, f"ta:snap:{second.snapshot_id}:u:*")) == second.written
    client = redis.cluster.RedisCluster.from_url(cluster_url)
    assert client.get(KEYS.current).decode() == second.snapshot_id
    client.close()
