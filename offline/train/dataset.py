"""Training sequences as token ids with next-item labels, bucketed into batches by length."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.contracts.tokens import Code, TokenIds

if TYPE_CHECKING:
    import torch

IGNORE = -100
TOKENS_PER_ITEM = 5
# Position of a, b, c inside one item's 5 tokens (<|sid_begin|> a b c <|sid_end|>).
LEVEL_OFFSETS = (1, 2, 3)


def windows(codes: Sequence[Code], max_history: int, stride: int | None = None) -> list[list[Code]]:
    """Cut a long sequence so that every target has at most ``max_history`` items before it;
    windows end at the sequence's end and every ``stride`` items before it."""
    span = max_history + 1
    if len(codes) <= span:
        return [list(codes)] if len(codes) >= 2 else []
    stride = stride or max(1, max_history // 2)
    out = []
    end = len(codes)
    while end > 1:
        out.append(list(codes[max(0, end - span) : end]))
        if end - span <= 0:
            break
        end -= stride
    return out


@dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray  # (T,)
    labels: np.ndarray  # (T,) next-token targets, IGNORE except item tokens of items 2..n
    levels: np.ndarray  # (T,) 0/1/2 for the level each label belongs to, -1 elsewhere
    # with a teacher (offline/train/distill.py): its prediction's row for each target item
    teacher_rows: np.ndarray | None = None


def encode(codes: Sequence[Code], ids: TokenIds) -> Encoded:
    tokens = [] if ids.bos is None else [ids.bos]
    start = len(tokens)
    for code in codes:
        tokens.extend(ids.item(code))
    input_ids = np.array(tokens, dtype=np.int64)
    labels = np.full(len(tokens), IGNORE, dtype=np.int64)
    levels = np.full(len(tokens), -1, dtype=np.int64)
    # Position p predicts token p+1. Items from the second on are targets.
    for i in range(1, len(codes)):
        base = start + i * TOKENS_PER_ITEM
        for level, off in enumerate(LEVEL_OFFSETS):
            labels[base + off - 1] = tokens[base + off]
            levels[base + off - 1] = level
    return Encoded(input_ids, labels, levels)


Batch = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor | None"]


def batches(
    encoded: Sequence[Encoded], batch_size: int, pad: int, rng: np.random.Generator | None
) -> Iterator[Batch]:
    """Right-padded batches of similar length (sorted, then chunked, chunks shuffled): token
    ids, attention mask, labels, label levels, and the teacher's rows for the batch's target
    items in label order (None unless every sequence has them)."""
    import torch  # here: the encoders are imported by jobs that never train

    order = np.argsort([len(e.input_ids) for e in encoded], kind="stable")
    if rng is not None:
        # Shuffle within length ties so batches differ between epochs.
        noise = rng.random(len(order))
        order = np.lexsort((noise, [len(encoded[i].input_ids) for i in range(len(encoded))]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(chunks)
    for chunk in chunks:
        width = max(len(encoded[i].input_ids) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        levels = torch.full((len(chunk), width), -1, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            e = encoded[i]
            n = len(e.input_ids)
            ids[row, :n] = torch.from_numpy(e.input_ids)
            labels[row, :n] = torch.from_numpy(e.labels)
            levels[row, :n] = torch.from_numpy(e.levels)
            mask[row, :n] = 1
        rows = [encoded[i].teacher_rows for i in chunk]
        teacher = (
            None
            if any(r is None for r in rows)
            else torch.from_numpy(np.concatenate(rows).astype(np.int64))  # type: ignore[arg-type]
        )
        yield ids, mask, labels, levels, teacher
