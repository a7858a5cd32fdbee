"""Distillation from the item-level model: the teacher's distribution projected onto the
decoder's levels, the mixed loss, and a real training run with a real (tiny) teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from offline.items.artifact import ItemModel
from offline.items.config import ItemTrainConfig
from offline.items.train import train_item_model
from offline.train.distill import LevelTargets, Teacher, distilled_loss
from service.contracts.catalog import Catalog


@pytest.fixture(scope="module")
def teacher_dir(tiny_world, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("teacher") / "items"
    cfg = ItemTrainConfig(dim=16, negatives=20, epochs=3, patience=3, max_len=20)
    catalog = Catalog.load(tiny_world.catalog_dir)
    train_item_model(catalog, tiny_world.interactions_csv, out, cfg, False, False)
    return out


def test_level_targets_are_the_teachers_top_items_summed_by_level(tiny_world, teacher_dir) -> None:  # type: ignore[no-untyped-def]
    catalog = Catalog.load(tiny_world.catalog_dir)
    model = ItemModel.load(teacher_dir, catalog)
    k = 7
    teacher = Teacher(model, catalog, top_k=k)
    window = [catalog.code_at(r) for r in (3, 41, 17, 99)]
    targets = teacher.targets([window, window[:2]])
    assert targets.a.shape == (4, catalog.codebook_size)  # 3 + 1 target items
    assert torch.allclose(targets.a.sum(dim=1), torch.ones(4))
    # a window's last target is scored as the teacher scores that history when it serves:
    # its top items, softmax over their logits, summed by first token (and, among those that
    # share the true first token, by second token)
    for row, history, target in ((2, window[:3], window[3]), (3, window[:1], window[1])):
        top = model.top_items(catalog, [history], k, exclude_history=False)[0]
        probs = torch.tensor([s for _, s in top]).softmax(dim=0)
        expected_a = torch.zeros(catalog.codebook_size)
        expected_b = torch.zeros(catalog.codebook_size)
        for (code, _), p in zip(top, probs, strict=True):
            expected_a[code[0]] += p
            if code[0] == target[0]:
                expected_b[code[1]] += p
        assert torch.allclose(targets.a[row], expected_a, atol=1e-5)
        assert bool(targets.b_known[row]) == bool(expected_b.sum() > 0)
        if targets.b_known[row]:
            assert torch.allclose(targets.b[row], expected_b / expected_b.sum(), atol=1e-5)


def test_mixed_loss_is_cross_entropy_at_alpha_0_and_with_a_sure_teacher() -> None:
    torch.manual_seed(0)
    k, vocab = 4, 16
    tok_a, tok_b = torch.arange(0, 4), torch.arange(4, 8)
    logits = torch.randn(6, vocab)  # two target items: a, b, c each
    logp = logits.log_softmax(dim=-1)
    labels = torch.tensor([1, 6, 9, 3, 4, 10])
    hard = F.nll_loss(logp, labels)
    sure = LevelTargets(
        a=F.one_hot(torch.tensor([1, 3]), k).float(),
        b=F.one_hot(torch.tensor([2, 0]), k).float(),
        b_known=torch.tensor([True, True]),
    )
    unsure = LevelTargets(
        a=torch.full((2, k), 0.25), b=torch.full((2, k), 0.25), b_known=torch.tensor([True, False])
    )
    assert torch.allclose(distilled_loss(logp, labels, unsure, (tok_a, tok_b), 0.0), hard)
    assert torch.allclose(distilled_loss(logp, labels, sure, (tok_a, tok_b), 0.7), hard)
    mixed = distilled_loss(logp, labels, unsure, (tok_a, tok_b), 1.0)
    soft_a = -logp[[0, 3]][:, tok_a].mean(dim=1)
    soft_b0 = -logp[1, tok_b].mean()
    per_item = [soft_a[0], soft_b0, -logp[2, 9], soft_a[1], -logp[4, 4], -logp[5, 10]]
    assert torch.allclose(mixed, torch.stack(per_item).mean())  # b unknown: its hard target
    with pytest.raises(ValueError, match="labels for"):
        distilled_loss(logp[:5], labels[:5], unsure, (tok_a, tok_b), 0.5)


def test_training_with_a_teacher_records_it(tiny_world, teacher_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from offline.train.trainer import TrainConfig, train

    cfg = TrainConfig(
        preset="tiny", epochs=1, batch_size=64, val_users=50, warmup_steps=5, teacher=teacher_dir
    )
    manifest = train(
        tiny_world.catalog_dir, tiny_world.interactions_csv, tmp_path / "m", cfg, False
    )
    version = ItemModel.load(teacher_dir, Catalog.load(tiny_world.catalog_dir)).version
    assert manifest.parameters["teacher_version"] == version
    assert manifest.metrics["history"][0]["train_loss"] > 0


def test_a_teacher_for_another_catalog_is_refused(tiny_world, teacher_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json
    import shutil

    from offline.items.artifact import ItemModelError
    from offline.train.trainer import TrainConfig, train

    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["catalog_version"] = "another-catalog"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ItemModelError, match="trained for catalog another-catalog"):
        train(
            tiny_world.catalog_dir,
            tiny_world.interactions_csv,
            tmp_path / "m",
            TrainConfig(preset="tiny", epochs=1, teacher=other),
            False,
        )
    assert not (tmp_path / "m").exists()
