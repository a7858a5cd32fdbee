"""Redis access for the service: every driver error becomes :class:`RedisUnavailable` here.

A recommend request costs one round trip: the user's snapshot value and history are read in one
pipeline (both keys share the user's hash slot, so this holds on Redis Cluster too).

On Redis Cluster, appending to a history is one single-key Lua script (atomic on the key's node,
like the MULTI used on a single node): redis-py's (8.1) asyncio cluster pipeline with
``transaction=True`` queues every command through ``asyncio.run`` in a helper thread that the
event loop waits for, and when that is the client's first command it initializes the client on
that throwaway loop, leaving pooled connections bound to a closed loop (later commands fail with
"Event loop is closed"). The cluster client's own errors
(``RedisClusterException``, e.g. no reachable startup node or an uncovered slot) are not
``RedisError`` subclasses and are caught explicitly.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from service.config import RedisSettings
from service.errors import RedisUnavailable
from service.manifest import SnapshotManifest
from service.snapshot import Keyspace


@asynccontextmanager
async def redis_boundary(what: str) -> AsyncIterator[None]:
    try:
        yield
    except (RedisError, RedisClusterException, OSError) as exc:
        raise RedisUnavailable(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc


def connect(settings: RedisSettings) -> Any:
    """An asyncio client (standalone or cluster) with short timeouts and no retries: the request
    deadline, not the driver, decides how long to wait."""
    common: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_ms / 1000,
        "socket_connect_timeout": settings.connect_timeout_ms / 1000,
        "max_connections": settings.max_connections,
        "decode_responses": False,
    }
    if settings.cluster:
        # No retries here either (the default is 3 with backoff: seconds on a dead primary).
        # MOVED/ASK redirects are followed regardless, and a connection error makes the client
        # reload the slot map before its next command.
        return RedisCluster.from_url(settings.url, retry=Retry(NoBackoff(), 0), **common)
    return aioredis.Redis.from_url(
        settings.url, retry=Retry(NoBackoff(), 0), health_check_interval=0, **common
    )


# LPUSH (ARGV[2..], oldest to newest, so the newest ends first), LTRIM to ARGV[1], LLEN.
_APPEND_CAPPED = """
redis.call('LPUSH', KEYS[1], unpack(ARGV, 2))
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[1]) - 1)
return redis.call('LLEN', KEYS[1])
"""


@dataclass(frozen=True)
class UserRead:
    snapshot_value: bytes | None
    history: list[str]  # oldest first


class SnapshotStore:
    def __init__(self, client: Any, keys: Keyspace, history_cap: int) -> None:
        self.client = client
        self.keys = keys
        self.history_cap = history_cap

    async def read_user(self, snapshot_id: str | None, user_id: str) -> UserRead:
        async with redis_boundary("read"):
            pipe = self.client.pipeline(transaction=False)
            if snapshot_id is not None:
                pipe.get(self.keys.user(snapshot_id, user_id))
            pipe.lrange(self.keys.history(user_id), 0, self.history_cap - 1)
            replies = await pipe.execute()
        value = replies[0] if snapshot_id is not None else None
        newest_first = replies[-1] or []
        history = [v.decode("utf-8", "replace") for v in reversed(newest_first)]
        return UserRead(value, history)

    async def append_history(self, user_id: str, item_ids: Sequence[str]) -> int:
        """LPUSH oldest-to-newest so the newest ends first, then cap, atomically."""
        key = self.keys.history(user_id)
        if isinstance(self.client, RedisCluster):
            async with redis_boundary("append"):
                length = await self.client.eval(_APPEND_CAPPED, 1, key, self.history_cap, *item_ids)
            return int(length)
        async with redis_boundary("append"):
            pipe = self.client.pipeline(transaction=True)
            pipe.lpush(key, *item_ids)
            pipe.ltrim(key, 0, self.history_cap - 1)
            pipe.llen(key)
            replies = await pipe.execute()
        return int(replies[-1])

    async def current_snapshot(self) -> tuple[str, SnapshotManifest | None] | None:
        async with redis_boundary("snapshot lookup"):
            raw = await self.client.get(self.keys.current)
            if raw is None:
                return None
            snapshot_id = raw.decode("utf-8", "replace")
            manifest_raw = await self.client.get(self.keys.manifest(snapshot_id))
        if manifest_raw is None:
            return snapshot_id, None
        try:
            return snapshot_id, SnapshotManifest.model_validate(json.loads(manifest_raw))
        except ValueError:
            return snapshot_id, None

    async def ping(self) -> bool:
        try:
            async with redis_boundary("ping"):
                return bool(await self.client.ping())
        except RedisUnavailable:
            return False

    async def close(self) -> None:
        close = getattr(self.client, "aclose", None) or self.client.close
        await close()
