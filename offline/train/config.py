"""``TrainConfig`` and ``DpoConfig``: the training runs' settings (light to import: the CLI reads
their defaults)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from offline.selection import VAL_TAIL
from service.contracts.manifest import MAX_HISTORY


class TrainConfig(BaseModel):
    preset: str = "small"
    # The cosine decay reaches its floor at the end: better than a 40-epoch schedule cut by
    # early stopping while the rate is still high. Distilled at alpha 0.8, 16 epochs beat 12 on
    # validation (.1193 / .0678 at epoch 14 against .1173 / .0671) in about the same time once
    # only the last third is validated (benchmarks/beauty/HISTORY.md)
    epochs: int = Field(default=16, ge=1)
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
    teacher: Path | None = Field(
        default=None,
        description="item-level model (or ensemble) directory to distill from: its next-item "
        "distribution joins the targets of levels a and b (offline/train/distill.py)",
    )
    # chosen on Beauty's validation sample among 0.2, 0.5 and 0.8 (R@10 .1123 / .1133 / .1173;
    # without a teacher .1097): benchmarks/beauty/HISTORY.md
    distill_alpha: float = Field(
        default=0.8, ge=0, le=1, description="weight of the teacher's targets against the true ones"
    )
    distill_levels: int = Field(
        default=2,
        ge=1,
        le=3,
        description="how many of the code's levels (a, b, c) take the teacher's targets",
    )
    distill_top_k: int = Field(
        default=100, ge=1, description="the teacher's best items per position that make its targets"
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
    # Each validation costs ~40% of an epoch on Beauty (38 s beside ~62 s of training); under the
    # cosine decay the best epoch lies at the end (10-12 of 12 in five Beauty runs, 14 of 16)
    val_tail: float = VAL_TAIL
    # checkpoint averaging: on all of Beauty's validation users the mean of epochs 12-16 beat
    # the epoch the 3,000-user sample picked, R@10 .1101 / N@10 .0626 against .1073 / .0602
    # (benchmarks/beauty/HISTORY.md)
    tail_average: bool = Field(
        default=True,
        description="the model is the mean weights of the validated epochs (fewer than two "
        "validated: the best epoch by the selection key, as without it)",
    )
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
    reasoning: bool = Field(
        default=False,
        description="with a catalog that has categories: a share of the training windows (see "
        "rationale_rate) end in <think> <category> </think> before their last item, so the "
        "model states the next item's category first; the worker then thinks in G categories",
    )
    rationale_rate: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="share of windows that end in a rationale each epoch (the rest train the "
        "last item plainly, as the service scores it)",
    )
    alignment: bool = Field(
        default=False,
        description="with a catalog that has categories: also train item -> its category and "
        "title keywords, and category -> its items (itemic alignment)",
    )
    low_memory: bool = Field(
        default=False,
        description="pin glibc's malloc thresholds: resident memory stays near the live tensors "
        "(0.7 vs 4.0 GB after 80 Beauty steps) at a cost in speed (offline/train/memory.py)",
    )


class DpoConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(default=2, ge=1, description="DPO epochs (rollouts refreshed each)")
    beta: float = Field(default=0.1, gt=0, description="DPO temperature")
    rollouts: int = Field(default=10, ge=2, description="items per user's rollout (beam width)")
    rejected: int = Field(default=4, ge=1, description="rollout items each true item beats")
    sft_weight: float = Field(default=0.2, ge=0, description="weight of the true item's NLL")
    lr: float = Field(default=5e-5, gt=0)
    batch_users: int = Field(default=64, ge=1)
    val_users: int = Field(default=3000, ge=0)
    val_beam: int = Field(default=20, ge=10)
    max_users: int | None = Field(default=None, ge=1, description="a sample of training users")
    seed: int = 0
