"""Settings of ``thinkahead train-items`` (no torch import: the CLI reads its defaults here)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from offline.selection import VAL_TAIL
from service.contracts.manifest import MAX_HISTORY

# Models per item-level ensemble (``train-items --members``; offline/items/ensemble.py), their
# mean logit served. On Beauty validation (all 22,363 users), alone: one model R@10 .1198 /
# N@10 .0717, two .1248 / .0754, three .1276 / .0763, four .1281 / .0767. The 4th lifts the
# decoder distilled from them on both catalog builds measured (validation R@10 / N@10 +.0020 /
# +.0006 and +.0030 / +.0028); each member 20 epochs, ~7.5 min on 2 idle cores
# (benchmarks/beauty/HISTORY.md, December 5).
DEFAULT_MEMBERS = 4


class ItemTrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # The defaults are BSARec's Beauty recipe with lr 1e-3, chosen on Beauty validation (all
    # 22,363 users, each run capped at 20 min): R@10 .1179 / N@10 .0708 against .1048 / .0625
    # for the previous default (SASRec, 256-d, 1 block, a loss at every position); the filter
    # alone is worth +6% N@10 (.0697 vs .0690 without it at the same epoch budget), one-example-
    # per-prefix training +5%. Item vectors 64-d: a quarter of the bytes. History and what did
    # not help: benchmarks/beauty/HISTORY.md.
    dim: int = Field(default=64, ge=8)
    blocks: int = Field(default=2, ge=1)
    heads: int = Field(default=1, ge=1)
    max_len: int = Field(default=MAX_HISTORY, ge=2)
    # 0.5, as SASRec for the sparse Amazon sets: with the full softmax on Beauty validation it
    # levels off at R@10 .097 / N@10 .0589 (epochs 15-19) where 0.2 peaks at .0961 / .0589 at
    # epoch 10 and falls after
    dropout: float = Field(default=0.5, ge=0, lt=1)
    # The exact softmax over every item where the logits fit (Beauty's 12k items: best val
    # N@10 .0589 at epoch 10 vs .0574 with 256 negatives per position and .0568 with 2048
    # shared); beyond, a sampled softmax over ``negatives`` uniform items shared per batch
    # (2048: val R@10 .0919 vs .0875 with 256 shared).
    full_softmax_items: int = Field(
        default=50_000, ge=0, description="catalogs up to this size train with the full softmax"
    )
    negatives: int = Field(default=2048, ge=1)
    # 20: Beauty validation levels off from epoch ~16 (.0712 at 16, .0717 at the best, 25, of a
    # 30-epoch run); an ensemble member spends its minutes better than a longer single run
    epochs: int = Field(default=20, ge=1)
    patience: int = Field(default=10, ge=1, description="validated epochs without gain")
    # A validation pass (all users, full ranking) is ~7 s beside ~27 s of training per epoch on
    # Beauty; the best epoch was 19-20 of 20 and 25 of 30 in the ensemble's runs
    val_tail: float = VAL_TAIL
    batch_size: int = Field(default=256, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    max_minutes: float | None = Field(default=None, gt=0)
    seed: int = 0
    # The block (service.contracts.item_network): "attention" (SASRec) or "bsarec" (BSARec,
    # AAAI 2024: alpha x a low-pass/high-pass frequency filter + (1 - alpha) x self-attention).
    # The official Beauty recipe: dim 64, blocks 2, heads 1, dropout 0.5, alpha 0.7, c 5,
    # lr 5e-4, batch 256, prefixes.
    mixer: Literal["attention", "bsarec"] = Field(
        default="bsarec", description="the block: attention (SASRec) or bsarec"
    )
    alpha: float = Field(default=0.7, ge=0, le=1, description="bsarec: the filter's share")
    c: int = Field(
        default=5, ge=1, description="bsarec: the filter keeps the c // 2 + 1 lowest frequencies"
    )
    # Every prefix of a training sequence its own example, the newest item at the last
    # position and the loss there only (as BSARec / FMLP-Rec), instead of one sequence per user
    # with a loss at every position: the same targets, ~7x the encoder work on Beauty, and the
    # newest item always at the position it has when serving. Required by bsarec, whose filter
    # sees newer items.
    prefixes: bool = Field(
        default=True,
        description="every prefix its own example, the loss at its last position (bsarec needs it)",
    )

    @model_validator(mode="after")
    def _filter_needs_prefixes(self) -> ItemTrainConfig:
        if self.mixer == "bsarec" and not self.prefixes:
            raise ValueError(
                "mixer bsarec needs prefixes=True: its frequency filter sees the whole window, "
                "so a loss at every position would see the targets"
            )
        return self
