"""What a request reads of the snapshot: the active snapshot (the watcher's view of
``ta:snap:current``), then under the rest of the budget, timed as the redis stage, the user's
snapshot value and history (one round trip) and the co-visitation neighbours of the fresh last
items (an in-process cache first; what cannot be read counts as no neighbours)."""

from __future__ import annotations

import logging

from service.contracts.catalog import Catalog
from service.contracts.covisit import EMPTY as NO_NEIGHBOURS
from service.contracts.covisit import NeighbourCache, Neighbours, covisit_scores, recent_items
from service.core.clock import Clock
from service.core.corrupt import CorruptValues
from service.core.types import Degraded, DegradedReason
from service.errors import RedisUnavailable
from service.storage.snapshot_watch import ActiveSnapshot, SnapshotWatcher
from service.storage.store import SnapshotStore, UserRead

log = logging.getLogger(__name__)
READ_FLOOR_S = 0.001  # a read still gets this long when the budget is already spent


class Reads:
    def __init__(
        self,
        store: SnapshotStore,
        watcher: SnapshotWatcher,
        catalog: Catalog,
        corrupt: CorruptValues,
        cache_items: int,
    ) -> None:
        self.store = store
        self.watcher = watcher
        self.catalog = catalog
        self.corrupt = corrupt
        self._neighbours = NeighbourCache(cache_items)

    def active(self) -> ActiveSnapshot | None:
        """The active snapshot as last polled (None: Redis names none)."""
        return self.watcher.active

    async def user(self, snapshot_id: str | None, user_id: str, clock: Clock) -> UserRead:
        """The user's value under ``snapshot_id`` (None: history only) and stored history.
        Raises :class:`Degraded` (budget, Redis down): the request goes on knowing nothing."""
        try:
            async with clock.stage("redis", READ_FLOOR_S):
                return await self.store.read_user(snapshot_id, user_id)
        except TimeoutError:
            raise Degraded(DegradedReason.BUDGET_EXCEEDED) from None
        except RedisUnavailable as exc:
            log.warning("event=redis_read_failed error=%s", exc)
            raise Degraded(DegradedReason.REDIS_UNAVAILABLE) from exc

    async def covisit(
        self, snapshot_id: str, fresh: list[str], excluded: set[str], clock: Clock
    ) -> dict[str, float]:
        """Co-visitation scores of the neighbours of the fresh last items; cached neighbour
        lists when Redis is slow or down."""
        recent = [i for i in recent_items(fresh) if i in self.catalog.row_of]
        found: dict[str, Neighbours] = {}
        missing = []
        for item in recent:
            cached = self._neighbours.get(snapshot_id, item)
            if cached is None:
                missing.append(item)
            else:
                found[item] = cached
        if missing and clock.remaining() > 0:
            try:
                async with clock.stage("redis", READ_FLOOR_S):
                    raws = await self.store.read_covisit(snapshot_id, missing)
                for item, raw in zip(missing, raws, strict=True):
                    value = self._decode_neighbours(raw)
                    self._neighbours.put(snapshot_id, item, value)
                    found[item] = value
            except (TimeoutError, RedisUnavailable) as exc:
                log.warning("event=covisit_read_failed error=%r", exc)
        return covisit_scores(fresh, found, excluded)

    def _decode_neighbours(self, raw: bytes | None) -> Neighbours:
        if raw is None:
            return NO_NEIGHBOURS
        return self.corrupt.decode("covisit", Neighbours.decode, raw, NO_NEIGHBOURS)
