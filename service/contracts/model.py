"""A decoder model directory: Hugging Face files plus our ``manifest.json``.

Loading resolves the contract's token ids from the saved tokenizer and refuses a model whose
manifest names another catalog version than the one loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.contracts.catalog import Catalog
from service.contracts.fusion import FusionWeights
from service.contracts.manifest import (
    ManifestError,
    ModelManifest,
    require_same_catalog,
    write_json_atomic,
)
from service.contracts.rationale import RationaleSettings
from service.contracts.think_ahead import (
    DEFAULT_AFFINITY_CANDIDATES,
    DEFAULT_COVISIT_CANDIDATES,
    DEFAULT_WEIGHTS,
    RerankSettings,
    ScoringSettings,
)
from service.contracts.tokens import TokenIds


class ModelError(ManifestError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    manifest: ModelManifest
    token_ids: TokenIds

    @property
    def version(self) -> str:
        return self.manifest.model_version

    @property
    def max_history(self) -> int:
        return self.manifest.max_history


def tokenizer_vocab(model_dir: Path) -> dict[str, int]:
    """Vocabulary incl. added tokens, read from tokenizer.json without loading transformers."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{path}: missing; the model directory needs its tokenizer")
    data = json.loads(path.read_text())
    vocab = dict(data.get("model", {}).get("vocab", {}) or {})
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    return vocab


SERVING_FILE = "serving.json"


class ServingConfig(BaseModel):
    """Serving defaults learned offline for this model on the validation split
    (``thinkahead tune-blend``): the fused score's weights and how many co-visitation and
    item-level candidates join the snapshot's prefixes. Without a serving.json: Beauty's
    (``service.contracts.think_ahead``'s defaults), tuned on nothing of the model's own."""

    model_config = ConfigDict(extra="ignore")

    weights: FusionWeights = Field(default_factory=lambda: DEFAULT_WEIGHTS)
    covisit_candidates: int = Field(default=DEFAULT_COVISIT_CANDIDATES, ge=0)
    affinity_candidates: int = Field(default=DEFAULT_AFFINITY_CANDIDATES, ge=0)
    # the no-engine answer after fresh events (``thinkahead tune-rerank``, run after
    # tune-blend: a new tune-blend drops it, the stored answers it re-ranks having changed);
    # None: RerankSettings' defaults
    rerank: RerankSettings | None = None
    rerank_tuning: dict[str, Any] = Field(default_factory=dict)
    # the answer rationale's mix (tune-blend, on the same users); None: DEFAULT_RATIONALE
    rationale: RationaleSettings | None = None
    rationale_tuning: dict[str, Any] = Field(default_factory=dict)
    covisit_version: str | None = None
    item_model_version: str | None = None  # the item-level model the weights were learned with
    chosen_on: str | None = None
    created_at: str | None = None
    tuning: dict[str, Any] = Field(default_factory=dict, description="how the choice was made")

    @model_validator(mode="before")
    @classmethod
    def _single_weight_files(cls, data: Any) -> Any:
        # serving.json written before the fused score held only the offline prefix weight
        if isinstance(data, dict) and "offline_weight" in data and "weights" not in data:
            data = {**data, "weights": {"offline": data["offline_weight"]}}
        return data

    def scoring(self, **overrides: Any) -> ScoringSettings:
        """The scoring these learned values make, with ``overrides`` (the service's settings,
        a job's flags) on top."""
        learned = {
            "weights": self.weights,
            "covisit_candidates": self.covisit_candidates,
            "affinity_candidates": self.affinity_candidates,
        }
        if self.rerank is not None:
            learned["rerank"] = self.rerank
        if self.rationale is not None:
            learned["rationale"] = self.rationale
        return ScoringSettings.model_validate(learned | overrides)

    def write(self, model_dir: Path | str) -> None:
        write_json_atomic(Path(model_dir) / SERVING_FILE, self.model_dump(mode="json"))


def load_serving_config(model_dir: Path | str) -> ServingConfig:
    """The model's serving.json; defaults (decoder only) when it has none."""
    path = Path(model_dir) / SERVING_FILE
    if not path.is_file():
        return ServingConfig()
    try:
        return ServingConfig.model_validate_json(path.read_text())
    except ValueError as exc:
        raise ModelError(f"{path}: not a serving config: {exc}") from exc


def load_model_info(model_dir: Path | str, catalog: Catalog) -> ModelInfo:
    model_dir = Path(model_dir)
    manifest = ModelManifest.load(model_dir)
    require_same_catalog(manifest, catalog.manifest, where=f"model {model_dir}")
    try:
        ids = TokenIds.from_vocab(tokenizer_vocab(model_dir), catalog.codebook_size)
    except ValueError as exc:
        raise ModelError(f"{model_dir}: {exc}") from exc
    return ModelInfo(model_dir, manifest, ids)
