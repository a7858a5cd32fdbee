"""``TrainConfig``: the training run's settings (light to import: the CLI reads its defaults)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from service.contracts.manifest import MAX_HISTORY


class TrainConfig(BaseModel):
    preset: str = "small"
    # 12 epochs with the cosine decay reaching its floor at the end: better than a 40-epoch
    # schedule cut by early stopping while the rate is still high, and within 45 minutes
    epochs: int = Field(default=12, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    warmup_steps: int = Field(default=200, ge=0)
    embed_dropout: float = Field(
        default=0.1, ge=0, lt=1, description="dropout on the input token embeddings"
    )
    item_dropout: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="each epoch, drop each history item of a training sequence with this p",
    )
    bf16: bool | None = Field(default=None, description="bf16 autocast; None: where native")
    max_history: int = Field(default=MAX_HISTORY, ge=1)
    val_users: int = Field(default=3000, ge=0, description="validation sample for early stopping")
    test_shaped_validation: bool = Field(
        default=True,
        description="withhold the validation sample's last training item from training, so that "
        "selection sees the test case's shape: a history ending in an item unseen in that context",
    )
    val_beam: int = Field(default=20, ge=10)
    patience: int = Field(default=3, ge=1)
    max_minutes: float | None = Field(default=None, gt=0)
    seed: int = 0
    threads: int | None = None
    refit: bool = Field(
        default=False,
        description="train on train + validation for exactly `epochs` epochs (the serving "
        "model; no selection on validation, whose items it trains on)",
    )
    resume: bool = Field(default=True, description="continue a killed run from its checkpoint")
    low_memory: bool = Field(
        default=False,
        description="pin glibc's malloc thresholds: resident memory stays near the live tensors "
        "(0.7 vs 4.0 GB after 80 Beauty steps) at a cost in speed (offline/train/memory.py)",
    )
