"""Explanations: the stored rationale of a user's snapshot entry, rendered for callers.

The worker stores each user's best categories (``service.contracts.rationale``); the service
only reads them, with the answer, at no engine cost. An answer that did not come from the entry
(a fallback), an entry without rationales (a model that does not reason, e.g. during a
rollout) or one whose rationales are damaged gets no explanation and says why: never an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from service.contracts.rationale import (
    Basis,
    Categories,
    Rationale,
    RationaleError,
    unpack_rationales,
)
from service.contracts.snapshot import UserPrefixes
from service.core.corrupt import CorruptValues


class RationaleAbsent(StrEnum):
    """Why an answer asked to explain itself carries no rationale (``reasoning_absent``)."""

    NO_ENTRY = "no_entry"  # no usable snapshot entry: a cold user, a snapshot problem
    FALLBACK_ANSWER = "fallback_answer"  # the answer is not the entry's (a fallback)
    NO_RATIONALE = "no_rationale"  # the entry holds none (a catalog without categories)
    CORRUPT_RATIONALE = "corrupt_rationale"


@dataclass(frozen=True)
class Alternative:
    category: str
    probability: float


@dataclass(frozen=True)
class Explanation:
    """The rationale shown: its category path (and words), how likely the model found it,
    the user's history items it rests on, and the next likeliest categories."""

    text: str
    category: str
    words: tuple[str, ...]
    probability: float
    evidence_item_ids: tuple[str, ...]
    alternatives: tuple[Alternative, ...] = ()
    basis: Basis = "stated"


def render(best: Rationale, categories: Categories) -> str:
    share = f"{math.exp(best.logprob):.0%}"
    if best.basis == "answer":
        # the answer's category share, mixed with the history's (RationaleSettings)
        text = f"mostly {categories.text(best.category)} ({share}, by this answer and your history)"
    else:
        text = f"next: {categories.text(best.category)} ({share})"
    if best.evidence:
        n = len(best.evidence)
        text += f", like {'the item' if n == 1 else f'{n} items'} you recently took there"
    return text


def explain(
    value: UserPrefixes | None, categories: Categories | None, corrupt: CorruptValues
) -> Explanation | RationaleAbsent:
    """The entry's explanation, or why there is none."""
    if value is None:
        return RationaleAbsent.NO_ENTRY
    if not value.rationales or categories is None:
        return RationaleAbsent.NO_RATIONALE
    stored = corrupt.decode("snapshot_rationale", unpack_rationales, value.rationales, None)
    usable = [r for r in stored or () if 0 <= r.category < len(categories)]
    if not usable:
        return RationaleAbsent.CORRUPT_RATIONALE
    best = usable[0]
    return Explanation(
        text=render(best, categories),
        category=categories.text(best.category),
        words=categories.paths[best.category],
        probability=round(math.exp(best.logprob), 4),
        evidence_item_ids=best.evidence,
        alternatives=tuple(
            Alternative(categories.text(r.category), round(math.exp(r.logprob), 4))
            for r in usable[1:]
        ),
        basis=best.basis,
    )


__all__ = ["Alternative", "Explanation", "RationaleAbsent", "RationaleError", "explain"]
