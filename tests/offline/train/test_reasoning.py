"""Reasoning and itemic alignment in the training sequences: which position predicts what, at
which level, and how often a window ends in its rationale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from offline.catalog.words import Keywords
from offline.train.reasoning import (
    CATEGORY_LEVEL,
    KEYWORD_LEVEL,
    CatalogWords,
    ReasoningData,
    rationale_prompt,
    think_prompt,
)
from offline.train.tokenizer import build_tokenizer
from service.contracts.catalog import Catalog
from service.contracts.rationale import Categories
from service.contracts.tokens import TokenIds
from tests.fake_engine import write_tiny_artifacts


@pytest.fixture
def world(tmp_path: Path) -> tuple[Catalog, ReasoningData, TokenIds, dict[int, str]]:
    catalog_dir, _ = write_tiny_artifacts(tmp_path)
    catalog = Catalog.load(catalog_dir)
    Categories.from_paths([("Nails",) if r % 2 else ("Hair", "Shampoo") for r in range(60)]).save(
        catalog_dir
    )
    Keywords(
        ("red", "matte"), tuple(("red",) if r % 3 else ("matte", "red") for r in range(60))
    ).save(catalog_dir)
    words = CatalogWords.load_optional(catalog_dir, catalog)
    assert words is not None
    tok = build_tokenizer(catalog.codebook_size, words.tokens())
    ids = TokenIds.from_vocab(tok.get_vocab(), catalog.codebook_size)
    data = ReasoningData.build(words, tok.get_vocab(), catalog, ids, rate=0.5, alignment=True)
    names = {i: t for t, i in tok.get_vocab().items()}
    return catalog, data, ids, names


def spelled(encoded, names):  # type: ignore[no-untyped-def]
    """(input token, label token, level) of every labelled position."""
    return [
        (names[int(t)], names[int(lab)], int(lv))
        for t, lab, lv in zip(encoded.input_ids, encoded.labels, encoded.levels, strict=True)
        if lab >= 0
    ]


def test_a_reasoning_window_states_the_category_before_its_last_item(world) -> None:  # type: ignore[no-untyped-def]
    catalog, data, ids, names = world
    codes = [catalog.code_at(r) for r in (0, 1, 2)]
    window = data.window(codes, ids)
    assert window is not None
    labelled = spelled(window, names)
    # item 2 plainly (3 levels), then <think> -> the last item's category, then its 3 tokens
    assert [lv for _, _, lv in labelled] == [0, 1, 2, CATEGORY_LEVEL, 0, 1, 2]
    assert labelled[3][:2] == ("<think>", f"<cat_{data.category_of[codes[2]]}>")
    a, b, c = codes[2]
    assert [lab for _, lab, _ in labelled[4:]] == [f"<s_a_{a}>", f"<s_b_{b}>", f"<s_c_{c}>"]
    # the prompts the worker uses end where training put the category and the item
    tokens = window.input_ids.tolist()
    think_at = tokens.index(data.vocab.think_start)
    assert tokens[: think_at + 1] == think_prompt(ids, data.vocab, codes[:2])
    cat = data.category_of[codes[2]]
    assert tokens[: think_at + 4] == rationale_prompt(ids, data.vocab, codes[:2], cat)


def test_alignment_ties_each_item_to_its_words_and_back(world) -> None:  # type: ignore[no-untyped-def]
    catalog, data, _, names = world
    assert len(data.alignment) == 2 * len(catalog)
    describe, find = (spelled(e, names) for e in data.alignment[:2])
    # row 0: Hair > Shampoo (category 0: as many items as Nails, first by name), matte + red
    assert describe[0][0] == "<describe>" and describe[0][2] == CATEGORY_LEVEL
    assert [lv for _, _, lv in describe[1:]] == [KEYWORD_LEVEL, KEYWORD_LEVEL]
    assert {lab for _, lab, _ in describe[1:]} == {"<kw_0>", "<kw_1>"}
    a, b, c = catalog.code_at(0)
    assert [lab for _, lab, _ in find] == [f"<s_a_{a}>", f"<s_b_{b}>", f"<s_c_{c}>"]
    assert find[0][0] == "<|sid_begin|>"


def test_the_rationale_rate_is_the_share_of_windows_that_reason(world) -> None:  # type: ignore[no-untyped-def]
    from offline.train.dataset import encode
    from offline.train.trainer import Prepared, augmented

    catalog, data, ids, _ = world
    windows = [[catalog.code_at(r), catalog.code_at(r + 1)] for r in range(0, 58)]
    prepared = Prepared(
        catalog, ids, [encode(w, ids) for w in windows], windows, [], 0, "h", 2000, data
    )
    epoch = augmented(prepared, 0.0, np.random.default_rng(0))
    reasoned = sum(data.vocab.think_start in e.input_ids.tolist() for e in epoch[: len(windows)])
    assert 0.3 * len(windows) < reasoned < 0.7 * len(windows)
    assert len(epoch) == len(windows) + len(data.alignment)
