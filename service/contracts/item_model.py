"""The trained item-level model on disk, and what its readers ask of it: the think-ahead worker
(each user's best items, stored in the snapshot) and the service (a fresh history's best items
after an event, without an engine round).

A directory (written whole by ``thinkahead train-items``)::

    item_model.safetensors   weights (item rows in catalog row order)
    manifest.json            ItemModelManifest: config, catalog version, version, training record
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file

from service.contracts.catalog import Catalog
from service.contracts.item_index import ExactIndex
from service.contracts.item_network import ItemModelConfig, ItemSequenceModel
from service.contracts.manifest import ManifestError
from service.contracts.tokens import Code

ITEMS_DIR = "items"  # the item-level model's default place: inside the model directory
WEIGHTS_FILE = "item_model.safetensors"
MANIFEST_FILE = "manifest.json"


class ItemModelError(ManifestError):
    """Not an item model, or one trained for another catalog."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class ItemModelManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    config: ItemModelConfig
    catalog_version: str
    version: str = ""  # hash of the weights
    best_epoch: int = Field(default=0, ge=0)
    training: dict[str, Any] = Field(default_factory=dict)


@dataclass
class ItemModel:
    """Encodes histories (item rows) into user vectors; finds their best items."""

    manifest: ItemModelManifest
    network: ItemSequenceModel
    index: ExactIndex

    @property
    def version(self) -> str:
        return self.manifest.version

    @classmethod
    def load(cls, directory: Path | str, catalog: Catalog) -> ItemModel:
        directory = Path(directory)
        try:
            manifest = ItemModelManifest.model_validate(
                json.loads((directory / MANIFEST_FILE).read_text())
            )
        except (OSError, ValueError) as exc:
            raise ItemModelError(directory, f"not an item model ({exc})") from exc
        if manifest.catalog_version != catalog.version:
            raise ItemModelError(
                directory,
                f"trained for catalog {manifest.catalog_version}, not {catalog.version}: "
                "retrain it (thinkahead train-items)",
            )
        network = ItemSequenceModel(manifest.config)
        network.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        network.eval()
        with torch.no_grad():
            vectors = network.item_vectors().numpy().copy()
        return cls(manifest, network, ExactIndex(vectors))

    def user_vectors(self, histories: Sequence[Sequence[int]], batch: int = 1024) -> np.ndarray:
        """Histories as catalog rows, oldest first -> (users, dim)."""
        out = []
        max_len = self.manifest.config.max_len
        with torch.no_grad():
            for start in range(0, len(histories), batch):
                tokens = left_padded([h[-max_len:] for h in histories[start : start + batch]])
                out.append(self.network.user_vectors(tokens).numpy())
        dim = self.manifest.config.dim
        return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)

    def top_items(
        self, catalog: Catalog, histories: Sequence[Sequence[Code]], n: int, exclude_history: bool
    ) -> list[list[tuple[Code, float]]]:
        """Each user's best ``n`` items by the item-level score (a logit: only its differences
        within one user mean anything), best first."""
        rows = [
            [r for c in h if (r := catalog.row_by_code.get(tuple(c))) is not None]
            for h in histories
        ]  # type: ignore[arg-type]
        found, scores = self.index.search(
            self.user_vectors(rows), n, rows if exclude_history else ()
        )
        return [
            [(catalog.code_at(int(r)), float(s)) for r, s in zip(rs, ss, strict=True) if r >= 0]
            for rs, ss in zip(found, scores, strict=True)
        ]


def left_padded(rows: Sequence[Sequence[int]], length: int | None = None) -> torch.Tensor:
    """Catalog rows -> tokens (row + 1), left-padded with 0 to ``length`` (default: longest)."""
    width = max(length or 0, max((len(r) for r in rows), default=1), 1)
    out = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long) + 1
    return out
