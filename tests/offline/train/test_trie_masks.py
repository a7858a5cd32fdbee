"""The softmax each training label runs over: its level, or its prefix's children in the trie."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offline.train.dataset import IGNORE, batches, encode
from offline.train.tokenizer import build_tokenizer
from offline.train.trie_masks import LevelMasks, TrieMasks
from service.contracts.tokens import TokenIds
from tests.helpers import tiny_catalog

# (0,0,0) (0,0,1) (0,1,0) (1,0,0) (1,0,2)
SEQUENCE = [(0, 0, 1), (1, 0, 2), (0, 1, 0), (0, 0, 0), (1, 0, 0)]


def _batch() -> tuple[TokenIds, torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = TokenIds.from_vocab(build_tokenizer(4).get_vocab(), 4)
    enc = encode(SEQUENCE, ids)
    input_ids, _, labels, levels = next(batches([enc], 1, ids.pad or 0, None))
    return ids, input_ids, labels, levels


def test_each_label_runs_over_its_prefixs_children_in_the_trie() -> None:
    ids, input_ids, labels, levels = _batch()
    vocab = max(ids.index_of) + 1
    sel = labels != IGNORE
    masks = TrieMasks(tiny_catalog(), ids, vocab).masks(input_ids, levels, sel)
    allowed = [sorted(ids.index_of[int(t)] for t in row.nonzero().flatten()) for row in masks]
    expected = []
    for a, b, _ in SEQUENCE[1:]:
        children_of_ab = sorted(
            c for (x, y, c) in tiny_catalog().codes.tolist() if (x, y) == (a, b)
        )
        expected += [[0, 1], [0, 1] if a == 0 else [0], children_of_ab]
    assert allowed == expected
    assert masks[torch.arange(len(masks)), labels[sel]].all()  # the target is always allowed


def test_trie_softmax_is_the_level_softmax_renormalised_over_the_trie() -> None:
    ids, input_ids, labels, levels = _batch()
    vocab = max(ids.index_of) + 1
    sel = labels != IGNORE
    logits = torch.randn(int(sel.sum()), vocab)
    level = LevelMasks(ids, vocab).masks(input_ids, levels, sel)
    trie = TrieMasks(tiny_catalog(), ids, vocab).masks(input_ids, levels, sel)
    assert (level | trie).equal(level)  # the trie's children are tokens of the label's level
    nll_level = F.cross_entropy(
        logits.masked_fill(~level, float("-inf")), labels[sel], reduction="none"
    )
    nll_trie = F.cross_entropy(
        logits.masked_fill(~trie, float("-inf")), labels[sel], reduction="none"
    )
    assert (nll_trie <= nll_level + 1e-6).all() and (nll_trie < nll_level).any()
    only_child = trie.sum(-1) == 1  # a = 1 has one b, (0, 1) one c: certain, no loss
    assert only_child.any() and torch.allclose(nll_trie[only_child], torch.zeros(1))
