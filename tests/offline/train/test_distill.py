"""Distillation from the item-level model (``thinkahead train --teacher``): the teacher's
distribution projected onto the decoder's levels, each target from the items before it alone,
the rows that follow item dropout, the mixed loss, and a real training run with a real (tiny)
ensemble teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from offline.items.config import ItemTrainConfig
from offline.items.ensemble import train_members
from offline.items.train import train_item_model
from offline.train.distill import LevelTargets, Teacher, distilled_loss
from offline.train.trainer import TrainConfig, augmented, prepare, train
from service.contracts.catalog import Catalog
from service.contracts.item_model import ItemModel, ItemModelError


@pytest.fixture(scope="module")
def teacher_dir(tiny_world, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("teacher") / "items"
    cfg = ItemTrainConfig(dim=16, epochs=3, patience=3, max_len=20)
    catalog = Catalog.load(tiny_world.catalog_dir)

    def one(directory: Path, i: int):  # type: ignore[no-untyped-def]
        seeded = cfg.model_copy(update={"seed": i})
        return train_item_model(
            catalog, tiny_world.interactions_csv, directory, seeded, False, False
        )

    train_members(out, 2, one)
    return out


def test_targets_are_the_teachers_top_items_after_each_prefix_summed_by_level(  # type: ignore[no-untyped-def]
    tiny_world, teacher_dir
) -> None:
    catalog = Catalog.load(tiny_world.catalog_dir)
    model = ItemModel.load(teacher_dir, catalog)
    assert len(model.members) == 2
    k = 7
    window = [catalog.code_at(r) for r in (3, 41, 17, 99)]
    found = Teacher(model, catalog, top_k=k).precompute([window, window[:2]])
    targets = found.targets
    assert found.offsets.tolist() == [0, 3, 4]  # 3 + 1 target items
    assert torch.allclose(targets.a.float().sum(dim=1), torch.ones(4), atol=1e-2)
    # each target as the teacher serves that history alone (its later items unseen): its top
    # items, history excluded, softmax over their logits, summed by first token (among those
    # that share the true first token, by second token; among those that share both, by third)
    for row, history, target in ((1, window[:2], window[2]), (3, window[:1], window[1])):
        top = model.top_items(catalog, [history], k, exclude_history=True)[0]
        probs = torch.tensor([s for _, s in top]).softmax(dim=0)
        expected_a = torch.zeros(catalog.codebook_size)
        expected_b = torch.zeros(catalog.codebook_size)
        expected_c = torch.zeros(catalog.codebook_size)
        for (code, _), p in zip(top, probs, strict=True):
            expected_a[code[0]] += p
            if code[0] == target[0]:
                expected_b[code[1]] += p
                if code[1] == target[1]:
                    expected_c[code[2]] += p
        assert torch.allclose(targets.a[row].float(), expected_a, atol=2e-3)
        assert bool(targets.b_known[row]) == bool(expected_b.sum() > 1e-6)
        if targets.b_known[row]:
            assert torch.allclose(targets.b[row].float(), expected_b / expected_b.sum(), atol=2e-3)
        assert bool(targets.c_known[row]) == bool(expected_c.sum() > 1e-6)
        if targets.c_known[row]:
            assert torch.allclose(targets.c[row].float(), expected_c / expected_c.sum(), atol=2e-3)
    # the first window's second target does not depend on the window's later items
    alone = Teacher(model, catalog, top_k=k).precompute([window[:3]]).targets
    assert torch.equal(alone.a[1], targets.a[1])


def test_item_dropout_keeps_each_kept_targets_teacher_row(
    tiny_world, teacher_dir, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from offline.train.trainer import _teacher

    cfg = TrainConfig(preset="tiny", val_users=50, teacher=teacher_dir)
    data = prepare(tiny_world.catalog_dir, tiny_world.interactions_csv, cfg, tmp_path)
    distill = _teacher(cfg, data, progress=False)
    assert distill is not None
    targets = distill.windows
    assert len(targets.targets) == sum(len(w) - 1 for w in data.train_codes)
    epoch = augmented(data, 0.3, np.random.default_rng(0), targets)
    dropped = 0
    for w, (seq, enc) in enumerate(zip(data.train_codes, epoch, strict=True)):
        rows = enc.teacher_rows
        assert rows is not None and len(rows) == int((enc.labels != -100).sum()) // 3
        start = int(targets.offsets[w])
        # the target items' codes, read back from the labels, are the window items the rows
        # point at
        labelled = enc.labels[enc.labels != -100].reshape(-1, 3)
        items = [seq[int(r) - start + 1] for r in rows]
        assert [tuple(int(data.ids.index_of[int(t)]) for t in lab) for lab in labelled] == [
            tuple(c) for c in items
        ]
        dropped += len(rows) < len(seq) - 1
    assert dropped > 0  # the dropout did drop items, so the mapping was exercised


def test_mixed_loss_is_cross_entropy_at_alpha_0_or_with_a_sure_teacher() -> None:
    torch.manual_seed(0)
    k, vocab = 4, 16
    tokens = (torch.arange(0, 4), torch.arange(4, 8), torch.arange(8, 12))
    logits = torch.randn(6, vocab)  # two target items: a, b, c each
    logp = logits.log_softmax(dim=-1)
    labels = torch.tensor([1, 6, 9, 3, 4, 10])
    hard = F.nll_loss(logp, labels)
    sure = LevelTargets(
        a=F.one_hot(torch.tensor([1, 3]), k).float(),
        b=F.one_hot(torch.tensor([2, 0]), k).float(),
        b_known=torch.tensor([True, True]),
        c=F.one_hot(torch.tensor([1, 2]), k).float(),
        c_known=torch.tensor([True, True]),
    )
    uniform = torch.full((2, k), 0.25)
    unsure = LevelTargets(
        a=uniform,
        b=uniform,
        b_known=torch.tensor([True, False]),
        c=uniform,
        c_known=torch.tensor([False, True]),
    )
    for levels in (1, 2, 3):
        assert torch.allclose(distilled_loss(logp, labels, unsure, tokens, 0.0, levels), hard)
        assert torch.allclose(distilled_loss(logp, labels, sure, tokens, 0.7, levels), hard)
    tok_a, tok_b, tok_c = tokens
    soft_a = -logp[[0, 3]][:, tok_a].mean(dim=1)
    soft_b0 = -logp[1, tok_b].mean()
    soft_c1 = -logp[5, tok_c].mean()
    by_levels = {  # b or c unknown: its hard target; a level past ``levels``: hard too
        1: [soft_a[0], -logp[1, 6], -logp[2, 9], soft_a[1], -logp[4, 4], -logp[5, 10]],
        2: [soft_a[0], soft_b0, -logp[2, 9], soft_a[1], -logp[4, 4], -logp[5, 10]],
        3: [soft_a[0], soft_b0, -logp[2, 9], soft_a[1], -logp[4, 4], soft_c1],
    }
    for levels, per_item in by_levels.items():
        mixed = distilled_loss(logp, labels, unsure, tokens, 1.0, levels)
        assert torch.allclose(mixed, torch.stack(per_item).mean()), levels
    # a level-masked log-prob (-inf off the level) with no teacher mass there stays finite
    masked = logp.clone()
    masked[0, 0] = -torch.inf
    masked[2, 8] = -torch.inf
    assert torch.isfinite(distilled_loss(masked, labels, sure, tokens, 0.5, 3))
    with pytest.raises(ValueError, match="labels for"):
        distilled_loss(logp[:5], labels[:5], unsure, tokens, 0.5)
    with pytest.raises(ValueError, match="levels must be"):
        distilled_loss(logp, labels, unsure, tokens, 0.5, 4)


def test_training_with_a_teacher_records_it_and_learns(
    tiny_world, teacher_dir, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(
        preset="tiny", epochs=2, batch_size=64, val_users=50, warmup_steps=5, teacher=teacher_dir
    )
    manifest = train(
        tiny_world.catalog_dir, tiny_world.interactions_csv, tmp_path / "m", cfg, False
    )
    version = ItemModel.load(teacher_dir, Catalog.load(tiny_world.catalog_dir)).version
    assert manifest.parameters["teacher_version"] == version
    assert manifest.parameters["teacher_seconds"] >= 0
    losses = [h["train_loss"] for h in manifest.metrics["history"]]
    assert all(np.isfinite(losses)) and losses[1] < losses[0]


def test_a_teacher_for_another_catalog_is_refused(tiny_world, teacher_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_dir, other)
    member = other / "member-0" / "manifest.json"
    manifest = json.loads(member.read_text())
    manifest["catalog_version"] = "another-catalog"
    member.write_text(json.dumps(manifest))
    with pytest.raises(ItemModelError, match="trained for catalog another-catalog"):
        train(
            tiny_world.catalog_dir,
            tiny_world.interactions_csv,
            tmp_path / "m",
            TrainConfig(preset="tiny", epochs=1, teacher=other),
            False,
        )
    assert not (tmp_path / "m").exists()


def test_retraining_the_decoder_keeps_the_model_directorys_item_model(  # type: ignore[no-untyped-def]
    tiny_world, teacher_dir, tmp_path: Path
) -> None:
    """The README's order: the item-level model into MODEL/items, then the decoder distilled
    from it into MODEL; the swap-in of the new decoder keeps the item model beside it."""
    model = tmp_path / "model"
    shutil.copytree(teacher_dir, model / "items")
    before = ItemModel.load(model / "items", Catalog.load(tiny_world.catalog_dir)).version
    cfg = TrainConfig(preset="tiny", epochs=1, val_users=50, teacher=model / "items")
    train(tiny_world.catalog_dir, tiny_world.interactions_csv, model, cfg, False)
    assert (model / "manifest.json").is_file()
    after = ItemModel.load(model / "items", Catalog.load(tiny_world.catalog_dir))
    assert after.version == before and len(after.members) == 2
