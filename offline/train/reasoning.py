"""Reasoning and itemic alignment in the decoder's training sequences.

With the catalog's categories (``service.contracts.rationale``) the decoder learns three more
things beside plain next-item prediction, in the same token space:

- **reasoning before the item**: a training window may end in
  ``... <think> <cat_k> </think> <|sid_begin|> a b c <|sid_end|>``: the category of the last
  item is predicted first (the rationale), then the item under it. Each window does so with
  probability ``rationale_rate`` each epoch, so the last item is also trained plainly (the
  service's online step scores items without a rationale);
- **item -> words** (``<describe>``): ``<|sid_begin|> a b c <|sid_end|> <describe> <cat_k>
  <kw_i> <kw_j> ...``: an item's tokens tied to its category and its title's keywords (a
  capped vocabulary of the most frequent title words of the catalog);
- **words -> items**: ``<think> <cat_k> </think> <|sid_begin|> a b c <|sid_end|>`` with no
  history: which items a category holds.

Label levels (the softmax of each label is restricted to its level's tokens): 0-2 the item
levels, 3 the categories, 4 the keywords.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from offline.catalog.words import Keywords
from offline.train.dataset import IGNORE, LEVEL_OFFSETS, TOKENS_PER_ITEM, Encoded
from service.contracts.catalog import Catalog
from service.contracts.rationale import THINK_END, THINK_START, Categories, category_token
from service.contracts.tokens import Code, TokenIds

DESCRIBE = "<describe>"
CATEGORY_LEVEL = 3
KEYWORD_LEVEL = 4


def keyword_token(index: int) -> str:
    return f"<kw_{index}>"


@dataclass(frozen=True)
class ReasoningVocab:
    """Token ids of the reasoning vocabulary in one tokenizer."""

    think_start: int
    think_end: int
    describe: int
    categories: np.ndarray  # category index -> token id
    keywords: dict[str, int]  # keyword -> token id

    @staticmethod
    def tokens(categories: Categories, keywords: Sequence[str]) -> list[str]:
        """The extra tokens a reasoning model's tokenizer needs, in a fixed order."""
        return [
            THINK_START,
            THINK_END,
            DESCRIBE,
            *categories.tokens(),
            *(keyword_token(i) for i in range(len(keywords))),
        ]

    @classmethod
    def from_vocab(
        cls, vocab: dict[str, int], categories: Categories, keywords: Sequence[str]
    ) -> ReasoningVocab:
        return cls(
            vocab[THINK_START],
            vocab[THINK_END],
            vocab[DESCRIBE],
            np.array([vocab[category_token(i)] for i in range(len(categories))], dtype=np.int64),
            {w: vocab[keyword_token(i)] for i, w in enumerate(keywords)},
        )


def rationale_prompt(
    ids: TokenIds, rv: ReasoningVocab, history: Sequence[Code], cat: int
) -> list[int]:
    """``history <think> <cat> </think> <|sid_begin|>``: the prompt of an item under a
    rationale (the plain prompt ends in ``<|sid_begin|>``)."""
    return [
        *ids.history(history)[:-1],
        rv.think_start,
        int(rv.categories[cat]),
        rv.think_end,
        ids.sid_begin,
    ]


def think_prompt(ids: TokenIds, rv: ReasoningVocab, history: Sequence[Code]) -> list[int]:
    """``history <think>``: its next token is the rationale's category."""
    return [*ids.history(history)[:-1], rv.think_start]


def encode_reasoning(
    codes: Sequence[Code], category: int, ids: TokenIds, rv: ReasoningVocab
) -> Encoded:
    """A window whose last item comes after its category: items 2..n-1 are plain targets, the
    category and the last item reasoning ones."""
    head = list(codes[:-1])
    tokens = [] if ids.bos is None else [ids.bos]
    start = len(tokens)
    for code in head:
        tokens.extend(ids.item(code))
    think_at = len(tokens)
    tokens += [rv.think_start, int(rv.categories[category]), rv.think_end]
    last_at = len(tokens)
    tokens.extend(ids.item(codes[-1]))
    labels = np.full(len(tokens), IGNORE, dtype=np.int64)
    levels = np.full(len(tokens), -1, dtype=np.int64)
    for i in range(1, len(head)):
        _label_item(labels, levels, tokens, start + i * TOKENS_PER_ITEM)
    labels[think_at] = tokens[think_at + 1]
    levels[think_at] = CATEGORY_LEVEL
    _label_item(labels, levels, tokens, last_at)
    return Encoded(np.array(tokens, dtype=np.int64), labels, levels)


def encode_alignment(
    code: Code, category: int, keywords: Sequence[str], ids: TokenIds, rv: ReasoningVocab
) -> list[Encoded]:
    """The item -> words and words -> item sequences of one catalog item."""
    bos = [] if ids.bos is None else [ids.bos]
    out = []
    described = [*bos, *ids.item(code), rv.describe, int(rv.categories[category])]
    described += [rv.keywords[w] for w in keywords]
    labels = np.full(len(described), IGNORE, dtype=np.int64)
    levels = np.full(len(described), -1, dtype=np.int64)
    first = len(bos) + TOKENS_PER_ITEM  # the <describe> position predicts the category
    for pos in range(first, len(described) - 1):
        labels[pos] = described[pos + 1]
        levels[pos] = CATEGORY_LEVEL if pos == first else KEYWORD_LEVEL
    out.append(Encoded(np.array(described, dtype=np.int64), labels, levels))
    found = [*bos, rv.think_start, int(rv.categories[category]), rv.think_end, *ids.item(code)]
    labels = np.full(len(found), IGNORE, dtype=np.int64)
    levels = np.full(len(found), -1, dtype=np.int64)
    _label_item(labels, levels, found, len(bos) + 3)
    out.append(Encoded(np.array(found, dtype=np.int64), labels, levels))
    return out


def _label_item(labels: np.ndarray, levels: np.ndarray, tokens: Sequence[int], base: int) -> None:
    """Labels of the item whose ``<|sid_begin|>`` is at ``base``: position p predicts p + 1."""
    for level, off in enumerate(LEVEL_OFFSETS):
        labels[base + off - 1] = tokens[base + off]
        levels[base + off - 1] = level


def rationale_windows(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Which of ``n`` windows end in a rationale this epoch."""
    return rng.random(n) < rate


@dataclass(frozen=True)
class CatalogWords:
    """What a catalog says about its items in words: categories, and title keywords."""

    categories: Categories
    keywords: Keywords | None

    @classmethod
    def load_optional(cls, catalog_dir: Path, catalog: Catalog) -> CatalogWords | None:
        """None for a catalog without categories: its model trains as a plain one."""
        categories = Categories.load_optional(catalog_dir, len(catalog))
        if categories is None:
            return None
        return cls(categories, Keywords.load_optional(catalog_dir))

    def tokens(self) -> list[str]:
        return ReasoningVocab.tokens(self.categories, self.keywords.vocab if self.keywords else ())


@dataclass(frozen=True)
class ReasoningData:
    """The reasoning vocabulary's ids, each item's category, and the alignment sequences."""

    vocab: ReasoningVocab
    category_of: dict[Code, int]
    rate: float  # share of windows that end in a rationale each epoch
    alignment: list[Encoded]

    @classmethod
    def build(
        cls,
        words: CatalogWords,
        vocab: dict[str, int],
        catalog: Catalog,
        ids: TokenIds,
        rate: float,
        alignment: bool,
    ) -> ReasoningData:
        keywords = words.keywords.vocab if words.keywords is not None else ()
        rv = ReasoningVocab.from_vocab(vocab, words.categories, keywords)
        category_of = {
            catalog.code_at(r): int(c) for r, c in enumerate(words.categories.of_row) if c >= 0
        }
        sequences: list[Encoded] = []
        if alignment:
            for row, code in enumerate(catalog.codes.tolist()):
                cat = int(words.categories.of_row[row])
                if cat >= 0:
                    kw = words.keywords.of_row[row] if words.keywords is not None else ()
                    sequences += encode_alignment(tuple(code), cat, kw, ids, rv)
        return cls(rv, category_of, rate, sequences)

    def window(self, codes: Sequence[Code], ids: TokenIds) -> Encoded | None:
        """The window ending in its last item's rationale; None when that item has no
        category."""
        cat = self.category_of.get(tuple(codes[-1]), -1)  # type: ignore[arg-type]
        return encode_reasoning(codes, cat, ids, self.vocab) if cat >= 0 else None

    def masks(self, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Token masks of the category and keyword levels."""
        cats = np.zeros(vocab_size, dtype=bool)
        cats[self.vocab.categories] = True
        kws = np.zeros(vocab_size, dtype=bool)
        kws[list(self.vocab.keywords.values())] = True
        return cats, kws
