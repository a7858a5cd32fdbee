"""Writes a snapshot to Redis: pipelined user values with a TTL, shard bookkeeping for resume,
then an atomic flip of ``current`` and a delayed cleanup of replaced snapshots.

Every step is a single-key command or a non-transactional pipeline (which a cluster client splits
by node), so it works on Redis Cluster; the order of steps (not a MULTI across keys) is what keeps
readers safe: ``current`` only ever names a snapshot whose every shard is written and whose
manifest says complete. On a cluster, cleanup SCANs every primary (a snapshot's keys are spread
over all of them), and the cluster client's own errors (``RedisClusterException`` is not a
``RedisError``) become :class:`PublishError` like any other.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from service.contracts.covisit import Neighbours
from service.contracts.manifest import SnapshotManifest
from service.contracts.snapshot import Keyspace, UserPrefixes
from service.storage.redis import redis_errors

log = logging.getLogger(__name__)
WRITE_CHUNK = 1000


class PublishError(RuntimeError):
    """Redis stayed unreachable after bounded retries; ``current`` was not touched."""


def connect_sync(url: str, cluster: bool = False, retries: int = 5) -> Any:
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries)
    common: dict[str, Any] = {
        "socket_timeout": 10,
        "socket_connect_timeout": 2,
        "retry": retry,
        "retry_on_error": [RedisConnectionError, RedisTimeoutError, ConnectionResetError],
    }
    if cluster:
        # The cluster client reads the slot map from the startup node when it is built.
        with redis_errors("cluster connect", _unreachable):
            return RedisCluster.from_url(url, **common)
    return redis.Redis.from_url(url, **common)


class SnapshotWriter:
    def __init__(self, client: Any, keys: Keyspace, ttl_s: int) -> None:
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s

    def ping(self) -> None:
        with redis_errors("ping", _unreachable):
            self.client.ping()

    def current(self) -> str | None:
        with redis_errors("read current", _unreachable):
            raw = self.client.get(self.keys.current)
        return None if raw is None else raw.decode()

    def pending(self) -> tuple[str, SnapshotManifest] | None:
        with redis_errors("read pending", _unreachable):
            raw = self.client.get(self.keys.pending)
            if raw is None:
                return None
            sid = raw.decode(errors="replace")
            try:
                manifest_key = self.keys.manifest(sid)
            except ValueError:
                return None  # not a snapshot id of ours: a new snapshot replaces it
            manifest_raw = self.client.get(manifest_key)
        if manifest_raw is None:
            return None
        try:
            return sid, SnapshotManifest.model_validate(json.loads(manifest_raw))
        except ValueError:
            return None

    def begin(self, manifest: SnapshotManifest) -> None:
        with redis_errors("begin snapshot", _unreachable):
            self.client.set(
                self.keys.manifest(manifest.snapshot_id), _dump(manifest), ex=self.ttl_s
            )
            self.client.set(self.keys.pending, manifest.snapshot_id)

    def done_shards(self, snapshot_id: str) -> set[int]:
        with redis_errors("read progress", _unreachable):
            return {int(x) for x in self.client.smembers(self.keys.done_shards(snapshot_id))}

    def write_shard(
        self, snapshot_id: str, shard: int, values: Sequence[tuple[str, UserPrefixes]]
    ) -> None:
        """User values, then the shard's done mark; a crash before the mark redoes the shard
        (the values are idempotent overwrites)."""
        with redis_errors(f"write shard {shard}", _unreachable):
            for start in range(0, len(values), WRITE_CHUNK):
                pipe = self.client.pipeline(transaction=False)
                for user, value in values[start : start + WRITE_CHUNK]:
                    pipe.set(self.keys.user(snapshot_id, user), value.encode(), ex=self.ttl_s)
                pipe.execute()
            self.client.sadd(self.keys.done_shards(snapshot_id), shard)
            self.client.expire(self.keys.done_shards(snapshot_id), self.ttl_s)

    def write_covisit(self, snapshot_id: str, neighbours: Iterable[tuple[str, Neighbours]]) -> int:
        """The co-visitation table under the snapshot, one value per item (it shards like the
        users' values and is cleaned up with the snapshot)."""

        def write(item: str, value: Neighbours) -> Callable[[Any], object]:
            key = self.keys.covisit(snapshot_id, item)
            return lambda pipe: pipe.set(key, value.encode(), ex=self.ttl_s)

        return self._pipelined("write co-visitation", (write(i, v) for i, v in neighbours))

    def seed_histories(self, histories: Iterable[tuple[str, Sequence[str]]], cap: int) -> int:
        """Replace users' history lists (newest first, capped), e.g. from an interactions log."""

        def replace(user: str, items: Sequence[str]) -> Callable[[Any], object]:
            key, recent = self.keys.history(user), list(items)[-cap:]

            def ops(pipe: Any) -> None:
                pipe.delete(key)
                if recent:
                    pipe.lpush(key, *recent)

            return ops

        return self._pipelined("seed histories", (replace(u, i) for u, i in histories))

    def _pipelined(self, what: str, writes: Iterable[Callable[[Any], object]]) -> int:
        """Apply the writes through non-transactional pipelines of WRITE_CHUNK writes each."""
        n = 0
        with redis_errors(what, _unreachable):
            pipe = self.client.pipeline(transaction=False)
            for write in writes:
                write(pipe)
                n += 1
                if n % WRITE_CHUNK == 0:
                    pipe.execute()
                    pipe = self.client.pipeline(transaction=False)
            pipe.execute()
        return n

    def publish(self, manifest: SnapshotManifest) -> str | None:
        """Complete manifest, flip ``current``, retire the previous snapshot. Returns it."""
        sid = manifest.snapshot_id
        with redis_errors("publish", _unreachable):
            previous = self.current()
            self.client.set(self.keys.manifest(sid), _dump(manifest), ex=self.ttl_s)
            self.client.set(self.keys.current, sid)  # the atomic flip
            if previous and previous != sid:
                self.client.zadd(self.keys.retired, {previous: time.time()})
            self.client.delete(self.keys.pending)
        return previous

    def abandon(self, snapshot_id: str) -> None:
        """Retire a pending snapshot that will not be finished (cleaned at the next sweep)."""
        with redis_errors("abandon", _unreachable):
            if self.current() != snapshot_id:
                self.client.zadd(self.keys.retired, {snapshot_id: 0})
            self.client.delete(self.keys.pending)

    def cleanup(self, grace_s: float) -> list[str]:
        """Delete snapshots retired more than ``grace_s`` ago (never the current one)."""
        removed = []
        with redis_errors("cleanup", _unreachable):
            current = self.current()
            cutoff = time.time() - grace_s
            for raw in self.client.zrangebyscore(self.keys.retired, 0, cutoff):
                sid = raw.decode(errors="replace")
                try:
                    pattern = self.keys.user_pattern(sid)
                except ValueError:
                    pattern = None  # not an id of ours: no keys were written under it
                if sid == current or pattern is None:
                    self.client.zrem(self.keys.retired, raw)
                    continue
                batch = []
                for key in self._scan(pattern):
                    batch.append(key)
                    if len(batch) >= WRITE_CHUNK:
                        self._unlink(batch)
                        batch = []
                if batch:
                    self._unlink(batch)
                self.client.zrem(self.keys.retired, sid)
                removed.append(sid)
        return removed

    def _scan(self, pattern: str) -> Iterator[bytes]:
        """Keys matching ``pattern``; on a cluster, from every primary (one SCAN per node)."""
        if isinstance(self.client, RedisCluster):
            yield from self.client.scan_iter(
                match=pattern, count=1000, target_nodes=RedisCluster.PRIMARIES
            )
        else:
            yield from self.client.scan_iter(match=pattern, count=1000)

    def _unlink(self, keys: list[bytes]) -> None:
        """One UNLINK per key in a non-transactional pipeline: keys of a snapshot sit in many
        slots, which a cluster splits by node (a multi-key UNLINK would be CROSSSLOT)."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.unlink(key)
        pipe.execute()


def _unreachable(message: str) -> PublishError:
    return PublishError(f"{message} (redis unreachable after bounded retries)")


def _dump(manifest: SnapshotManifest) -> str:
    return json.dumps(manifest.model_dump(mode="json"), sort_keys=True)
