"""The item-level model in the service: a fresh history's best items, for the no-engine answer
after an event.

The worker stores each user's best item-level items for the history it saw
(``service.contracts.affinity``); after an event they describe the old history. Encoding the
fresh history is cheap next to an engine round (one forward pass of each member's two-block
model and one search over the item vectors: about 1 ms per member on one core for Beauty's 12,101
items; an ensemble encodes with its first ``fresh_members``, one by default), so the
no-engine answer (``ThinkAheadScorer.rerank``) gets the fresh history's item-level scores and
candidates instead of the stale ones. It runs on one dedicated thread: torch releases the GIL,
the event loop keeps serving reads meanwhile, and concurrent encodes never contend with each
other for cores the engine needs.

Memory: the item vectors (items x dim x fresh members x 4 bytes; 3.1 MB for Beauty) plus the
model's blocks.
A catalog too large for that turns it off (``recommend.fresh_item_model``); its search then
belongs in an approximate index (``service.contracts.item_index``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from service.contracts.affinity import DEFAULT_AFFINITY_ITEMS, Affinity
from service.contracts.catalog import Catalog
from service.contracts.item_model import ITEMS_DIR
from service.contracts.tokens import Code
from service.core.clock import Clock

if TYPE_CHECKING:
    from service.contracts.item_model import ItemModel

log = logging.getLogger(__name__)

# an encode is ~1 ms per ensemble member: a request that has less than this left answers
# without it
ENCODE_FLOOR_S = 0.005


class FreshItems:
    def __init__(
        self, model: ItemModel, catalog: Catalog, items: int = DEFAULT_AFFINITY_ITEMS
    ) -> None:
        self.model = model
        self.catalog = catalog
        self.items = items
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fresh-items")

    @classmethod
    def load(cls, model_dir: Path | str, catalog: Catalog) -> FreshItems | None:
        """The model directory's item-level model; None when it has none (the no-engine answer
        then re-ranks with the stored item-level scores)."""
        path = Path(model_dir) / ITEMS_DIR
        if not path.is_dir():
            return None
        import torch

        from service.contracts.item_model import ItemModel

        # one intra-op thread: the encode is small, and the cores belong to the engine
        torch.set_num_threads(1)
        return cls(ItemModel.load(path, catalog).for_fresh(), catalog)

    @property
    def version(self) -> str:
        return self.model.version

    def top(self, history: Sequence[Code], exclude_history: bool) -> Affinity:
        """The fresh history's best items (blocking: call :meth:`affinity` from the loop)."""
        return self.model.affinities(self.catalog, [history], self.items, exclude_history)[0]

    async def affinity(
        self, history: Sequence[Code], exclude_history: bool, clock: Clock
    ) -> Affinity | None:
        """:meth:`top` off the event loop, under the request's budget; None when the budget
        has no room for it (the caller answers with the stored scores)."""
        if clock.remaining() < ENCODE_FLOOR_S:
            return None
        loop = asyncio.get_running_loop()
        try:
            async with clock.stage("encode", ENCODE_FLOOR_S):
                return await loop.run_in_executor(self._pool, self.top, history, exclude_history)
        except TimeoutError:
            return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
