"""Rationales: what the decoder says about a user's next item before it names one.

Without a pretrained LLM the decoder reasons in the catalog's own words. Every item's first
category path (``Beauty > Makeup > Nails > Nail Polish``; a shared root is dropped) is one
*category*, spelled as one token ``<cat_{i}>`` in the decoder's vocabulary. A reasoning model's
training sequences end in ``<think> <cat_i> </think>`` before the last item, so it learns
P(category | history) and P(item | history, category) beside the plain next-item task. The
think-ahead worker takes each user's top-G categories, searches the item prefixes under each and
stores the best categories (:class:`Rationale`) in the snapshot value; the service only reads
and renders them (``include_reasoning``), at no engine cost.

A rationale is checkable: its category either is the next item's or it is not, and the items
served beside it either sit in it or do not. Its evidence is the user's history items of the
same category, newest first.

Files: ``categories.json`` in the catalog directory (written by ``thinkahead catalog build``
when the items file has a categories column): the category paths, and each catalog row's
category (-1: none).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

CATEGORIES_FILE = "categories.json"
THINK_START = "<think>"
THINK_END = "</think>"
RATIONALES_KEPT = 3  # categories stored per user
EVIDENCE_KEPT = 2  # history items stored per rationale
NO_CATEGORY = -1


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
    (same category, newest first)."""

    category: int
    logprob: float
    evidence: tuple[str, ...] = ()


class RationaleError(ValueError):
    """A stored rationale list that does not decode."""


def pack_rationales(rationales: Sequence[Rationale]) -> bytes:
    """msgpack ``[[category, logprob, [item ids]], ...]``: a few dozen bytes per user."""
    body = [[r.category, round(float(r.logprob), 4), list(r.evidence)] for r in rationales]
    return msgpack.packb(body, use_bin_type=True)


def unpack_rationales(raw: bytes) -> tuple[Rationale, ...]:
    try:
        body = msgpack.unpackb(raw, raw=False)
        return tuple(Rationale(int(c), float(lp), tuple(str(i) for i in ev)) for c, lp, ev in body)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise RationaleError(f"rationales do not decode: {exc!r}") from exc


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
