"""The item-token contract: how a 3-token semantic ID is spelled in the decoder's vocabulary.

``<|sid_begin|><s_a_12><s_b_7><s_c_201><|sid_end|>`` is one item; the format of the public
OneRec-Think / OpenOneRec checkpoints, so theirs can be served by pointing at them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SID_BEGIN = "<|sid_begin|>"
SID_END = "<|sid_end|>"
PAD = "<|pad|>"
BOS = "<|bos|>"
EOS = "<|eos|>"
LEVELS = ("a", "b", "c")
SPECIAL_TOKENS = (PAD, BOS, EOS, SID_BEGIN, SID_END)

Code = tuple[int, int, int]


def level_token(level: str, index: int) -> str:
    return f"<s_{level}_{index}>"


def item_token_strings(code: Code) -> list[str]:
    return [SID_BEGIN, *(level_token(lv, i) for lv, i in zip(LEVELS, code, strict=True)), SID_END]


def item_text(code: Code) -> str:
    return "".join(item_token_strings(code))


def all_item_tokens(codebook_size: int) -> list[str]:
    return [level_token(lv, i) for lv in LEVELS for i in range(codebook_size)]


class TokenSchemeError(ValueError):
    """The tokenizer lacks tokens the contract needs."""


@dataclass(frozen=True)
class TokenIds:
    """Token ids of the contract resolved against one tokenizer's vocabulary.

    Arrays map a code index to a token id; ``level_of`` maps a token id back to its index in
    its level, so engine outputs can be decoded without string work on the hot path.
    """

    codebook_size: int
    sid_begin: int
    sid_end: int
    bos: int | None
    eos: int | None
    pad: int | None
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    index_of: Mapping[int, int]

    @classmethod
    def from_vocab(cls, vocab: Mapping[str, int], codebook_size: int) -> TokenIds:
        missing = [t for t in (SID_BEGIN, SID_END) if t not in vocab]
        missing += [t for t in all_item_tokens(codebook_size) if t not in vocab]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise TokenSchemeError(
                f"tokenizer lacks {len(missing)} item token(s) needed for "
                f"K={codebook_size}: {shown}"
            )
        levels = {
            lv: np.array([vocab[level_token(lv, i)] for i in range(codebook_size)], dtype=np.int64)
            for lv in LEVELS
        }
        index_of = {int(t): i for arr in levels.values() for i, t in enumerate(arr)}
        return cls(
            codebook_size=codebook_size,
            sid_begin=vocab[SID_BEGIN],
            sid_end=vocab[SID_END],
            bos=vocab.get(BOS),
            eos=vocab.get(EOS),
            pad=vocab.get(PAD),
            a=levels["a"],
            b=levels["b"],
            c=levels["c"],
            index_of=index_of,
        )

    def item(self, code: Code) -> list[int]:
        a, b, c = code
        return [self.sid_begin, int(self.a[a]), int(self.b[b]), int(self.c[c]), self.sid_end]

    def history(self, codes: Iterable[Code]) -> list[int]:
        """Prompt ids for a history, ending with ``<|sid_begin|>`` so the next token is an a."""
        ids: list[int] = [] if self.bos is None else [self.bos]
        for code in codes:
            ids.extend(self.item(code))
        ids.append(self.sid_begin)
        return ids

    def level_ids(self, level: str, indices: Sequence[int] | np.ndarray) -> list[int]:
        table = {"a": self.a, "b": self.b, "c": self.c}[level]
        return table[np.asarray(indices, dtype=np.int64)].tolist()
