"""The items CSV: one row per item, ``item_id`` plus the text columns embedded for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from offline.data import iter_csv_rows
from offline.errors import InputError

ID_COLUMN = "item_id"
TITLE_COLUMN = "title"
# Used, in this order, when present in the header (after the title).
OPTIONAL_TEXT_COLUMNS = ("categories", "category", "brand", "description")
TEXT_SEPARATOR = " | "


@dataclass(frozen=True)
class Items:
    """Item ids and texts in file order."""

    ids: list[str]
    texts: list[str]
    text_columns: tuple[str, ...]
    source: Path

    def __len__(self) -> int:
        return len(self.ids)


def read_items(path: Path | str, text_columns: Sequence[str] | None = None) -> Items:
    """Read and validate the items file.

    Required columns: ``item_id`` and the text columns (default: ``title``, plus whichever of
    ``categories``, ``category``, ``brand``, ``description`` the header has). An item's text is
    the non-empty values of its text columns joined with `` | ``.
    """
    path = Path(path)
    explicit = tuple(text_columns) if text_columns else None
    if explicit is not None and any(not c.strip() for c in explicit):
        raise InputError(path, f"empty name in text columns {list(explicit)}")
    required = (ID_COLUMN, *(explicit or (TITLE_COLUMN,)))
    columns: tuple[str, ...] | None = explicit
    ids: list[str] = []
    texts: list[str] = []
    line_of: dict[str, int] = {}
    for line, row in iter_csv_rows(path, required):
        if columns is None:  # defaults depend on the header, known from the first row's keys
            columns = (TITLE_COLUMN, *(c for c in OPTIONAL_TEXT_COLUMNS if c in row))
        item = row[ID_COLUMN].strip()
        if not item:
            raise InputError(path, "empty item_id", line)
        if item in line_of:
            raise InputError(
                path, f"duplicate item_id {item!r} (first on line {line_of[item]})", line
            )
        line_of[item] = line
        text = TEXT_SEPARATOR.join(v for c in columns if (v := row[c].strip()))
        if not text:
            raise InputError(path, f"item {item!r} has no text in columns {list(columns)}", line)
        ids.append(item)
        texts.append(text)
    if not ids:
        raise InputError(path, "no items (the file has a header but no rows)")
    assert columns is not None
    return Items(ids, texts, columns, path)
