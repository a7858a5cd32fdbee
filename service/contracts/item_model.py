"""The trained item-level model on disk, and what its readers ask of it: the think-ahead worker
(each user's best items, stored in the snapshot) and the service (a fresh history's best items
after an event, without an engine round).

A directory (written whole by ``thinkahead train-items``) holds one model::

    item_model.safetensors   weights (item rows in catalog row order)
    manifest.json            ItemModelManifest: config, catalog version, version, training record

or an ensemble of them (``train-items --members N``, ``thinkahead ensemble-items``)::

    ensemble.json            EnsembleManifest: the member directories
    member-0/, member-1/     one model each, as above

An ensemble scores an item by the mean of its members' logits. That is one dot product over
concatenated vectors (each member's user vector divided by the member count, beside its item
vectors), so one exact (or approximate) index serves it and every reader sees a single model
with wider vectors: the snapshot, the scores' meaning and the service's encode are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file

from service.contracts.affinity import Affinity
from service.contracts.catalog import Catalog
from service.contracts.item_index import ExactIndex
from service.contracts.item_network import ItemModelConfig, ItemSequenceModel
from service.contracts.manifest import ManifestError, utc_now
from service.contracts.tokens import Code

ITEMS_DIR = "items"  # the item-level model's default place: inside the model directory
WEIGHTS_FILE = "item_model.safetensors"
MANIFEST_FILE = "manifest.json"
ENSEMBLE_FILE = "ensemble.json"


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


class EnsembleManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    members: list[str] = Field(min_length=1)  # directories, relative to the ensemble's
    combine: Literal["mean_logit"] = "mean_logit"
    # The service encodes a user who just acted with the first ``fresh_members`` members only:
    # each member is ~1 ms of CPU per fresh recommend, and on 2 cores the whole ensemble's
    # encode cut the locust mix from 162.5 to 136.7 req/s with recommend p50 7 -> 24 ms (the
    # stored answers, where the ensemble's gain is, cost nothing online).
    fresh_members: int = Field(default=1, ge=1)
    created_at: str = Field(default_factory=utc_now)


@dataclass(frozen=True)
class ItemMember:
    manifest: ItemModelManifest
    network: ItemSequenceModel


@dataclass
class ItemModel:
    """Encodes histories (item rows) into user vectors; finds their best items. One trained
    model or the mean of several (see the module's docstring)."""

    members: tuple[ItemMember, ...]
    index: ExactIndex
    version: str
    fresh_members: int = 1  # how many members encode a fresh history online (EnsembleManifest)

    @property
    def refit(self) -> bool:
        """Any member trained on train + validation (``train-items --refit``)."""
        return any(m.manifest.training.get("refit") for m in self.members)

    def describe(self) -> dict[str, Any]:
        """What reports record: the one manifest, or the ensemble's members."""
        if len(self.members) == 1:
            return self.members[0].manifest.model_dump(mode="json")
        return {
            "version": self.version,
            "combine": "mean_logit",
            "fresh_members": self.fresh_members,
            "members": [m.manifest.model_dump(mode="json") for m in self.members],
        }

    @classmethod
    def load(cls, directory: Path | str, catalog: Catalog) -> ItemModel:
        directory = Path(directory)
        ensemble = directory / ENSEMBLE_FILE
        if not ensemble.is_file():
            return cls.of_members((_load_member(directory, catalog),))
        try:
            spec = EnsembleManifest.model_validate(json.loads(ensemble.read_text()))
        except (OSError, ValueError) as exc:
            raise ItemModelError(directory, f"not an item-model ensemble ({exc})") from exc
        members = tuple(_load_member(directory / name, catalog) for name in spec.members)
        return cls.of_members(members, min(spec.fresh_members, len(members)))

    @classmethod
    def of_members(cls, members: tuple[ItemMember, ...], fresh_members: int = 1) -> ItemModel:
        with torch.no_grad():
            vectors = np.concatenate([m.network.item_vectors().numpy() for m in members], axis=1)
        if len(members) == 1:
            version = members[0].manifest.version
        else:
            versions = "+".join(m.manifest.version for m in members)
            version = hashlib.sha256(versions.encode()).hexdigest()[:16]
        return cls(members, ExactIndex(vectors), version, fresh_members)

    def for_fresh(self) -> ItemModel:
        """The model the service encodes fresh histories with: the first ``fresh_members``."""
        if self.fresh_members >= len(self.members):
            return self
        return ItemModel.of_members(self.members[: self.fresh_members], self.fresh_members)

    def user_vectors(self, histories: Sequence[Sequence[int]], batch: int = 1024) -> np.ndarray:
        """Histories as catalog rows, oldest first -> (users, summed member dims); each
        member's part divided by the member count, so a dot product is the mean logit."""
        parts = [_member_vectors(m, histories, batch) for m in self.members]
        out = np.concatenate(parts, axis=1)
        return out / len(self.members) if len(self.members) > 1 else out

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

    def affinities(
        self, catalog: Catalog, histories: Sequence[Sequence[Code]], n: int, exclude_history: bool
    ) -> list[Affinity]:
        """Each user's best ``n`` items as the snapshot and the service's fresh encode hold
        them."""
        return [
            Affinity.of_items(ranked)
            for ranked in self.top_items(catalog, histories, n, exclude_history)
        ]


def _load_member(directory: Path, catalog: Catalog) -> ItemMember:
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
    return ItemMember(manifest, network)


def _member_vectors(
    member: ItemMember, histories: Sequence[Sequence[int]], batch: int
) -> np.ndarray:
    out = []
    max_len = member.manifest.config.max_len
    with torch.no_grad():
        for start in range(0, len(histories), batch):
            tokens = left_padded([h[-max_len:] for h in histories[start : start + batch]])
            out.append(member.network.user_vectors(tokens).numpy())
    dim = member.manifest.config.dim
    return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)


def left_padded(rows: Sequence[Sequence[int]], length: int | None = None) -> torch.Tensor:
    """Catalog rows -> tokens (row + 1), left-padded with 0 to ``length`` (default: longest)."""
    width = max(length or 0, max((len(r) for r in rows), default=1), 1)
    out = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long) + 1
    return out
