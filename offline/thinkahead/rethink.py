"""``thinkahead rethink``: think again, near-line, about the users who just acted.

The events API appends a user's items to their history, then adds the user to a Redis Stream
(``ta:events``, bounded). This worker reads the stream in a consumer group, batches the users,
reads each one's fresh history (exactly as the service will: newest-first list, catalog items,
the model's history length) and recomputes the user's snapshot entry with the nightly worker's
own :class:`~offline.thinkahead.entries.Thinker`, under the active snapshot's settings. An entry
is written only if the user's history is still the one it was computed from (one Lua script
compares the list and sets the value), so a newer event always wins: its own stream entry
brings the user back. Delivery is at least once: entries are acknowledged after the write;
those a dead consumer left pending are claimed after ``claim_idle_s``. Recomputing is
idempotent, so a redelivery costs work, never correctness.

With the entry rewritten, the service answers the user's next recommend from the stored answer
(its history digest matches again): the engine round after an event becomes the exception.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.exceptions import RedisError

from offline.errors import InputError
from offline.thinkahead.entries import CovisitSource, Thinker
from offline.thinkahead.publish import connect_sync
from offline.thinkahead.worker import (
    ThinkAheadJob,
    item_source,
    make_thinker,
    reasoner_for,
    scoring_settings,
)
from service.contracts.catalog import Catalog
from service.contracts.manifest import SnapshotManifest
from service.contracts.model import ModelInfo, load_model_info
from service.contracts.snapshot import Keyspace
from service.contracts.tokens import Code
from service.engine.base import BatchEngine

log = logging.getLogger(__name__)

GROUP = "rethink"
RETRY_S = 1.0  # after a Redis error
# KEYS[1] the user's history, KEYS[2] their snapshot value; ARGV[1] n, ARGV[2..n+1] the history
# as read (newest first), ARGV[n+2] the value, ARGV[n+3] its TTL in ms. The value is set only if
# the history is still exactly that list: 1 written, 0 stale.
_WRITE_IF_UNCHANGED = """
local n = tonumber(ARGV[1])
local cur = redis.call('LRANGE', KEYS[1], 0, -1)
if #cur ~= n then return 0 end
for i = 1, n do
  if cur[i] ~= ARGV[i + 1] then return 0 end
end
redis.call('SET', KEYS[2], ARGV[n + 2], 'PX', ARGV[n + 3])
return 1
"""
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class RethinkMetrics:
    """The worker's Prometheus metrics (its own registry, served on ``--metrics-port``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.users = Counter(
            "thinkahead_rethink_users_total",
            "Users re-thought, by outcome (written, stale: the history moved on, skipped)",
            ["outcome"],
            registry=r,
        )
        self.failures = Counter(
            "thinkahead_rethink_failures_total", "Batches that failed (retried)", registry=r
        )
        self.lag = Histogram(
            "thinkahead_rethink_lag_seconds",
            "From the event's stream entry to its user's entry written",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.batch_users = Histogram(
            "thinkahead_rethink_batch_users",
            "Distinct users per batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "thinkahead_rethink_batch_seconds",
            "Time to re-think one batch",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.alive = Gauge(
            "thinkahead_rethink_loop_timestamp_seconds",
            "When the worker's loop last went round (a hung worker stops it)",
            registry=r,
        )
        self.pending = Gauge(
            "thinkahead_rethink_stream_pending",
            "Stream entries not yet handled by the group (pending + unread)",
            registry=r,
        )


@dataclass
class Batch:
    """Stream entries read together, and their users (distinct, first seen first)."""

    ids: list[str]
    users: list[str]
    oldest_ms: dict[str, int] = field(default_factory=dict)  # user -> first entry's time


def _batch(entries: Sequence[tuple[Any, dict[Any, Any]]]) -> Batch:
    batch = Batch([], [])
    for entry_id, fields in entries:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        batch.ids.append(eid)
        raw = fields.get(b"u", fields.get("u"))
        if raw is None:
            continue
        user = raw.decode() if isinstance(raw, bytes) else str(raw)
        if user not in batch.oldest_ms:
            batch.users.append(user)
            batch.oldest_ms[user] = int(eid.split("-", 1)[0])
    return batch


class Rethinker:
    """One consumer of the events stream."""

    def __init__(
        self,
        model_dir: Path,
        catalog_dir: Path,
        redis_url: str,
        engine_factory: Callable[[], BatchEngine],
        consumer: str,
        keys: Keyspace | None = None,
        batch_users: int = 16,
        block_ms: int = 1000,
        claim_idle_s: float = 30.0,
        cluster: bool = False,
        metrics: RethinkMetrics | None = None,
    ) -> None:
        self.catalog = Catalog.load(catalog_dir)
        self.model: ModelInfo = load_model_info(model_dir, self.catalog)
        self.model_dir, self.catalog_dir = Path(model_dir), Path(catalog_dir)
        self.client = connect_sync(redis_url, cluster=cluster)
        self.keys = keys or Keyspace()
        self.consumer = consumer
        self.batch_users = batch_users
        self.block_ms = block_ms
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.metrics = metrics or RethinkMetrics()
        self._engine_factory = engine_factory
        self._engine: BatchEngine | None = None
        self._thinkers: dict[str, tuple[Thinker, ThinkAheadJob]] = {}
        self._write = self.client.register_script(_WRITE_IF_UNCHANGED)
        self._ensure_group()

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.keys.events, GROUP, id="0", mkstream=True)
        except Exception as exc:  # BUSYGROUP: it exists already
            if "BUSYGROUP" not in str(exc):
                raise

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Batches until ``stop()``; a Redis outage is waited out (unacknowledged entries are
        delivered again), not fatal."""
        while not stop():
            self.metrics.alive.set_to_current_time()
            try:
                self.step()
            except RedisError as exc:
                self.metrics.failures.inc()
                log.warning("event=rethink_redis_error error=%s", exc)
                time.sleep(RETRY_S)
                if "NOGROUP" in str(exc):  # a Redis that came back without its data
                    self._ensure_group()

    def step(self) -> int:
        """One batch: claimed stale entries first, else new ones (blocking up to block_ms);
        the number of users handled."""
        entries = self._claim() or self._read()
        if not entries:
            self._gauge()
            return 0
        batch = _batch(entries)
        t0 = time.perf_counter()
        try:
            handled = self.process(batch)
        except Exception:
            self.metrics.failures.inc()
            log.exception("event=rethink_failed users=%d", len(batch.users))
            return 0  # unacknowledged: claimed again after claim_idle_s
        self.client.xack(self.keys.events, GROUP, *batch.ids)
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        self.metrics.batch_users.observe(len(batch.users))
        self._gauge()
        return handled

    def _claim(self) -> list[Any]:
        reply = self.client.xautoclaim(
            self.keys.events,
            GROUP,
            self.consumer,
            self.claim_idle_ms,
            start_id="0-0",
            count=self.batch_users,
        )
        return list(reply[1]) if reply and len(reply) > 1 else []

    def _read(self) -> list[Any]:
        reply = self.client.xreadgroup(
            GROUP,
            self.consumer,
            {self.keys.events: ">"},
            count=self.batch_users,
            block=self.block_ms,
        )
        return [e for _, entries in reply or [] for e in entries]

    def _gauge(self) -> None:
        try:
            info = self.client.xinfo_groups(self.keys.events)
        except Exception:  # no stream yet
            return
        for group in info:
            name = group.get("name", group.get(b"name"))
            if name in (GROUP, GROUP.encode()):
                pending = int(group.get("pending", 0) or 0)
                lag = group.get("lag")
                self.metrics.pending.set(pending + int(lag or 0))

    def process(self, batch: Batch) -> int:
        """Re-think the batch's users into the active snapshot; how many were handled."""
        current = self.client.get(self.keys.current)
        if current is None:
            self.metrics.users.labels("skipped").inc(len(batch.users))
            return 0
        sid = current.decode()
        thinker, job = self._thinker(sid)
        pipe = self.client.pipeline(transaction=False)
        for user in batch.users:
            pipe.lrange(self.keys.history(user), 0, -1)
        lists = [[i.decode() for i in raw] for raw in pipe.execute()]
        users, read, histories = [], [], []
        for user, newest_first in zip(batch.users, lists, strict=True):
            codes = self._codes(newest_first)
            if not codes:
                self.metrics.users.labels("skipped").inc()
                continue
            users.append(user)
            read.append(newest_first)
            histories.append(codes)
        if not users:
            return 0
        values = thinker.entries(histories, seed=batch.oldest_ms.get(users[0], 0))
        pipe = self.client.pipeline(transaction=False)
        ttl_ms = job.ttl_s * 1000
        for user, newest_first, value in zip(users, read, values, strict=True):
            self._write(
                keys=[self.keys.history(user), self.keys.user(sid, user)],
                args=[len(newest_first), *newest_first, value.encode(), ttl_ms],
                client=pipe,
            )
        now_ms = int(time.time() * 1000)
        for user, written in zip(users, pipe.execute(), strict=True):
            if written:
                self.metrics.users.labels("written").inc()
                self.metrics.lag.observe(max(now_ms - batch.oldest_ms[user], 0) / 1000)
            else:
                self.metrics.users.labels("stale").inc()
        return len(users)

    def _codes(self, newest_first: Sequence[str]) -> list[Code]:
        """The history as the service prompts with it: oldest first, catalog items only, the
        model's history length."""
        codes, _ = self.catalog.codes_of(list(reversed(newest_first)))
        return codes[-self.model.max_history :]

    def _thinker(self, snapshot_id: str) -> tuple[Thinker, ThinkAheadJob]:
        """The nightly job's settings for this snapshot (from its manifest), built once."""
        if snapshot_id in self._thinkers:
            return self._thinkers[snapshot_id]
        raw = self.client.get(self.keys.manifest(snapshot_id))
        if raw is None:
            raise InputError(None, f"snapshot {snapshot_id} has no manifest")
        manifest = SnapshotManifest.model_validate_json(raw)
        if (manifest.model_version, manifest.catalog_version) != (
            self.model.version,
            self.catalog.version,
        ):
            raise InputError(
                self.model_dir,
                f"the active snapshot {snapshot_id} was built with model "
                f"{manifest.model_version} / catalog {manifest.catalog_version}, this worker "
                f"holds {self.model.version} / {self.catalog.version}",
            )
        fields = ThinkAheadJob.model_fields
        job = ThinkAheadJob(**{k: v for k, v in manifest.parameters.items() if k in fields})
        if self._engine is None:
            self._engine = self._engine_factory()
        thinker = make_thinker(
            self._engine,
            self.model,
            self.catalog,
            job,
            scoring_settings(self.model_dir, job),
            CovisitSource.load(self.catalog_dir, self.catalog),
            item_source(self.model_dir, self.catalog, job),
            reasoner_for(self.model, self.catalog, self.catalog_dir, job.paths),
        )
        self._thinkers = {snapshot_id: (thinker, job)}
        return thinker, job
