"""Evaluation guards: nothing a split is scored on may have counted that split's items.

A catalog built from interactions (CF vectors, popularity) and a co-visitation table count
every user's events except the last ``--holdout-last`` ones. Production builds hold out none;
a benchmark needs each user's validation and test items held out (``--holdout-last 2``), a
test-only figure at least the test item (the refit's co-visitation table holds out 1). One
forgotten flag turns Beauty's co-visitation row into R@10 ~.72, so every job that scores a
split (``train``'s selection, ``tune-blend``, ``eval``) checks what it was handed and refuses
with the flag that fixes it. A model refit on train + validation is refused on validation.

:func:`provenance` is what each eval report records of the artifacts it used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from offline.errors import InputError
from offline.thinkahead.entries import ItemSource
from service.contracts.catalog import Catalog
from service.contracts.covisit import CovisitTable
from service.contracts.model import ModelInfo

SplitName = Literal["valid", "test"]
# the last items of each user a split's targets sit in: validation is the second-to-last
HELD_OUT_NEEDED: dict[str, int] = {"valid": 2, "test": 1}


def catalog_holdout(catalog: Catalog) -> int | None:
    """Events held out per user when the catalog counted interactions; None: it counted none
    (content vectors only, no popularity)."""
    params = catalog.manifest.parameters
    if not (params.get("inputs") or {}).get("interactions"):
        return None
    return int(params.get("holdout_last", 0))


def check_catalog(catalog: Catalog, directory: Path, split: SplitName) -> None:
    held = catalog_holdout(catalog)
    needed = HELD_OUT_NEEDED[split]
    if held is not None and held < needed:
        raise InputError(
            directory,
            f"this catalog was built with --holdout-last {held}: its CF vectors and popularity "
            f"counted {_what(held)}, so scoring the {_name(split)} split on it leaks the "
            f"targets. Rebuild it for evaluation: `thinkahead catalog build ... --holdout-last 2`",
        )


def check_covisit(table: CovisitTable | None, directory: Path, split: SplitName) -> None:
    if table is None:
        return
    held = int(table.parameters.get("holdout_last", 0))  # type: ignore[call-overload]
    needed = HELD_OUT_NEEDED[split]
    if held < needed:
        raise InputError(
            directory,
            f"its co-visitation table (covisit.npz) was built with --holdout-last {held}: it "
            f"counted {_what(held)}, so scoring the {_name(split)} split with it leaks the "
            f"targets. Rebuild it: `thinkahead covisit build ... --holdout-last {needed}` "
            f"(or `catalog build --holdout-last 2`)",
        )


def check_model(model: ModelInfo, split: SplitName) -> None:
    if split == "valid" and model.manifest.parameters.get("refit"):
        raise InputError(
            model.path,
            "this decoder was refit on train + validation (--refit): it trained on the "
            "validation targets, so it cannot be scored or tuned on the validation split",
        )


def check_item_model(items: ItemSource | None, split: SplitName) -> None:
    if items is not None and split == "valid" and items.refit:
        raise InputError(
            items.path,
            "this item-level model was refit on train + validation (train-items --refit): it "
            "cannot be scored or tuned on the validation split",
        )


def check_sources(
    split: SplitName,
    model: ModelInfo,
    catalog: Catalog,
    catalog_dir: Path,
    covisit: CovisitTable | None,
    items: ItemSource | None,
) -> None:
    """Every check for a job that scores ``split`` with these artifacts."""
    check_catalog(catalog, catalog_dir, split)
    check_covisit(covisit, catalog_dir, split)
    check_model(model, split)
    check_item_model(items, split)


def _name(split: SplitName) -> str:
    return {"valid": "validation", "test": "test"}[split]


def _what(held: int) -> str:
    if held == 0:
        return "every user's validation and test items"
    return "every user's validation item"  # held == 1: only the test item was held out


def provenance(
    model: ModelInfo,
    catalog: Catalog,
    covisit: CovisitTable | None,
    item_model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Which artifacts an eval scored with and how each was built."""
    params = catalog.manifest.parameters
    return {
        "model": {
            "version": model.version,
            "refit": bool(model.manifest.parameters.get("refit")),
            "data_hash": model.manifest.data_hash,
        },
        "catalog": {
            "version": catalog.version,
            "holdout_last": catalog_holdout(catalog),
            "interactions": (params.get("inputs") or {}).get("interactions"),
        },
        "covisit": None
        if covisit is None
        else {
            "version": covisit.version,
            "holdout_last": covisit.parameters.get("holdout_last"),
            "data_hash": covisit.parameters.get("data_hash"),
        },
        "item_model": item_model,
    }
