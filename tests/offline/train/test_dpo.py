"""The preference stage: its loss prefers the true item, its pairs are the rollouts the true
item did not beat, and a run on the tiny world keeps only an epoch that beats the supervised
model on validation."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from offline.train.config import DpoConfig
from offline.train.dpo import Pair, _flatten, dpo_loss


def pair(rejected: int = 2) -> Pair:
    return Pair(
        [(0, 0, 0)],
        (1, 1, 1),
        [(2, 2, 2), (3, 3, 3)][:rejected],
        [1.0 / math.log2(r + 2) for r in range(rejected)],
    )


def test_the_loss_falls_as_the_policy_moves_toward_the_true_item() -> None:
    cfg = DpoConfig(beta=0.5, sft_weight=0.0)
    pairs = [pair()]
    _, items, starts = _flatten(pairs)
    assert items == [(1, 1, 1), (2, 2, 2), (3, 3, 3)] and starts == [0]
    reference = torch.tensor([-3.0, -2.0, -2.5])
    same = dpo_loss(reference.clone(), reference, pairs, starts, cfg)
    assert same.item() == torch.nn.functional.softplus(torch.tensor(0.0)).item()  # log 2
    toward = dpo_loss(torch.tensor([-2.0, -2.0, -2.5]), reference, pairs, starts, cfg)
    away = dpo_loss(torch.tensor([-3.0, -1.0, -2.5]), reference, pairs, starts, cfg)
    assert toward < same < away


def test_the_higher_ranked_wrong_item_weighs_more() -> None:
    cfg = DpoConfig(beta=1.0, sft_weight=0.0)
    pairs = [pair()]
    reference = torch.zeros(3)
    # the same margin lost against the first-ranked vs the second-ranked rollout
    first = dpo_loss(torch.tensor([0.0, 1.0, 0.0]), reference, pairs, [0], cfg)
    second = dpo_loss(torch.tensor([0.0, 0.0, 1.0]), reference, pairs, [0], cfg)
    assert first > second


def test_a_dpo_run_on_the_tiny_world(tiny_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    from offline.train.dpo import train_dpo
    from service.contracts.catalog import Catalog
    from service.contracts.model import load_model_info

    cfg = DpoConfig(epochs=1, max_users=120, val_users=100, rollouts=5, rejected=2, lr=1e-4)
    out = tmp_path / "dpo"
    manifest = train_dpo(
        tiny_world.model_dir,
        tiny_world.catalog_dir,
        tiny_world.interactions_csv,
        out,
        cfg,
        progress=False,
    )
    info = load_model_info(out, Catalog.load(tiny_world.catalog_dir))  # serves like any model
    assert info.manifest.parameters["stage"] == "dpo"
    (row,) = manifest.metrics["history"]
    assert row["pairs"] > 0 and math.isfinite(row["loss"])
    supervised = manifest.metrics["supervised"]["ndcg@10"]
    kept = manifest.parameters["dpo_kept_epoch"]
    ours = load_file(str(out / "model.safetensors"))
    theirs = load_file(str(tiny_world.model_dir / "model.safetensors"))
    changed = any(not torch.equal(ours[k], theirs[k]) for k in ours)
    # an epoch is kept only if it beat the supervised model on validation, else its weights
    assert changed == (kept == 1)
    if kept:
        assert manifest.metrics["validation"]["ndcg@10"] > supervised
