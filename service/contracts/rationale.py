"""Rationales: what the decoder says about a user's next item before it names one.

Without a pretrained LLM the decoder reasons in the catalog's own words. Every item's first
category path (``Beauty > Makeup > Nails > Nail Polish``; a shared root is dropped) is one
*category*, spelled as one token ``<cat_{i}>`` in the decoder's vocabulary. A reasoning model's
training sequences end in ``<think> <cat_i> </think>`` before the last item, so it learns
P(category | history) and P(item | history, category) beside the plain next-item task. The
think-ahead worker takes each user's top-G categories, searches the item prefixes under each and
stores the best categories (:class:`Rationale`) in the snapshot value; the service only reads
and renders them (``include_reasoning``), at no engine cost.

A model that does not reason still explains its answer: the worker sums the probability its
ranked answer puts on each category (``answer_rationales``), mixes in the share of each
category in the user's recent history (``RationaleSettings``, learned on the validation split
by ``thinkahead tune-blend``: the answer alone spreads over more categories than the user's
next item does) and stores the best categories with ``basis`` "answer". Such a rationale says
where the answer and the history lean, not what the model thought first; a stated one (basis
"stated") came before the item.

A rationale is checkable: its category either is the next item's or it is not, and the items
served beside it either sit in it or do not. Its evidence is the user's history items of the
same category, newest first.

Files: ``categories.json`` in the catalog directory (written by ``thinkahead catalog build``
when the items file has a categories column): the category paths, and each catalog row's
category (-1: none).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

CATEGORIES_FILE = "categories.json"
THINK_START = "<think>"
THINK_END = "</think>"
RATIONALES_KEPT = 3  # categories stored per user
EVIDENCE_KEPT = 2  # history items stored per rationale
NO_CATEGORY = -1
ANSWER_RATIONALE_ITEMS = 50  # the answer's top items whose probability is summed by category

Basis = Literal["stated", "answer"]


def category_token(index: int) -> str:
    return f"<cat_{index}>"


@dataclass(frozen=True)
class Categories:
    """The catalog's category vocabulary: ``paths[i]`` is category i's path (words), and
    ``of_row[r]`` catalog row r's category (``NO_CATEGORY``: none)."""

    paths: tuple[tuple[str, ...], ...]
    of_row: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return len(self.paths)

    def tokens(self) -> list[str]:
        return [category_token(i) for i in range(len(self.paths))]

    def text(self, index: int) -> str:
        return " > ".join(self.paths[index])

    def of_items(self, item_ids: Sequence[str]) -> dict[str, int]:
        """Item id -> category, for the catalog rows ``item_ids`` (aligned with ``of_row``)."""
        return {i: int(c) for i, c in zip(item_ids, self.of_row, strict=True) if c != NO_CATEGORY}

    @classmethod
    def from_paths(cls, item_paths: Sequence[tuple[str, ...]]) -> Categories:
        """One category per distinct non-empty path, most items first (ties by path)."""
        counts: dict[tuple[str, ...], int] = {}
        for path in item_paths:
            if path:
                counts[path] = counts.get(path, 0) + 1
        paths = tuple(sorted(counts, key=lambda p: (-counts[p], p)))
        index = {p: i for i, p in enumerate(paths)}
        of_row = np.array([index.get(p, NO_CATEGORY) for p in item_paths], dtype=np.int32)
        return cls(paths, of_row)

    def save(self, directory: Path) -> None:
        body = {"paths": [list(p) for p in self.paths], "of_row": self.of_row.tolist()}
        (Path(directory) / CATEGORIES_FILE).write_text(json.dumps(body))

    @classmethod
    def load_optional(cls, directory: Path | str, items: int) -> Categories | None:
        """The catalog's categories; None when it has none (a model then trains, and the
        worker thinks, without rationales). ``items``: the catalog's size, checked."""
        path = Path(directory) / CATEGORIES_FILE
        if not path.is_file():
            return None
        body = json.loads(path.read_text())
        paths = tuple(tuple(str(w) for w in p) for p in body["paths"])
        of_row = np.asarray(body["of_row"], dtype=np.int32)
        if len(of_row) != items or (len(of_row) and int(of_row.max()) >= len(paths)):
            raise ValueError(f"{path}: does not match a catalog of {items} items")
        return cls(paths, of_row)


@dataclass(frozen=True)
class Rationale:
    """One category the model expects the user's next item in, with its log-probability
    under the history the snapshot was computed from, and the history items it rests on
    (same category, newest first). ``basis``: "stated" (the model named the category before
    the item) or "answer" (the category's share of the model's ranked answer)."""

    category: int
    logprob: float
    evidence: tuple[str, ...] = ()
    basis: Basis = "stated"


class RationaleError(ValueError):
    """A stored rationale list that does not decode."""


def pack_rationales(rationales: Sequence[Rationale]) -> bytes:
    """msgpack ``[[category, logprob, [item ids]] (+ 1 for basis "answer"), ...]``: a few
    dozen bytes per user; a stated rationale keeps the three-field form older readers know."""
    body = [
        [r.category, round(float(r.logprob), 4), list(r.evidence)]
        + ([1] if r.basis == "answer" else [])
        for r in rationales
    ]
    return msgpack.packb(body, use_bin_type=True)


def unpack_rationales(raw: bytes) -> tuple[Rationale, ...]:
    try:
        body = msgpack.unpackb(raw, raw=False)
        return tuple(_rationale(*fields) for fields in body)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise RationaleError(f"rationales do not decode: {exc!r}") from exc


def _rationale(category: Any, logprob: Any, evidence: Any, basis: Any = 0) -> Rationale:
    if not isinstance(evidence, list) or basis not in (0, 1):
        raise ValueError("a rationale is [category, logprob, [item ids], basis?]")
    kind: Basis = "answer" if basis else "stated"
    return Rationale(int(category), float(logprob), tuple(str(i) for i in evidence), kind)


class RationaleSettings(BaseModel):
    """How an answer's rationale weighs the answer against the history (``serving.json``'s
    ``rationale``, learned by ``thinkahead tune-blend``). The defaults are the answer alone."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(
        default=1.0, gt=0, description="the answer's scores are divided by it before the softmax"
    )
    history_weight: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="the history's category shares' weight against the answer's (1 - it)",
    )
    history_decay: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="each history item counts this much less than the one after it",
    )


ANSWER_ALONE = RationaleSettings()
# Without a serving.json that holds one: what tune-blend learned on Beauty's validation split
# (top-1 .159 against .120 for the answer alone and .121 for the history's most frequent
# category), the default for any catalog, tuned on nothing of its own.
DEFAULT_RATIONALE = RationaleSettings(temperature=16.0, history_weight=0.4, history_decay=1.0)


def history_shares(categories_of: Sequence[int], decay: float) -> dict[int, float]:
    """Each category's share of the history (oldest first), the newest item weighing 1 and
    each older one ``decay`` times the next; items with no category count for nothing."""
    weights: dict[int, float] = {}
    w, total = 1.0, 0.0
    for cat in reversed(categories_of):
        if cat != NO_CATEGORY:
            weights[cat] = weights.get(cat, 0.0) + w
            total += w
        w *= decay
    return {c: v / total for c, v in weights.items()} if total > 0 else {}


def answer_rationales(
    ranked: Sequence[tuple[str, float]],
    categories: Categories,
    category_of: dict[str, int],
    history: Sequence[str],
    keep: int = RATIONALES_KEPT,
    settings: RationaleSettings = ANSWER_ALONE,
) -> tuple[Rationale, ...]:
    """Where the model's answer lies: ``ranked`` (item id, log-score; best first, its top
    ``ANSWER_RATIONALE_ITEMS``) divided by the settings' temperature and normalised into
    probabilities, summed by category, mixed with the history's category shares at the
    settings' ``history_weight``; the best ``keep`` categories, each with the history items
    it rests on. Empty when no ranked item has a category."""
    top = [(i, s) for i, s in ranked[:ANSWER_RATIONALE_ITEMS] if math.isfinite(s)]
    if not top:
        return ()
    scores = np.array([s for _, s in top], dtype=np.float64) / settings.temperature
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    mass: dict[int, float] = {}
    for (item, _), p in zip(top, probs, strict=True):
        cat = category_of.get(item, NO_CATEGORY)
        if cat != NO_CATEGORY:
            mass[cat] = mass.get(cat, 0.0) + float(p)
    if not mass:
        return ()
    history_cats = [category_of.get(i, NO_CATEGORY) for i in history]
    beta = settings.history_weight
    if beta > 0:
        prior = history_shares(history_cats, settings.history_decay)
        mass = {
            c: (1 - beta) * mass.get(c, 0.0) + beta * prior.get(c, 0.0)
            for c in mass.keys() | prior.keys()
        }
    best = sorted(mass.items(), key=lambda kv: (-kv[1], kv[0]))[:keep]
    return tuple(
        Rationale(cat, math.log(p), evidence_for(cat, history, history_cats), "answer")
        for cat, p in best
    )


def evidence_for(
    category: int, history: Sequence[str], categories_of: Sequence[int], keep: int = EVIDENCE_KEPT
) -> tuple[str, ...]:
    """The newest ``keep`` distinct history items in ``category`` (``categories_of`` aligned
    with ``history``, oldest first)."""
    found: list[str] = []
    for item, cat in zip(reversed(history), reversed(categories_of), strict=True):
        if cat == category and item not in found:
            found.append(item)
            if len(found) == keep:
                break
    return tuple(found)
