"""Which tokens each training label's softmax runs over.

Constrained decoding scores an item as the product of three softmaxes, each renormalised over the
children of the prefix so far in the catalog trie. Training can use the same distribution (the
softmax of every label over its prefix's children: the item's exact probability under the trie)
or a looser one (over every token of the label's level, which is all the model ever sees
otherwise).
"""

from __future__ import annotations

from typing import Protocol

import torch

from service.contracts.catalog import Catalog
from service.contracts.tokens import TokenIds


class LabelMasks(Protocol):
    def masks(
        self, input_ids: torch.Tensor, levels: torch.Tensor, sel: torch.Tensor
    ) -> torch.Tensor:
        """(selected positions, vocab): the tokens each selected label's softmax runs over."""
        ...


class LevelMasks:
    """Every token of the label's level."""

    def __init__(self, ids: TokenIds, vocab: int) -> None:
        self.table = torch.zeros((3, vocab), dtype=torch.bool)
        for level, tokens in enumerate((ids.a, ids.b, ids.c)):
            self.table[level, torch.from_numpy(tokens)] = True

    def masks(
        self, input_ids: torch.Tensor, levels: torch.Tensor, sel: torch.Tensor
    ) -> torch.Tensor:
        return self.table[levels[sel]]


class TrieMasks:
    """Allowed tokens of every trie node as rows of one boolean table: row 0 is the root (the
    catalog's a's), row 1 + a the b's under a, row 1 + K + p the c's under the p-th (a, b)."""

    def __init__(self, catalog: Catalog, ids: TokenIds, vocab: int) -> None:
        k = catalog.codebook_size
        prefixes = sorted(catalog.c_under_ab)
        self.table = torch.zeros((1 + k + len(prefixes), vocab), dtype=torch.bool)
        self.table[0, torch.from_numpy(ids.a[catalog.valid_a])] = True
        for a, bs in catalog.b_under_a.items():
            self.table[1 + a, torch.from_numpy(ids.b[bs])] = True
        # (a, b) -> its row; an (a, b) that is no prefix never occurs as a training label's context
        self.prefix_row = torch.zeros((k, k), dtype=torch.long)
        for p, (a, b) in enumerate(prefixes):
            self.table[1 + k + p, torch.from_numpy(ids.c[catalog.c_under_ab[(a, b)]])] = True
            self.prefix_row[a, b] = 1 + k + p
        # token id -> its index within its level (a and b tokens; 0 for every other token)
        self.index_in_level = torch.zeros(vocab, dtype=torch.long)
        for table in (ids.a, ids.b):
            self.index_in_level[torch.from_numpy(table)] = torch.arange(k)

    def rows(self, input_ids: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """The table row of every position: the label at position t is the level-``levels[t]``
        token of an item whose earlier tokens are at t (b) and t - 1 (a)."""
        current = self.index_in_level[input_ids]
        previous = torch.zeros_like(current)
        previous[:, 1:] = current[:, :-1]
        under_b = self.prefix_row[previous, current]
        return torch.where(levels == 0, 0, torch.where(levels == 1, 1 + current, under_b))

    def masks(
        self, input_ids: torch.Tensor, levels: torch.Tensor, sel: torch.Tensor
    ) -> torch.Tensor:
        return self.table[self.rows(input_ids, levels)[sel]]


def label_masks(catalog: Catalog, ids: TokenIds, vocab: int, trie: bool) -> LabelMasks:
    return TrieMasks(catalog, ids, vocab) if trie else LevelMasks(ids, vocab)
