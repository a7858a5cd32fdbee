"""Redis access for the service: every driver error becomes :class:`RedisUnavailable` here.

A recommend request costs one round trip: the user's snapshot value and history are read in one
pipeline (both keys share the user's hash slot, so this holds on Redis Cluster too).

On Redis Cluster, appending to a history is one single-key Lua script (atomic on the key's node,
like the MULTI used on a single node): redis-py's (8.1) asyncio cluster pipeline with
``transaction=True`` queues every command through ``asyncio.run`` in a helper thread that the
event loop waits for, and when that is the client's first command it initializes the client on
that throwaway loop, leaving pooled connections bound to a closed loop (later commands fail with
"Event loop is closed"). Driver errors
are turned into :class:`RedisUnavailable` by :func:`service.storage.redis.redis_errors`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.contracts.manifest import SnapshotManifest
from service.contracts.snapshot import Keyspace
from service.errors import RedisUnavailable
from service.storage.redis import RedisCluster, redis_errors

log = logging.getLogger(__name__)

# LPUSH (ARGV[2..], oldest to newest, so the newest ends first), LTRIM to ARGV[1], LLEN.
_APPEND_CAPPED = """
redis.call('LPUSH', KEYS[1], unpack(ARGV, 2))
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[1]) - 1)
return redis.call('LLEN', KEYS[1])
"""


# Idempotent append, one script on a single node and on a cluster (both keys carry the user's
# hash tag, so they share a slot): KEYS[1] history, KEYS[2] the idempotency record; ARGV[1] cap,
# ARGV[2] window in ms, ARGV[3] the batch digest, ARGV[4..] items oldest to newest. A record
# already there answers {its digest, the length the first call saw} and appends nothing;
# otherwise append (if any items), cap, record "digest:length" for the window, answer {"", n}.
# Check and append are one script, so two concurrent retries cannot both append.
_APPEND_ONCE = """
local prior = redis.call('GET', KEYS[2])
if prior then
  local sep = string.find(prior, ':', 1, true)
  return {string.sub(prior, 1, sep - 1), tonumber(string.sub(prior, sep + 1))}
end
if #ARGV > 3 then
  redis.call('LPUSH', KEYS[1], unpack(ARGV, 4))
  redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[1]) - 1)
end
local n = redis.call('LLEN', KEYS[1])
redis.call('SET', KEYS[2], ARGV[3] .. ':' .. n, 'PX', ARGV[2])
return {'', n}
"""


@dataclass(frozen=True)
class UserRead:
    snapshot_value: bytes | None
    history: list[str]  # oldest first


class SnapshotStore:
    def __init__(
        self,
        client: Any,
        keys: Keyspace,
        history_cap: int,
        idempotency_window_s: float = 86400.0,
        events_maxlen: int = 0,
        writer: Any | None = None,
    ) -> None:
        """``writer``: the client for history appends and the events stream, with a longer
        timeout than the reads' (``RedisSettings.write_timeout_ms``); None: ``client``."""
        self.client = client
        self.writer = writer if writer is not None else client
        self.keys = keys
        self.history_cap = history_cap
        self.idempotency_window_s = idempotency_window_s
        self.events_maxlen = events_maxlen  # 0: no events stream (nothing re-thinks users)

    async def read_user(self, snapshot_id: str | None, user_id: str) -> UserRead:
        with redis_errors("read"):
            pipe = self.client.pipeline(transaction=False)
            if snapshot_id is not None:
                pipe.get(self.keys.user(snapshot_id, user_id))
            pipe.lrange(self.keys.history(user_id), 0, self.history_cap - 1)
            replies = await pipe.execute()
        value = replies[0] if snapshot_id is not None else None
        newest_first = replies[-1] or []
        history = [v.decode("utf-8", "replace") for v in reversed(newest_first)]
        return UserRead(value, history)

    async def read_covisit(self, snapshot_id: str, item_ids: Sequence[str]) -> list[bytes | None]:
        """The co-visitation values of a few items (one pipeline; on a cluster the client
        splits it by node)."""
        with redis_errors("co-visitation read"):
            pipe = self.client.pipeline(transaction=False)
            for item in item_ids:
                pipe.get(self.keys.covisit(snapshot_id, item))
            return list(await pipe.execute())

    async def append_history(self, user_id: str, item_ids: Sequence[str]) -> int:
        """LPUSH oldest-to-newest so the newest ends first, then cap, atomically."""
        key = self.keys.history(user_id)
        if isinstance(self.writer, RedisCluster):
            with redis_errors("append"):
                length = await self.writer.eval(_APPEND_CAPPED, 1, key, self.history_cap, *item_ids)
            return int(length)
        with redis_errors("append"):
            pipe = self.writer.pipeline(transaction=True)
            pipe.lpush(key, *item_ids)
            pipe.ltrim(key, 0, self.history_cap - 1)
            pipe.llen(key)
            replies = await pipe.execute()
        return int(replies[-1])

    async def announce(self, user_id: str) -> None:
        """Add the user to the events stream the re-think worker reads (after their history
        changed: a worker that reads the entry then finds the history it must think about),
        trimmed to about ``events_maxlen`` entries."""
        if not self.events_maxlen:
            return
        with redis_errors("announce"):
            await self.writer.xadd(
                self.keys.events, {"u": user_id}, maxlen=self.events_maxlen, approximate=True
            )

    def idempotency_key(self, user_id: str, key: str) -> str:
        """Beside the history, under the same ``{user_id}`` hash tag (same cluster slot)."""
        return f"{self.keys.history(user_id)}:idem:{key}"

    async def append_history_once(
        self, user_id: str, item_ids: Sequence[str], key: str, digest: str
    ) -> tuple[int, str | None]:
        """Appends unless ``key`` was seen for this user within the window. Returns the history
        length (the first call's on a replay) and the digest recorded by the first call (None
        when this call appended)."""
        keys = (self.keys.history(user_id), self.idempotency_key(user_id, key))
        window_ms = max(1, int(self.idempotency_window_s * 1000))
        with redis_errors("append"):
            prior, length = await self.writer.eval(
                _APPEND_ONCE, 2, *keys, self.history_cap, window_ms, digest, *item_ids
            )
        prior_digest = prior.decode() if isinstance(prior, bytes) else str(prior)
        return int(length), (prior_digest or None)

    async def current_snapshot(self) -> tuple[str, SnapshotManifest | None] | None:
        with redis_errors("snapshot lookup"):
            raw = await self.client.get(self.keys.current)
            if raw is None:
                return None
            snapshot_id = raw.decode("utf-8", "replace")
            try:
                manifest_key = self.keys.manifest(snapshot_id)
            except ValueError:
                log.warning("event=bad_snapshot_id current=%r", snapshot_id[:80])
                return None  # not a snapshot of ours: as if there were none
            manifest_raw = await self.client.get(manifest_key)
        if manifest_raw is None:
            return snapshot_id, None
        try:
            return snapshot_id, SnapshotManifest.model_validate(json.loads(manifest_raw))
        except ValueError:
            return snapshot_id, None

    async def ping(self) -> bool:
        try:
            with redis_errors("ping"):
                return bool(await self.client.ping())
        except RedisUnavailable:
            return False

    async def close(self) -> None:
        clients = [self.client] if self.writer is self.client else [self.client, self.writer]
        for client in clients:
            close = getattr(client, "aclose", None) or client.close
            await close()
