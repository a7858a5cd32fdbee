"""Idempotent event appends in the store, against a real redis-server and a real 3-master Redis
Cluster: the idempotency record sits in the history's slot, check and append are one script,
concurrent retries append once, and the window expires."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from service.config import RedisSettings
from service.contracts.snapshot import Keyspace
from service.storage.redis import connect
from service.storage.store import SnapshotStore
from tests.helpers import RedisClusterProcess, RedisProcess, start_redis_cluster

KEYS = Keyspace("ta")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    started = start_redis_cluster(tmp_path_factory.mktemp("idem-cluster"))
    yield started
    started.stop()


def store_for(url: str, cluster: bool, window_s: float = 60.0) -> SnapshotStore:
    return SnapshotStore(connect(RedisSettings(url=url, cluster=cluster)), KEYS, 50, window_s)


async def _scenario(store: SnapshotStore, user: str) -> dict[str, Any]:
    try:
        first = await store.append_history_once(user, ["1", "2"], "key-1", "d1")
        again = await store.append_history_once(user, ["1", "2"], "key-1", "d1")
        other = await store.append_history_once(user, ["1", "2"], "key-1", "other-digest")
        retries = await asyncio.gather(
            *(store.append_history_once(user, ["3"], "key-2", "d2") for _ in range(20))
        )
        history = (await store.read_user(None, user)).history
    finally:
        await store.close()
    return {"first": first, "again": again, "other": other, "retries": retries, "hist": history}


def check(result: dict[str, Any]) -> None:
    assert result["first"] == (2, None)  # appended now
    assert result["again"] == (2, "d1")  # the first call's answer, nothing appended
    assert result["other"] == (2, "d1")  # the caller compares digests (core refuses a clash)
    fresh = [r for r in result["retries"] if r[1] is None]
    assert len(fresh) == 1 and {r[0] for r in result["retries"]} == {3}
    assert result["hist"] == ["1", "2", "3"]


def test_single_node(redis_url: str, redis_server: RedisProcess) -> None:
    check(asyncio.run(_scenario(store_for(redis_url, cluster=False), "idem-u1")))
    r = redis.Redis(port=redis_server.port)
    assert 0 < r.pttl(f"{KEYS.history('idem-u1')}:idem:key-1") <= 60_000


def test_redis_cluster_same_slot(cluster: RedisClusterProcess) -> None:
    cluster.flush()
    users = [f"idem-c{i}" for i in range(6)]  # spread over the masters
    for user in users:
        check(asyncio.run(_scenario(store_for(cluster.url, cluster=True), user)))
    probe = cluster.node_clients()[0]
    try:
        for user in users:
            hist = KEYS.history(user)
            record = f"{hist}:idem:key-1"
            assert probe.cluster("keyslot", hist) == probe.cluster("keyslot", record)
        slots = {probe.cluster("keyslot", KEYS.history(u)) for u in users}
        assert len(slots) > 1
    finally:
        for client in cluster.node_clients():
            client.close()
        probe.close()


def test_window_expiry_appends_again(redis_url: str) -> None:
    async def go() -> tuple[tuple[int, str | None], tuple[int, str | None]]:
        store = store_for(redis_url, cluster=False, window_s=0.2)
        try:
            first = await store.append_history_once("idem-exp", ["7"], "k", "d")
            await asyncio.sleep(0.4)
            return first, await store.append_history_once("idem-exp", ["7"], "k", "d")
        finally:
            await store.close()

    first, later = asyncio.run(go())
    assert first == (1, None) and later == (2, None)  # past the window: a new append
