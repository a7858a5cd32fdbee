"""The catalog artifact and its loader, shared by the service and the offline side.

Files in a catalog directory (written by ``thinkahead catalog build``):
``manifest.json``, ``codes.csv`` (item_id,a,b,c; one row per item), ``trie.npz`` (valid c's and
their item rows under each (a, b)), ``popularity.npy`` (interaction count per item row),
``report.json`` and, when the items had categories, ``categories.json`` (the rationale
vocabulary, ``service.contracts.rationale``). All lookups after load are O(1) dict/array reads.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from service.contracts.manifest import CatalogManifest, ManifestError, sha256_hex
from service.contracts.rationale import Categories
from service.contracts.tokens import Code, item_token_strings

CODES_FILE = "codes.csv"
TRIE_FILE = "trie.npz"
POPULARITY_FILE = "popularity.npy"
REPORT_FILE = "report.json"


class CatalogError(ValueError):
    """A catalog artifact is missing files or is inconsistent with its manifest."""


def catalog_version_of(item_ids: Sequence[str], codes: np.ndarray, codebook_size: int) -> str:
    """Content hash of the item -> code table: the catalog's version."""
    lines = "".join(
        f"{i}\t{a}\t{b}\t{c}\n" for i, (a, b, c) in zip(item_ids, codes.tolist(), strict=True)
    )
    return sha256_hex(f"K={codebook_size}\n".encode(), lines.encode())


def build_trie(codes: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """CSR layout of the trie: for each distinct (a, b), its c's (sorted) and their item rows."""
    prefix = codes[:, 0].astype(np.int64) * k + codes[:, 1]
    order = np.lexsort((codes[:, 2], prefix))
    keys, starts = np.unique(prefix[order], return_index=True)
    offsets = np.append(starts, len(order)).astype(np.int64)
    return {
        "prefix_keys": keys.astype(np.int64),
        "offsets": offsets,
        "c_values": codes[order, 2].astype(np.int32),
        "rows": order.astype(np.int64),
    }


@dataclass
class Catalog:
    manifest: CatalogManifest
    item_ids: list[str]
    codes: np.ndarray  # (N, 3) int
    popularity: np.ndarray  # (N,) float, interaction counts (zeros when none were given)
    # the category vocabulary rationales are made of (categories.json), when the items had one
    categories: Categories | None = field(default=None, repr=False)
    row_of: dict[str, int] = field(init=False, repr=False)
    row_by_code: dict[Code, int] = field(init=False, repr=False)
    b_under_a: dict[int, np.ndarray] = field(init=False, repr=False)
    c_under_ab: dict[tuple[int, int], np.ndarray] = field(init=False, repr=False)
    rows_under_ab: dict[tuple[int, int], np.ndarray] = field(init=False, repr=False)
    valid_a: np.ndarray = field(init=False, repr=False)
    rows_by_popularity: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        k = self.codebook_size
        self.row_of = {item: row for row, item in enumerate(self.item_ids)}
        self.row_by_code = {tuple(c): r for r, c in enumerate(self.codes.tolist())}  # type: ignore[misc]
        trie = build_trie(self.codes, k)
        self.c_under_ab, self.rows_under_ab = {}, {}
        b_lists: dict[int, list[int]] = {}
        offsets = trie["offsets"]
        for i, key in enumerate(trie["prefix_keys"].tolist()):
            a, b = divmod(key, k)
            lo, hi = offsets[i], offsets[i + 1]
            self.c_under_ab[(a, b)] = trie["c_values"][lo:hi]
            self.rows_under_ab[(a, b)] = trie["rows"][lo:hi]
            b_lists.setdefault(a, []).append(b)
        self.b_under_a = {a: np.array(bs, dtype=np.int32) for a, bs in b_lists.items()}
        self.valid_a = np.array(sorted(self.b_under_a), dtype=np.int32)
        # Stable sort so ties keep catalog order: fallbacks are deterministic.
        self.rows_by_popularity = np.argsort(-self.popularity, kind="stable")

    @cached_property
    def category_of(self) -> dict[str, int]:
        """Item id -> its category (``categories``), items without one left out; empty for a
        catalog without categories. Built once, on first use."""
        return self.categories.of_items(self.item_ids) if self.categories is not None else {}

    @property
    def codebook_size(self) -> int:
        return self.manifest.codebook_size

    @property
    def version(self) -> str:
        return self.manifest.catalog_version

    def __len__(self) -> int:
        return len(self.item_ids)

    def code_of(self, item_id: str) -> Code | None:
        row = self.row_of.get(item_id)
        return None if row is None else self.code_at(row)

    def code_at(self, row: int) -> Code:
        a, b, c = self.codes[row].tolist()
        return (a, b, c)

    def item_at(self, code: Code) -> str | None:
        row = self.row_by_code.get(tuple(code))  # type: ignore[arg-type]
        return None if row is None else self.item_ids[row]

    def valid_b(self, a: int) -> np.ndarray:
        return self.b_under_a.get(a, _EMPTY)

    def valid_c(self, a: int, b: int) -> np.ndarray:
        return self.c_under_ab.get((a, b), _EMPTY)

    def is_prefix(self, a: int, b: int) -> bool:
        return (a, b) in self.c_under_ab

    def tokens(self, item_id: str) -> list[str]:
        code = self.code_of(item_id)
        if code is None:
            raise KeyError(item_id)
        return item_token_strings(code)

    def codes_of(self, item_ids: Iterable[str]) -> tuple[list[Code], list[str]]:
        """Codes of the known ids in order, and the ids that are not in the catalog."""
        known: list[Code] = []
        unknown: list[str] = []
        for item in item_ids:
            row = self.row_of.get(item)
            if row is None:
                unknown.append(item)
            else:
                known.append(self.code_at(row))
        return known, unknown

    @classmethod
    def load(cls, directory: Path | str, verify: bool = True) -> Catalog:
        directory = Path(directory)
        try:
            manifest = CatalogManifest.load(directory)
        except ManifestError as exc:
            raise CatalogError(str(exc)) from exc
        codes_path = directory / CODES_FILE
        if not codes_path.is_file():
            raise CatalogError(f"{codes_path}: missing; is {directory} a catalog directory?")
        item_ids, codes = read_codes(codes_path)
        if len(item_ids) != manifest.num_items:
            raise CatalogError(
                f"{codes_path}: {len(item_ids)} rows but the manifest says {manifest.num_items}"
            )
        if verify:
            actual = catalog_version_of(item_ids, codes, manifest.codebook_size)
            if actual != manifest.catalog_version:
                raise CatalogError(
                    f"{codes_path}: content hash {actual} does not match manifest version "
                    f"{manifest.catalog_version}; the artifact was modified after it was built"
                )
        pop_path = directory / POPULARITY_FILE
        popularity = np.load(pop_path) if pop_path.is_file() else np.zeros(len(item_ids))
        if popularity.shape != (len(item_ids),):
            raise CatalogError(f"{pop_path}: shape {popularity.shape}, expected ({len(item_ids)},)")
        try:
            categories = Categories.load_optional(directory, len(item_ids))
        except ValueError as exc:
            raise CatalogError(str(exc)) from exc
        return cls(manifest, item_ids, codes, popularity.astype(np.float64), categories)


def read_codes(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["item_id", "a", "b", "c"]:
            raise CatalogError(f"{path}: header {header}, expected item_id,a,b,c")
        item_ids: list[str] = []
        rows: list[tuple[int, int, int]] = []
        for line_no, row in enumerate(reader, start=2):
            try:
                item, a, b, c = row
                rows.append((int(a), int(b), int(c)))
            except ValueError as exc:
                raise CatalogError(f"{path}:{line_no}: bad row {row!r}") from exc
            item_ids.append(item)
    return item_ids, np.array(rows, dtype=np.int32).reshape(-1, 3)


def write_codes(path: Path, item_ids: Sequence[str], codes: np.ndarray) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "a", "b", "c"])
        for item, (a, b, c) in zip(item_ids, codes.tolist(), strict=True):
            writer.writerow([item, a, b, c])


_EMPTY = np.zeros(0, dtype=np.int32)
