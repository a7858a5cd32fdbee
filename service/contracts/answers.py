"""Whole answers computed ahead for users whose history does not change.

When the history a request scores under is exactly the one the snapshot was computed from, every
term of the fused score is known offline: the worker runs the service's own think-ahead scoring
(same candidates, pruning, engine requests and fusion) with k = ``items`` and stores the ranked
items in the user's snapshot value. The service then answers such a request from that one Redis
read, with no engine round, provided it would score the same way: the :class:`AnswerScoring`
key recorded in the snapshot manifest must equal the one built from its own settings.

Only exact reuse is allowed: recent items, exclusions (they renormalise the constrained
log-probs) or another scoring configuration send the request down the engine path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from service.contracts.fusion import FusionWeights
from service.contracts.manifest import sha256_hex
from service.contracts.packed import pack_scored, unpack_scored

DEFAULT_ANSWER_ITEMS = 50


@dataclass(frozen=True)
class AnswerScoring:
    """Everything that decides an unchanged user's ranking besides the model, the catalog and
    the snapshot itself (which carries its own co-visitation table)."""

    weights: FusionWeights
    covisit_candidates: int
    prefixes: int  # M snapshot prefixes used online
    exclude_history: bool
    affinity_candidates: int = 0  # the item-level model's best items among the candidates

    def key(self) -> str:
        # terms left at zero stay out of the key: snapshots published before they existed
        # keep serving their stored answers
        weights = self.weights.model_dump(mode="json")
        if not weights["affinity"]:
            del weights["affinity"]
        body = asdict(self) | {"weights": weights}
        if not self.affinity_candidates:
            del body["affinity_candidates"]
        return sha256_hex(json.dumps(body, sort_keys=True).encode())

    def serves(self, stored_key: str | None, stored_items: int, k: int) -> bool:
        """Whether answers stored under ``stored_key``, ranked to ``stored_items``, hold this
        scoring's top ``k``: pruning for the top N keeps every candidate the top k needs."""
        return stored_key == self.key() and k <= stored_items


# (a, b, c) as uint16 and the fused score as float32: 10 bytes per item in the snapshot value.
pack_answer = pack_scored
unpack_answer = unpack_scored
