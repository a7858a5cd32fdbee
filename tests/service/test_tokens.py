from __future__ import annotations

import pytest

from offline.train.tokenizer import build_tokenizer
from service.contracts.tokens import (
    SID_BEGIN,
    SID_END,
    TokenIds,
    TokenSchemeError,
    item_text,
    item_token_strings,
)


def test_item_spelling_matches_the_contract() -> None:
    assert item_text((12, 7, 201)) == "<|sid_begin|><s_a_12><s_b_7><s_c_201><|sid_end|>"
    assert item_token_strings((0, 1, 2)) == [SID_BEGIN, "<s_a_0>", "<s_b_1>", "<s_c_2>", SID_END]


def test_tokenizer_encodes_items_as_single_tokens() -> None:
    tok = build_tokenizer(8)
    ids = TokenIds.from_vocab(tok.get_vocab(), 8)
    encoded = tok(item_text((3, 5, 7)), add_special_tokens=False)["input_ids"]
    assert encoded == ids.item((3, 5, 7))
    assert tok.convert_ids_to_tokens(encoded) == item_token_strings((3, 5, 7))


def test_history_prompt_layout() -> None:
    ids = TokenIds.from_vocab(build_tokenizer(4).get_vocab(), 4)
    prompt = ids.history([(0, 1, 2), (3, 3, 3)])
    assert prompt[0] == ids.bos
    assert prompt[1:6] == ids.item((0, 1, 2))
    assert prompt[-1] == ids.sid_begin
    assert len(prompt) == 1 + 2 * 5 + 1
    assert ids.index_of[int(ids.c[3])] == 3


def test_missing_item_tokens_are_named() -> None:
    vocab = build_tokenizer(4).get_vocab()
    with pytest.raises(TokenSchemeError, match=r"<s_a_4>"):
        TokenIds.from_vocab(vocab, 5)
