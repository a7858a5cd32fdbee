"""Item-level ensembles: several trained item models scored by their mean logit
(:mod:`service.contracts.item_model`). ``train-items --members N`` trains them with seeds
``seed .. seed + N - 1``; ``thinkahead ensemble-items`` gathers models trained apart (on other
machines, or earlier) into one directory."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from offline.errors import InputError
from offline.fsutil import atomic_directory
from service.contracts.catalog import Catalog
from service.contracts.item_model import (
    ENSEMBLE_FILE,
    EnsembleManifest,
    ItemModel,
    ItemModelError,
    ItemModelManifest,
)


def member_dir(i: int) -> str:
    return f"member-{i}"


def train_members(
    out: Path,
    members: int,
    train_one: Callable[[Path, int], ItemModelManifest],
) -> list[ItemModelManifest]:
    """``train_one(directory, i)`` for each member, then the ensemble's manifest; ``out`` is
    replaced only when every member trained."""
    with atomic_directory(out) as work:
        manifests = [train_one(work / member_dir(i), i) for i in range(members)]
        _write_manifest(work, members)
    return manifests


def gather(sources: Sequence[Path], out: Path, catalog: Catalog) -> ItemModel:
    """Copy trained item models (each one model, or an ensemble whose members are taken one by
    one) into an ensemble at ``out``; every one must be for ``catalog``."""
    singles: list[Path] = []
    for source in sources:
        source = Path(source)
        ensemble = source / ENSEMBLE_FILE
        if ensemble.is_file():
            spec = EnsembleManifest.model_validate_json(ensemble.read_text())
            singles += [source / name for name in spec.members]
        else:
            singles.append(source)
    if len(singles) < 2:
        raise InputError(out, "an ensemble needs at least two item models")
    try:
        for single in singles:
            ItemModel.load(single, catalog)  # the same checks the service makes
    except ItemModelError as exc:
        raise InputError(exc.path, str(exc)) from exc
    with atomic_directory(out) as work:
        for i, single in enumerate(singles):
            shutil.copytree(single, work / member_dir(i))
        _write_manifest(work, len(singles))
    return ItemModel.load(out, catalog)


def _write_manifest(directory: Path, members: int) -> None:
    manifest = EnsembleManifest(members=[member_dir(i) for i in range(members)])
    (directory / ENSEMBLE_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
