"""Evaluation guards: a split is never scored with artifacts that counted its targets. Real
catalogs and co-visitation tables built from interactions, the real CLI; the decoder is a
manifest and a tokenizer (the guards refuse before any engine starts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from offline.catalog.build import CatalogSpec, build_catalog
from offline.catalog.covisit import build_covisit_file
from offline.cli import app
from offline.errors import InputError
from offline.eval.guards import check_covisit
from service.contracts.catalog import Catalog
from service.contracts.covisit import CovisitTable
from service.contracts.manifest import ModelManifest
from service.contracts.tokens import SPECIAL_TOKENS, all_item_tokens
from tests.helpers import random_catalog_csv, synthetic_interactions

ITEMS, USERS, K = 60, 40, 4


def world(root: Path, holdout_last: int, refit: bool = False) -> tuple[Path, Path, Path]:
    """(catalog, model, interactions): a catalog built from the interactions with
    ``--holdout-last holdout_last`` and a decoder directory made for it."""
    items, inter = root / "items.csv", root / "interactions.csv"
    random_catalog_csv(items, ITEMS)
    synthetic_interactions(inter, ITEMS, USERS)
    np.save(root / "vectors.npy", np.random.default_rng(0).normal(size=(ITEMS, 8)))
    catalog_dir, model_dir = root / "catalog", root / "model"
    build_catalog(
        items,
        catalog_dir,
        CatalogSpec(codebook_size=K, cf_dim=4, holdout_last=holdout_last),
        interactions=inter,
        embeddings=root / "vectors.npy",
        show_progress=False,
    )
    model_dir.mkdir()
    catalog = Catalog.load(catalog_dir)
    ModelManifest(
        model_version="m1",
        catalog_version=catalog.version,
        codebook_size=K,
        parameters={"refit": refit},
    ).write(model_dir)
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *all_item_tokens(K)])}
    (model_dir / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    return catalog_dir, model_dir, inter


def eval_cli(catalog: Path, model: Path, inter: Path, split: str) -> tuple[int, str]:
    args = ["--model", str(model), "--catalog", str(catalog), "--interactions", str(inter)]
    out = catalog.parent / "report.json"
    result = CliRunner().invoke(app, ["eval", *args, "--out", str(out), "--split", split])
    assert "Traceback" not in result.output
    assert not out.exists()  # refused before anything was scored
    return result.exit_code, " ".join(result.stderr.split())


@pytest.mark.parametrize("split", ["test", "valid"])
def test_an_eval_with_a_production_catalog_is_refused_naming_the_flag(
    tmp_path: Path, split: str
) -> None:
    catalog, model, inter = world(tmp_path, holdout_last=0)
    code, message = eval_cli(catalog, model, inter, split)
    assert code == 2
    assert "built with --holdout-last 0" in message
    assert "every user's validation and test items" in message
    assert "--holdout-last 2" in message


def test_a_stale_co_visitation_table_is_refused_even_with_a_benchmark_catalog(
    tmp_path: Path,
) -> None:
    catalog, model, inter = world(tmp_path, holdout_last=2)
    build_covisit_file(catalog, inter, holdout_last=0)  # refreshed, flag forgotten
    code, message = eval_cli(catalog, model, inter, "test")
    assert code == 2
    assert "co-visitation table (covisit.npz) was built with --holdout-last 0" in message
    assert "thinkahead covisit build ... --holdout-last 1" in message


def test_the_refit_table_serves_test_but_not_validation(tmp_path: Path) -> None:
    """A refit's table counts the validation transitions (``--holdout-last 1``): fine for
    the test split, a leak for validation."""
    catalog_dir, _, inter = world(tmp_path, holdout_last=2)
    build_covisit_file(catalog_dir, inter, holdout_last=1)
    catalog = Catalog.load(catalog_dir)
    table = CovisitTable.load(catalog_dir, catalog.item_ids, catalog.version)
    check_covisit(table, catalog_dir, "test")
    with pytest.raises(InputError, match="counted every user's validation item"):
        check_covisit(table, catalog_dir, "valid")


def test_tune_blend_refuses_a_model_refit_on_validation(tmp_path: Path) -> None:
    catalog, model, inter = world(tmp_path, holdout_last=2, refit=True)
    args = ["--model", str(model), "--catalog", str(catalog), "--interactions", str(inter)]
    result = CliRunner().invoke(app, ["tune-blend", *args, "--engine", "torch"])
    assert result.exit_code == 2
    assert "refit on train + validation" in result.stderr
    assert not (model / "serving.json").exists()


def test_training_selects_only_on_a_catalog_that_held_validation_out(tmp_path: Path) -> None:
    catalog, _, inter = world(tmp_path, holdout_last=0)
    args = ["--catalog", str(catalog), "--interactions", str(inter)]
    result = CliRunner().invoke(
        app, ["train", *args, "--out", str(tmp_path / "m2"), "--preset", "tiny", "--epochs", "1"]
    )
    assert result.exit_code == 2
    assert "built with --holdout-last 0" in result.stderr
    assert not (tmp_path / "m2").exists()
