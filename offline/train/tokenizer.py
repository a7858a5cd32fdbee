"""The decoder's tokenizer: special tokens plus the 3 x K item tokens of the contract.

A ``tokenizers`` WordLevel model saved through ``PreTrainedTokenizerFast`` with a Llama config:
transformers and vLLM both load it unchanged (a ``qwen2`` model type would force Qwen2Tokenizer
and mangle the vocabulary, see notes/vllm-cpu.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from service.contracts.tokens import BOS, EOS, PAD, SPECIAL_TOKENS, all_item_tokens

UNK = "<|unk|>"


def item_vocab(codebook_size: int, extra_tokens: Sequence[str] = ()) -> dict[str, int]:
    tokens = [*SPECIAL_TOKENS, UNK, *all_item_tokens(codebook_size), *extra_tokens]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def build_tokenizer(
    codebook_size: int, extra_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """``extra_tokens``: words of a reasoning vocabulary (e.g. ``<think>``, ``</think>``)."""
    vocab = item_vocab(codebook_size, extra_tokens)
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Registering every contract token as special makes "<|sid_begin|><s_a_1>..." split exactly,
    # with or without spaces between tokens.
    core.add_special_tokens(list(vocab))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=4096,
    )


def save_tokenizer(
    codebook_size: int, out_dir: Path, extra_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    tok = build_tokenizer(codebook_size, extra_tokens)
    tok.save_pretrained(str(out_dir))
    return tok
