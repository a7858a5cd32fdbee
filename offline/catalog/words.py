"""The catalog's words: its category vocabulary and its title keywords, from the items file.

An item's category is its first path in the ``categories`` column (``A > B > C``; several paths
are joined with ``|``), with the root dropped when every item shares it (Amazon's ``Beauty``):
it would say nothing. Keywords are the catalog's most frequent title words (a capped vocabulary,
units and connectives left out); each item keeps its rarest few. Categories are a contract (the
service renders rationales with them); keywords only teach the decoder what its item tokens
mean (itemic alignment).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from offline.catalog.items import ID_COLUMN, TITLE_COLUMN
from offline.data import iter_csv_rows
from service.contracts.rationale import Categories

CATEGORY_COLUMN = "categories"
PATH_SEPARATOR = ">"
KEYWORDS_FILE = "keywords.json"
KEYWORDS_CAP = 1000
KEYWORDS_PER_ITEM = 3
_WORD = re.compile(r"[a-z][a-z'&-]{2,}")
# words that name no product: units, packaging, connectives
_STOP = frozenset(
    [
        "and",
        "the",
        "for",
        "with",
        "from",
        "by",
        "of",
        "in",
        "on",
        "to",
        "oz",
        "ounce",
        "ounces",
        "fl",
        "fluid",
        "ml",
        "pack",
        "count",
        "set",
        "piece",
        "pcs",
        "new",
        "size",
        "each",
        "per",
        "one",
        "two",
        "three",
        "inch",
        "inches",
        "lbs",
        "pound",
        "pounds",
        "gram",
        "grams",
    ]
)
ALTERNATIVES_SEPARATOR = "|"


def first_path(value: str) -> tuple[str, ...]:
    first = value.split(ALTERNATIVES_SEPARATOR, 1)[0]
    return tuple(w for part in first.split(PATH_SEPARATOR) if (w := part.strip()))


def read_categories(items_csv: Path, item_ids: list[str]) -> Categories | None:
    """The items' categories in ``item_ids`` order; None when the file has no categories
    column or no item has a category."""
    by_item: dict[str, tuple[str, ...]] = {}
    for _, row in iter_csv_rows(items_csv, (ID_COLUMN,)):
        if CATEGORY_COLUMN not in row:
            return None
        by_item[row[ID_COLUMN].strip()] = first_path(row[CATEGORY_COLUMN] or "")
    paths = [by_item.get(i, ()) for i in item_ids]
    roots = {p[0] for p in paths if p}
    if len(roots) == 1 and all(len(p) > 1 for p in paths if p):
        paths = [p[1:] for p in paths]
    if not any(paths):
        return None
    return Categories.from_paths(paths)


@dataclass(frozen=True)
class Keywords:
    """The keyword vocabulary (most frequent first) and each catalog row's keywords."""

    vocab: tuple[str, ...]
    of_row: tuple[tuple[str, ...], ...]

    def save(self, directory: Path) -> None:
        body = {"vocab": list(self.vocab), "of_row": [list(k) for k in self.of_row]}
        (Path(directory) / KEYWORDS_FILE).write_text(json.dumps(body))

    @classmethod
    def load_optional(cls, directory: Path) -> Keywords | None:
        path = Path(directory) / KEYWORDS_FILE
        if not path.is_file():
            return None
        body = json.loads(path.read_text())
        return cls(tuple(body["vocab"]), tuple(tuple(k) for k in body["of_row"]))


def read_keywords(
    items_csv: Path, item_ids: Sequence[str], cap: int = KEYWORDS_CAP
) -> Keywords | None:
    """The ``cap`` most frequent title words (in at least 3 titles), and each item's rarest
    ``KEYWORDS_PER_ITEM`` of them; None when the items have no titles."""
    titles: dict[str, str] = {}
    for _, row in iter_csv_rows(items_csv, (ID_COLUMN,)):
        titles[row[ID_COLUMN].strip()] = (row.get(TITLE_COLUMN) or "").lower()
    words = [sorted(set(_WORD.findall(titles.get(i, ""))) - _STOP) for i in item_ids]
    df = Counter(w for ws in words for w in ws)
    vocab = tuple(w for w, n in df.most_common(cap) if n >= 3)
    if not vocab:
        return None
    kept = set(vocab)
    of_row = tuple(
        tuple(sorted((w for w in ws if w in kept), key=lambda w: (df[w], w))[:KEYWORDS_PER_ITEM])
        for ws in words
    )
    return Keywords(vocab, of_row)
