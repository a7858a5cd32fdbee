"""Writing the trained item-level model (``thinkahead train-items``); reading it is shared with
the service: :mod:`service.contracts.item_model`."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from service.contracts.item_model import MANIFEST_FILE, WEIGHTS_FILE, ItemModelManifest
from service.contracts.item_network import ItemSequenceModel
from service.contracts.manifest import file_hash


def save_item_model(
    directory: Path, model: ItemSequenceModel, catalog_version: str, best_epoch: int, record: dict
) -> ItemModelManifest:
    weights = directory / WEIGHTS_FILE
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    manifest = ItemModelManifest(
        config=model.cfg,
        catalog_version=catalog_version,
        version=file_hash(weights),
        best_epoch=best_epoch,
        training=record,
    )
    (directory / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest
