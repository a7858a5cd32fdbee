"""The events use case: append a user's items to their history, once per idempotency key."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

from service.contracts.catalog import Catalog
from service.core.types import EventsResult, check_id, check_ids
from service.errors import InvalidRequest, RedisUnavailable
from service.metrics import Metrics
from service.storage.store import SnapshotStore

log = logging.getLogger(__name__)


class Events:
    def __init__(
        self, catalog: Catalog, store: SnapshotStore, metrics: Metrics, max_list_items: int
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.metrics = metrics
        self.max_list_items = max_list_items

    async def append(
        self, user_id: str, item_ids: Sequence[str], idempotency_key: str | None = None
    ) -> EventsResult:
        """Appends the catalog's items of ``item_ids`` (oldest first); unknown ids are answered,
        not stored."""
        check_id("user_id", user_id)
        if not item_ids:
            raise InvalidRequest("item_ids", "at least one id")
        check_ids("item_ids", item_ids, self.max_list_items)
        known = [i for i in item_ids if i in self.catalog.row_of]
        unknown = [i for i in item_ids if i not in self.catalog.row_of]
        if idempotency_key is not None:
            return await self._append_once(user_id, item_ids, known, unknown, idempotency_key)
        if not known:
            length = len((await self.store.read_user(None, user_id)).history)
            return EventsResult(length, unknown)
        length = await self.store.append_history(user_id, known)
        await self._announce(user_id)
        return EventsResult(length, unknown)

    async def _announce(self, user_id: str) -> None:
        """Tell the re-think worker; the events are stored already, so a failure here is
        counted, not the caller's error."""
        try:
            await self.store.announce(user_id)
        except RedisUnavailable as exc:
            self.metrics.unannounced.inc()
            log.warning("event=announce_failed error=%s", exc)

    async def _append_once(
        self,
        user_id: str,
        item_ids: Sequence[str],
        known: list[str],
        unknown: list[str],
        key: str,
    ) -> EventsResult:
        """A retried batch (same user, same key, within the window) is not appended again and
        answers as the first call did; the same key with another batch is refused."""
        check_id("idempotency_key", key)
        digest = hashlib.sha256("\n".join(item_ids).encode()).hexdigest()[:32]
        length, prior = await self.store.append_history_once(user_id, known, key, digest)
        if prior is None:
            if known:
                await self._announce(user_id)
            return EventsResult(length, unknown)
        if prior != digest:
            raise InvalidRequest("idempotency_key", "already used for a different batch")
        self.metrics.idempotent_replays.inc()
        return EventsResult(length, unknown, replayed=True)
