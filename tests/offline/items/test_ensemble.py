"""Item-level ensembles: ``train-items --members N`` and ``ensemble-items`` write a directory
that every reader (the worker, the eval, the service's fresh encode) loads as one model whose
score is the mean of its members' logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from offline.cli import app
from offline.data import leave_one_out, read_interactions
from offline.items.train import evaluate, evaluate_item_model
from offline.thinkahead.entries import ItemSource
from service.contracts.catalog import Catalog
from service.contracts.item_model import ENSEMBLE_FILE, ItemModel, ItemModelError, left_padded
from service.core.fresh_items import FreshItems
from tests.fake_engine import write_tiny_artifacts
from tests.helpers import synthetic_interactions

N_ITEMS = 60
SMALL = ["--dim", "16", "--epochs", "3", "--patience", "3", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(catalog, interactions, an ensemble of two members trained by the CLI)."""
    root = tmp_path_factory.mktemp("ensemble")
    catalog_dir, _ = write_tiny_artifacts(root, n_items=N_ITEMS)
    interactions = root / "interactions.csv"
    synthetic_interactions(interactions, N_ITEMS, 200)
    out = root / "items"
    args = ["train-items", "--catalog", str(catalog_dir), "--interactions", str(interactions)]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--members", "2", *SMALL])
    assert result.exit_code == 0, result.output
    assert "member 0 (seed 0)" in result.output and "member 1 (seed 1)" in result.output
    return catalog_dir, interactions, out


def test_the_ensemble_scores_the_mean_of_its_members_logits(
    world: tuple[Path, Path, Path],
) -> None:
    catalog_dir, _, out = world
    catalog = Catalog.load(catalog_dir)
    model = ItemModel.load(out, catalog)
    assert len(model.members) == 2
    seeds = [m.manifest.training["settings"]["seed"] for m in model.members]
    assert seeds == [0, 1]
    assert model.version not in {m.manifest.version for m in model.members}
    history = [catalog.code_of(str(i)) for i in (10, 12, 14)]
    (ranked,) = model.top_items(catalog, [history], 5, exclude_history=True)  # type: ignore[list-item]
    rows = [catalog.row_by_code[tuple(c)] for c in history]  # type: ignore[index]
    with torch.no_grad():
        logits = [
            m.network.user_vectors(left_padded([rows]))[0] @ m.network.item_vectors().T
            for m in model.members
        ]
    mean = ((logits[0] + logits[1]) / 2).numpy()
    mean[rows] = -np.inf
    best = np.argsort(-mean)[:5]
    assert [catalog.row_by_code[c] for c, _ in ranked] == best.tolist()
    np.testing.assert_allclose([s for _, s in ranked], mean[best], rtol=1e-4, atol=1e-5)
    # the members disagree (else the ensemble would be pointless, and this test too weak)
    assert not torch.allclose(logits[0], logits[1])


def test_the_eval_and_the_service_load_it_as_one_model(world: tuple[Path, Path, Path]) -> None:
    catalog_dir, interactions, out = world
    catalog = Catalog.load(catalog_dir)
    model = ItemModel.load(out, catalog)
    valid = leave_one_out(read_interactions(interactions)).valid
    ensemble = evaluate_item_model(model, catalog, valid)
    alone = evaluate(model.members[0].network, catalog, valid)
    assert ensemble["users"] == alone["users"] == len(valid)
    assert ensemble != alone  # the second member moved the ranking
    # the service's fresh encode: the first member alone by default (its cost is per member,
    # on the request path), the whole ensemble when the manifest says so
    model_dir = out.parent / "model-with-ensemble"
    model_dir.mkdir()
    (model_dir / "items").symlink_to(out)
    history = [catalog.code_of(str(i)) for i in (20, 21)]
    first = ItemModel.load(out / "member-0", catalog)
    fresh = FreshItems.load(model_dir, catalog)
    assert fresh is not None and fresh.version == first.version != model.version
    top = fresh.top(history, exclude_history=True)  # type: ignore[arg-type]
    assert top.ranked == tuple(first.top_items(catalog, [history], fresh.items, True)[0])  # type: ignore[list-item]
    fresh.close()
    # the eval and tune-rerank score the no-engine fresh answer with the same encode
    source = ItemSource(model, out)
    (affinity,) = source.fresh_affinities(catalog, [history])  # type: ignore[list-item]
    assert affinity == top
    (stored,) = source.affinities(catalog, [history])  # type: ignore[list-item]
    assert stored != top  # what the worker stores: the whole ensemble
    spec = json.loads((out / ENSEMBLE_FILE).read_text())
    assert spec["fresh_members"] == 1
    try:
        (out / ENSEMBLE_FILE).write_text(json.dumps({**spec, "fresh_members": 2}))
        fresh = FreshItems.load(model_dir, catalog)
        assert fresh is not None and fresh.version == model.version
        top = fresh.top(history, exclude_history=True)  # type: ignore[arg-type]
        assert top.ranked == tuple(model.top_items(catalog, [history], fresh.items, True)[0])  # type: ignore[list-item]
        fresh.close()
    finally:
        (out / ENSEMBLE_FILE).write_text(json.dumps(spec))


def test_ensemble_items_gathers_models_trained_apart(
    world: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    catalog_dir, interactions, out = world
    args = ["train-items", "--catalog", str(catalog_dir), "--interactions", str(interactions)]
    third = tmp_path / "third"
    one = ["--seed", "7", "--members", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(third), *one, *SMALL])
    assert result.exit_code == 0, result.output
    gathered = tmp_path / "gathered"
    result = CliRunner().invoke(
        app,
        [
            "ensemble-items",
            "--catalog",
            str(catalog_dir),
            str(out),
            str(third),
            "--out",
            str(gathered),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "3 members" in result.output
    spec = json.loads((gathered / ENSEMBLE_FILE).read_text())
    assert spec["members"] == ["member-0", "member-1", "member-2"]
    model = ItemModel.load(gathered, Catalog.load(catalog_dir))
    assert [m.manifest.training["settings"]["seed"] for m in model.members] == [0, 1, 7]


def test_bad_ensembles_are_refused_with_what_is_wrong(
    world: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    catalog_dir, _, out = world
    gather = ["ensemble-items", "--catalog", str(catalog_dir), "--out", str(tmp_path / "e")]
    result = CliRunner().invoke(app, [*gather, str(out / "member-0")])
    assert result.exit_code != 0 and "at least two" in result.output
    assert not (tmp_path / "e").exists()
    # a member for another catalog: refused, by the CLI and at load
    other_catalog, _ = write_tiny_artifacts(tmp_path / "other", n_items=N_ITEMS - 1)
    result = CliRunner().invoke(
        app,
        [
            "ensemble-items",
            "--catalog",
            str(other_catalog),
            "--out",
            str(tmp_path / "e"),
            str(out / "member-0"),
            str(out / "member-1"),
        ],
    )
    assert result.exit_code != 0 and "retrain" in result.output
    with pytest.raises(ItemModelError, match="retrain"):
        ItemModel.load(out, Catalog.load(other_catalog))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ENSEMBLE_FILE).write_text('{"members": []}')
    with pytest.raises(ItemModelError, match="not an item-model ensemble"):
        ItemModel.load(broken, Catalog.load(catalog_dir))
