"""The plain-PyTorch engine answers any prompt, not only ``history <|sid_begin|> [a [b]]``: a
reasoning model's ``history <think>`` is scored by a forward of its own, and agrees with the
model run directly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from offline.decode.torch_engine import TorchBatchEngine
from offline.train.presets import PRESETS, padded_vocab
from offline.train.tokenizer import save_tokenizer
from service.contracts.model import tokenizer_vocab
from service.contracts.tokens import TokenIds
from service.engine.base import ScoreRequest


def test_prompts_that_end_in_a_reasoning_token_are_scored_directly(tmp_path: Path) -> None:
    tok = save_tokenizer(4, tmp_path, extra_tokens=["<think>", "</think>", "<cat_0>", "<cat_1>"])
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].config(padded_vocab(len(tok)), tok.bos_token_id, 0, tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(tmp_path))
    vocab = tokenizer_vocab(tmp_path)
    ids = TokenIds.from_vocab(vocab, 4)
    engine = TorchBatchEngine(tmp_path, ids)
    think, cats = vocab["<think>"], (vocab["<cat_0>"], vocab["<cat_1>"])
    history = ids.history([(1, 2, 3), (0, 1, 2)])
    prompts = {
        "think": (*history[:-1], think),  # an item's tokens, then <think>: 5 after <|sid_begin|>
        "item": (*history, int(ids.a[1])),  # the usual shape: one item token after it
    }
    asked = [
        ScoreRequest(prompts["think"], cats, top_n=2),
        ScoreRequest(prompts["item"], tuple(int(t) for t in ids.b), top_n=4),
    ]
    got = engine.score_batch(asked)
    for request, answer in zip(asked, got, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([request.prompt])).logits[0, -1]
        expected = logits[list(request.allowed)].log_softmax(-1).tolist()
        assert sorted(answer) == sorted(request.allowed)
        assert [answer[t] for t in request.allowed] == pytest.approx(expected, abs=1e-4)
