"""Whole answers computed ahead for users whose history does not change.

When the history a request scores under is exactly the one the snapshot was computed from, every
term of the fused score is known offline: the worker runs the service's own think-ahead scoring
(same candidates, pruning, engine requests and fusion) with k = ``items`` and stores the ranked
items in the user's snapshot value. The service then answers such a request from that one Redis
read, with no engine round, provided it would score the same way: the key recorded in the
snapshot manifest (``ScoringSettings.key``, ``service.contracts.think_ahead``) must equal the
one of its own settings.

Only exact reuse is allowed: recent items, exclusions (they renormalise the constrained
log-probs) or another scoring configuration send the request down the engine path.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.contracts.packed import pack_scored, unpack_scored
from service.contracts.tokens import Code

DEFAULT_ANSWER_ITEMS = 50


def pack_answer(ranked: Sequence[tuple[Code, float]]) -> bytes:
    """The fused scores as callers will see them (float32): 7 bytes per item at K <= 256."""
    return pack_scored(ranked, precise=True)


unpack_answer = unpack_scored
