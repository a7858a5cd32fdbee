"""A decoder model directory: Hugging Face files plus our ``manifest.json``.

Loading resolves the contract's token ids from the saved tokenizer and refuses a model whose
manifest names another catalog version than the one loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from service.catalog import Catalog
from service.manifest import ManifestError, ModelManifest, require_same_catalog
from service.tokens import TokenIds


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


def load_serving_config(model_dir: Path | str) -> dict[str, object]:
    """Serving defaults chosen offline for this model (``thinkahead tune-blend``), if any."""
    path = Path(model_dir) / SERVING_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def load_model_info(model_dir: Path | str, catalog: Catalog) -> ModelInfo:
    model_dir = Path(model_dir)
    manifest = ModelManifest.load(model_dir)
    require_same_catalog(manifest, catalog.manifest, where=f"model {model_dir}")
    try:
        ids = TokenIds.from_vocab(tokenizer_vocab(model_dir), catalog.codebook_size)
    except ValueError as exc:
        raise ModelError(f"{model_dir}: {exc}") from exc
    return ModelInfo(model_dir, manifest, ids)
