"""Item-level scores thought ahead: each user's best items under the item-level model.

The think-ahead worker encodes the user's history with the item-level model (SASRec trained
with a softmax over items, ``offline/items``), finds the user's best N items in an index
over the item vectors, and stores them with their scores in the user's snapshot value (field
``i``, packed like the stored answers: 10 bytes per item). Online they are

1. candidates: the (a, b) prefixes of the best ``affinity_candidates`` items join the snapshot's
   and co-visitation's prefixes, scored by the decoder in the same engine round;
2. a feature of the fused score: an item's stored score, or the lowest stored score for an item
   outside the list (it ranked below all of them).

No per-item data reaches the service or the vLLM vocabulary: item vectors and the index stay
with the worker (a catalog of 10^8 items swaps the exact index for an approximate one), and the
online cost is the same one Redis read of the user's value. The scores are logits: only their
differences within one user mean anything, which is all a per-user ranking uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from service.contracts.packed import pack_scored, unpack_scored
from service.contracts.tokens import Code

DEFAULT_AFFINITY_ITEMS = 50


@dataclass(frozen=True)
class Affinity:
    ranked: tuple[tuple[Code, float], ...] = ()  # best first
    scores: dict[Code, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scores", dict(self.ranked))

    @property
    def fill(self) -> float:
        return self.ranked[-1][1] if self.ranked else 0.0

    def of(self, code: Code) -> float:
        return self.scores.get(code, self.fill)

    def prefixes(self, n: int) -> list[tuple[int, int]]:
        """(a, b) of the best ``n`` items, distinct, best first."""
        out: list[tuple[int, int]] = []
        for code, _ in self.ranked[:n]:
            if code[:2] not in out:
                out.append(code[:2])
        return out

    def pack(self) -> bytes:
        return pack_scored(self.ranked)

    @classmethod
    def unpack(cls, raw: bytes) -> Affinity:
        """Raises ValueError on a blob that is not whole rows."""
        return cls(tuple(unpack_scored(raw))) if raw else NO_AFFINITY

    @classmethod
    def of_items(cls, ranked: Sequence[tuple[Code, float]]) -> Affinity:
        return cls(tuple((tuple(code), float(s)) for code, s in ranked))  # type: ignore[misc]


NO_AFFINITY = Affinity()
