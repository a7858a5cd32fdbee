"""Follows ``ta:snap:current``: a new snapshot is picked up within one poll, without a restart,
and one built for another model or catalog is flagged (requests then fall back)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime

from service.contracts.manifest import SnapshotManifest
from service.errors import RedisUnavailable
from service.metrics import Metrics
from service.storage.store import SnapshotStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveSnapshot:
    snapshot_id: str
    manifest: SnapshotManifest | None
    problem: str | None  # None when usable; else the fallback reason
    built_at: float | None


class SnapshotWatcher:
    def __init__(
        self,
        store: SnapshotStore,
        catalog_version: str,
        model_version: str,
        poll_s: float,
        metrics: Metrics,
    ) -> None:
        self.store = store
        self.catalog_version = catalog_version
        self.model_version = model_version
        self.poll_s = poll_s
        self.metrics = metrics
        self.active: ActiveSnapshot | None = None
        self.redis_ok = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def judge(self, snapshot_id: str, manifest: SnapshotManifest | None) -> ActiveSnapshot:
        if manifest is None:
            return ActiveSnapshot(snapshot_id, None, "no_snapshot", None)
        built = _parse_time(manifest.created_at)
        if manifest.catalog_version != self.catalog_version or (
            manifest.model_version != self.model_version
        ):
            return ActiveSnapshot(snapshot_id, manifest, "version_mismatch", built)
        return ActiveSnapshot(snapshot_id, manifest, None, built)

    async def refresh(self) -> None:
        try:
            found = await self.store.current_snapshot()
        except RedisUnavailable as exc:
            if self.redis_ok:
                log.warning("event=snapshot_poll_failed error=%s", exc)
            self.redis_ok = False
            return
        self.redis_ok = True
        new = None if found is None else self.judge(*found)
        old_id = None if self.active is None else self.active.snapshot_id
        if new is not None and new.snapshot_id != old_id:
            self.metrics.snapshot_flips.inc()
            log.info("event=snapshot_active snapshot=%s problem=%s", new.snapshot_id, new.problem)
        self.active = new
        self.metrics.snapshot_info.set(1 if new is not None and new.problem is None else 0)
        age = -1.0 if new is None or new.built_at is None else time.time() - new.built_at
        self.metrics.snapshot_age.set(age)

    async def _loop(self) -> None:
        # The flag, not only the cancel: a cancel that lands while the Redis driver is mid-read
        # can surface as a connection error that refresh() absorbs, and the loop went on.
        while not self._stopping:
            await self.refresh()
            await asyncio.sleep(self.poll_s)

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name="snapshot-watcher")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _parse_time(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
