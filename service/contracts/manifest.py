"""Manifests carried by every artifact (catalog, model, Redis snapshot) and the version checks
between them. A mismatch is refused with both versions named, never served."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FILE = "manifest.json"
# Items of history a model reads (the most recent; the benchmarks' protocol) and, by default,
# the length of the users' history lists the service keeps in Redis.
MAX_HISTORY = 50


class ManifestError(ValueError):
    """An artifact's manifest is missing, unreadable or names another version."""


class VersionMismatch(ManifestError):
    pass


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def sha256_hex(*chunks: bytes, length: int = 16) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:length]


def file_hash(path: Path, length: int = 16) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    kind: str
    created_at: str = Field(default_factory=utc_now)

    @classmethod
    def load(cls, directory: Path):  # type: ignore[no-untyped-def]
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"{path}: no manifest; is {directory} a {cls.__name__} directory?")
        try:
            data = json.loads(path.read_text())
            manifest = cls.model_validate(data)
        except (json.JSONDecodeError, ValueError) as exc:
            raise ManifestError(f"{path}: unreadable manifest: {exc}") from exc
        expected = cls.model_fields["kind"].default
        if manifest.kind != expected:
            raise ManifestError(
                f"{path}: manifest kind is {manifest.kind!r}, expected {expected!r}"
            )
        return manifest

    def write(self, directory: Path) -> None:
        write_json_atomic(Path(directory) / MANIFEST_FILE, self.model_dump(mode="json"))


class CatalogManifest(_Manifest):
    kind: str = "catalog"
    catalog_version: str
    codebook_size: int
    num_items: int
    embedding_model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class ReasoningTemplate(BaseModel):
    """How a reasoning model thinks before an item: ``<think> ... </think>`` then the item.
    ``free``: sampled free text (a chat model's); ``categories``: one catalog category token
    (``service.contracts.rationale``), the worker's G paths being the G likeliest."""

    kind: Literal["free", "categories"] = "free"
    paths: int = Field(
        default=1,
        ge=0,
        description="G paths the worker takes by default (0, a category model: the rationale "
        "is stated and stored, the prefix search runs on the plain prompt)",
    )
    think_start: str = "<think>"
    think_end: str = "</think>"
    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.8, gt=0)


class ModelManifest(_Manifest):
    kind: str = "model"
    model_version: str
    catalog_version: str
    codebook_size: int
    preset: str = "custom"
    data_hash: str | None = None
    max_history: int = MAX_HISTORY
    reasoning: ReasoningTemplate | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, Any] = Field(default_factory=dict)


class SnapshotManifest(_Manifest):
    kind: str = "snapshot"
    snapshot_id: str
    model_version: str
    catalog_version: str
    num_users: int = 0
    prefixes_per_user: int = 0
    paths: int = 1
    beam: int = 0
    aggregation: str = "max"
    parameters: dict[str, Any] = Field(default_factory=dict)
    # ScoringSettings.key() of the whole answers stored per user, ranked to answer_items
    # (service.contracts.answers); None: no answers stored
    answers_key: str | None = None
    answer_items: int = 0


def require_same_catalog(model: ModelManifest, catalog: CatalogManifest, where: str = "") -> None:
    if model.catalog_version != catalog.catalog_version:
        raise VersionMismatch(
            f"{where or 'model'} was built for catalog {model.catalog_version}, "
            f"but the catalog loaded is {catalog.catalog_version}; "
            "retrain or load the matching catalog"
        )
    if model.codebook_size != catalog.codebook_size:
        raise VersionMismatch(
            f"model codebook size {model.codebook_size} != catalog codebook size "
            f"{catalog.codebook_size}"
        )


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
