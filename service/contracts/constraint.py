"""Trie constraint over (a, b, c) with excluded items applied exactly.

An excluded item removes its c from its (a, b); a prefix left with no c, and an a left with no
b, disappear too, so a search under the constraint never reaches a dead end and never asks the
engine with an empty allowed set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from service.contracts.tokens import Code


class Trie(Protocol):
    """The valid codes a constraint starts from: a catalog, or a subset of one."""

    @property
    def valid_a(self) -> np.ndarray: ...

    def valid_b(self, a: int) -> np.ndarray: ...

    def valid_c(self, a: int, b: int) -> np.ndarray: ...

    def is_prefix(self, a: int, b: int) -> bool: ...


class Constraint:
    def __init__(self, catalog: Trie, exclude: Iterable[Code] = ()) -> None:
        self.catalog = catalog
        self._removed_c: dict[tuple[int, int], set[int]] = {}
        for a, b, c in exclude:
            if catalog.is_prefix(a, b):
                self._removed_c.setdefault((a, b), set()).add(c)
        self._dead_ab = {
            ab for ab, cs in self._removed_c.items() if len(cs) >= len(catalog.valid_c(*ab))
        }
        dead_b_by_a: dict[int, set[int]] = {}
        for a, b in self._dead_ab:
            dead_b_by_a.setdefault(a, set()).add(b)
        self._dead_b_by_a = dead_b_by_a
        self._dead_a = {a for a, bs in dead_b_by_a.items() if len(bs) >= len(catalog.valid_b(a))}

    def a_values(self) -> np.ndarray:
        valid = self.catalog.valid_a
        if not self._dead_a:
            return valid
        return valid[~np.isin(valid, list(self._dead_a))]

    def b_values(self, a: int) -> np.ndarray:
        valid = self.catalog.valid_b(a)
        dead = self._dead_b_by_a.get(a)
        return valid if not dead else valid[~np.isin(valid, list(dead))]

    def c_values(self, a: int, b: int) -> np.ndarray:
        valid = self.catalog.valid_c(a, b)
        removed = self._removed_c.get((a, b))
        return valid if not removed else valid[~np.isin(valid, list(removed))]

    def has_prefix(self, a: int, b: int) -> bool:
        return self.catalog.is_prefix(a, b) and (a, b) not in self._dead_ab

    def allows(self, code: Code) -> bool:
        a, b, c = code
        return self.has_prefix(a, b) and c not in self._removed_c.get((a, b), ())


_EMPTY = np.zeros(0, dtype=np.int32)


class CatalogSubset:
    """The trie of some of a catalog's items (one category's, for a rationale): a
    :class:`Constraint` over it reaches only those items. Built once per subset."""

    def __init__(self, codes: Sequence[Code]) -> None:
        c_under: dict[tuple[int, int], list[int]] = {}
        for a, b, c in codes:
            c_under.setdefault((int(a), int(b)), []).append(int(c))
        self._c = {ab: np.array(sorted(cs), dtype=np.int32) for ab, cs in c_under.items()}
        b_under: dict[int, list[int]] = {}
        for a, b in self._c:
            b_under.setdefault(a, []).append(b)
        self._b = {a: np.array(sorted(bs), dtype=np.int32) for a, bs in b_under.items()}
        self._a = np.array(sorted(self._b), dtype=np.int32)

    @property
    def valid_a(self) -> np.ndarray:
        return self._a

    def valid_b(self, a: int) -> np.ndarray:
        return self._b.get(a, _EMPTY)

    def valid_c(self, a: int, b: int) -> np.ndarray:
        return self._c.get((a, b), _EMPTY)

    def is_prefix(self, a: int, b: int) -> bool:
        return (a, b) in self._c

    def __len__(self) -> int:
        return sum(len(cs) for cs in self._c.values())
