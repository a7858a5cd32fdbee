"""Settings of ``thinkahead train-items`` (no torch import: the CLI reads its defaults here)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.contracts.manifest import MAX_HISTORY


class ItemTrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # 256, as the eSASRec benchmark's leave-one-out config for Beauty (its hyper-parameter table
    # says 64): Beauty validation best R@10 .1059 / N@10 .0624 (epoch 10) vs .0976 / .0589 at 64
    # (epoch 16); 4x the item-vector bytes, offline only (the service reads stored scores)
    dim: int = Field(default=256, ge=8)
    blocks: int = Field(default=1, ge=1)
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
    epochs: int = Field(default=60, ge=1)
    patience: int = Field(default=5, ge=1, description="epochs without validation gain")
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    max_minutes: float | None = Field(default=None, gt=0)
    seed: int = 0
