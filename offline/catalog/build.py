"""Build a catalog artifact: items -> vectors -> balanced RQ-Kmeans codes -> unique codes.

Writes ``codes.csv``, ``trie.npz``, ``popularity.npy``, ``manifest.json`` and ``report.json``
through :func:`offline.fsutil.atomic_directory`: a reader never sees half a catalog and a failed
build leaves the previous one in place.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from offline.catalog import cf as cf_mod
from offline.catalog.covisit import build_covisit
from offline.catalog.embed import (
    DEFAULT_BATCH_SIZE,
    MINILM_NAME,
    build_environment,
    embed_texts,
    l2_normalise,
    load_vectors,
    resolve_precision,
)
from offline.catalog.items import read_items
from offline.catalog.kmeans import DEFAULT_ITERS, residual_quantize, resolve_collisions
from offline.catalog.words import Keywords, read_categories, read_keywords
from offline.data import read_interactions
from offline.errors import InputError
from offline.fsutil import atomic_directory
from service.contracts.catalog import (
    CODES_FILE,
    POPULARITY_FILE,
    REPORT_FILE,
    TRIE_FILE,
    Catalog,
    build_trie,
    catalog_version_of,
    write_codes,
)
from service.contracts.covisit import CovisitTable
from service.contracts.manifest import MANIFEST_FILE, CatalogManifest, file_hash, write_json_atomic
from service.contracts.rationale import Categories

log = logging.getLogger(__name__)

LEVELS = 3


class CatalogSpec(BaseModel):
    """How a catalog is built (everything but its inputs); recorded in its manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    codebook_size: int = Field(default=256, ge=2, description="codes per level (K)")
    cf_dim: int = Field(default=64, ge=1, description="CF vector dimensions")
    cf_weight: float = Field(
        default=1.0, ge=0, allow_inf_nan=False, description="weight of the CF part (0: content)"
    )
    cf_idf: bool = Field(
        default=False, description="idf-weight the user x item matrix (cf_kind user-item)"
    )
    cf_kind: Literal["transitions", "user-item"] = Field(
        default="transitions",
        description="transitions (what follows what: next items share prefixes) or user-item "
        "(SVD of who bought what)",
    )
    holdout_last: int = Field(
        default=0,
        ge=0,
        description="ignore each user's last N interactions (benchmarks: 2; production: 0)",
    )
    seed: int = 0
    iters: int = Field(default=DEFAULT_ITERS, ge=1, description="Lloyd iterations per level")
    text_columns: tuple[str, ...] | None = None
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1)
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="MiniLM precision: auto takes bf16 where the CPU has it"
    )

    @model_validator(mode="after")
    def _idf_needs_user_item(self) -> CatalogSpec:
        if self.cf_idf and self.cf_kind != "user-item":
            raise ValueError(
                "cf_idf weights the user x item matrix: use it with cf_kind user-item, not "
                f"{self.cf_kind}"
            )
        return self


def build_catalog(
    items_csv: Path | str,
    out_dir: Path | str,
    spec: CatalogSpec | None = None,
    *,
    interactions: Path | str | None = None,
    embeddings: Path | str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Build the catalog in ``out_dir`` (replacing a previous catalog there); returns the report.

    Vectors: MiniLM embeddings of the item texts (or the rows of ``embeddings``, a .npy),
    L2-normalised; with ``interactions`` and ``spec.cf_weight`` > 0, concatenated with
    ``cf_weight`` times CF vectors from the interactions minus each user's last
    ``holdout_last`` items (so a benchmark can build without seeing its validation / test
    targets): ``cf_kind`` "transitions" embeds what follows what (items a user takes next share
    prefixes, which is what the decoder predicts), "user-item" who bought what. Popularity
    counts the same truncated interactions.
    """
    spec = spec or CatalogSpec()
    codebook_size, holdout_last, seed = spec.codebook_size, spec.holdout_last, spec.seed
    cf_kind, cf_weight, cf_dim = spec.cf_kind, spec.cf_weight, spec.cf_dim
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    items_csv, out_dir = Path(items_csv), Path(out_dir)
    _check_out_dir(out_dir)
    precision = resolve_precision(spec.precision) if embeddings is None else "n/a"
    text_columns = list(spec.text_columns) if spec.text_columns else None

    t = time.perf_counter()
    items = read_items(items_csv, text_columns)
    n = len(items)
    if n > codebook_size**LEVELS:
        raise InputError(
            items_csv,
            f"{n} items do not fit {LEVELS} levels of codebook size {codebook_size} "
            f"({codebook_size}^{LEVELS} = {codebook_size**LEVELS} codes); "
            "use a larger codebook size",
        )
    vectors_in = load_vectors(embeddings, n) if embeddings is not None else None
    seqs = read_interactions(Path(interactions)) if interactions is not None else None
    seconds["read"] = time.perf_counter() - t

    t = time.perf_counter()
    if vectors_in is None:
        log.info("embedding %d items with %s", n, MINILM_NAME)
        content = embed_texts(
            items.texts,
            batch_size=spec.batch_size,
            show_progress=show_progress,
            precision=precision,
        )
        embedding_model = MINILM_NAME
    else:
        content = vectors_in
        embedding_model = f"user-vectors:{Path(embeddings).name}"  # type: ignore[arg-type]
    content = l2_normalise(content)
    seconds["embed"] = time.perf_counter() - t

    t = time.perf_counter()
    popularity = np.zeros(n, dtype=np.float64)
    interaction_stats: dict[str, Any] = {}
    cf_used = 0
    vectors = content
    if seqs is not None:
        full = cf_mod.count_interactions(seqs, items.ids)
        train = seqs.truncated(holdout_last)
        counts = cf_mod.count_interactions(train, items.ids)
        popularity = counts.popularity
        interaction_stats = {
            "users": len(seqs),
            "interactions": seqs.num_interactions,
            "unknown_item_interactions": full.unknown_interactions,
            "unknown_items": full.unknown_items,
            "interactions_used": int(counts.popularity.sum()),
            "items_with_interactions": int((counts.popularity > 0).sum()),
        }
        if full.unknown_interactions:
            log.warning(
                "%s: %d interactions name %d items that are not in %s; ignored",
                interactions,
                full.unknown_interactions,
                full.unknown_items,
                items_csv,
            )
        if cf_weight > 0:
            if counts.matrix.nnz == 0:
                raise InputError(
                    interactions,
                    f"no interactions with catalog items left after holding out the last "
                    f"{holdout_last} per user; nothing to compute CF vectors from",
                )
            if cf_kind == "transitions":
                cf = cf_mod.transition_vectors(train, items.ids, dim=cf_dim, seed=seed)
            else:
                cf = cf_mod.cf_vectors(counts.matrix, dim=cf_dim, idf=spec.cf_idf, seed=seed)
            cf_used = cf.shape[1]
            vectors = np.hstack([content, np.float32(cf_weight) * cf]).astype(np.float32)
            embedding_model += f"+{'seq' if cf_kind == 'transitions' else 'cf'}{cf_used}"
    seconds["cf"] = time.perf_counter() - t

    t = time.perf_counter()
    raw_codes, codebooks, residual_sq = residual_quantize(
        vectors, codebook_size, levels=LEVELS, seed=seed, iters=spec.iters
    )
    codes, stats = resolve_collisions(raw_codes, vectors, codebooks)
    if stats.collisions_after:
        raise RuntimeError(f"{stats.collisions_after} code collisions left after resolution")
    seconds["quantize"] = time.perf_counter() - t

    t = time.perf_counter()
    version = catalog_version_of(items.ids, codes, codebook_size)
    parameters: dict[str, Any] = {
        "codebook_size": codebook_size,
        "levels": LEVELS,
        "seed": seed,
        "iters": spec.iters,
        "text_columns": list(items.text_columns),
        "batch_size": spec.batch_size,
        "embedding_precision": precision,
        "environment": build_environment(),
        "cf_dim": cf_dim,
        "cf_dim_used": cf_used,
        "cf_weight": cf_weight,
        "cf_idf": spec.cf_idf,
        "cf_kind": cf_kind,
        "holdout_last": holdout_last,
        "vector_dim": int(vectors.shape[1]),
        "inputs": {
            "items": _describe_input(items_csv),
            "interactions": _describe_input(interactions),
            "embeddings": _describe_input(embeddings),
        },
    }
    manifest = CatalogManifest(
        catalog_version=version,
        codebook_size=codebook_size,
        num_items=n,
        embedding_model=embedding_model,
        parameters=parameters,
    )
    report: dict[str, Any] = {
        "catalog_version": version,
        "items": n,
        "codebook_size": codebook_size,
        "embedding_model": embedding_model,
        "vector_dim": int(vectors.shape[1]),
        "collisions_before": stats.collisions_before,
        "collisions_after": stats.collisions_after,
        "moved": stats.moved,
        "spilled": stats.spilled,
        "mean_residual_sq": float(residual_sq.mean()),
        **code_statistics(codes, codebook_size),
        **interaction_stats,
    }
    covisit = None
    if seqs is None:
        report["unknown_item_interactions"] = 0
    else:
        catalog = Catalog(manifest, list(items.ids), codes, popularity.astype(np.float64))
        covisit = build_covisit(catalog, seqs, holdout_last=holdout_last)
        report["covisit"] = {"version": covisit.version, **covisit.parameters}
    categories = read_categories(items_csv, items.ids)
    keywords = read_keywords(items_csv, items.ids)
    report["categories"] = len(categories) if categories is not None else 0
    report["keywords"] = len(keywords.vocab) if keywords is not None else 0
    _write_atomically(
        out_dir,
        items.ids,
        codes,
        popularity,
        manifest,
        report,
        seconds,
        t,
        t_start,
        covisit,
        categories,
        keywords,
    )
    return report


def code_statistics(codes: np.ndarray, k: int) -> dict[str, Any]:
    """Codebook utilisation and cluster sizes per level, and how items spread over (a, b)."""
    out: dict[str, Any] = {"levels": {}}
    for level, name in enumerate("abc"):
        sizes = np.bincount(codes[:, level], minlength=k)
        used = sizes[sizes > 0]
        out["levels"][name] = {
            "utilisation": round(float(len(used) / k), 4),
            "max_cluster_size": int(used.max()),
            "mean_cluster_size": round(float(used.mean()), 3),
        }
    prefix = codes[:, 0].astype(np.int64) * k + codes[:, 1]
    _, per_prefix = np.unique(prefix, return_counts=True)
    out["prefixes"] = len(per_prefix)
    out["single_item_prefix_share"] = round(float((per_prefix == 1).mean()), 4)
    out["max_items_per_prefix"] = int(per_prefix.max())
    out["mean_items_per_prefix"] = round(float(per_prefix.mean()), 3)
    return out


def _describe_input(path: Path | str | None) -> dict[str, str] | None:
    if path is None:
        return None
    path = Path(path)
    return {"path": str(path.resolve()), "sha256": file_hash(path)}


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace anything but a previous catalog (or an empty directory)."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise InputError(out_dir, "exists and is not a directory; refusing to replace it")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise InputError(
            out_dir,
            "exists, is not empty and is not a catalog (no manifest.json); refusing to replace it",
        )


def _write_atomically(
    out_dir: Path,
    item_ids: list[str],
    codes: np.ndarray,
    popularity: np.ndarray,
    manifest: CatalogManifest,
    report: dict[str, Any],
    seconds: dict[str, float],
    t_write: float,
    t_start: float,
    covisit: CovisitTable | None = None,
    categories: Categories | None = None,
    keywords: Keywords | None = None,
) -> None:
    with atomic_directory(out_dir) as tmp:
        write_codes(tmp / CODES_FILE, item_ids, codes)
        with (tmp / TRIE_FILE).open("wb") as f:
            np.savez(f, **build_trie(codes, manifest.codebook_size))
        with (tmp / POPULARITY_FILE).open("wb") as f:
            np.save(f, popularity.astype(np.float64))
        manifest.write(tmp)
        if covisit is not None:
            covisit.save(tmp)
        if categories is not None:
            categories.save(tmp)
        if keywords is not None:
            keywords.save(tmp)
        seconds["write"] = time.perf_counter() - t_write
        seconds["total"] = time.perf_counter() - t_start
        report["seconds"] = {key: round(value, 3) for key, value in seconds.items()}
        write_json_atomic(tmp / REPORT_FILE, report)
