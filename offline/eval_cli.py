"""The ``thinkahead eval`` job: engine set-up, ranking, baseline and the JSON report."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from offline.errors import InputError
from offline.evaluate import (
    Ranked,
    covisitation_baseline,
    rank_full,
    rank_think_ahead,
    report_row,
    select_examples,
)
from service.catalog import Catalog
from service.manifest import utc_now, write_json_atomic
from service.model import SERVING_FILE, load_model_info, load_serving_config


def rank_full_torch(
    model_dir: Path,
    info: Any,
    catalog: Catalog,
    examples: list[Any],
    k: int,
    beam: int,
    progress: bool,
) -> Ranked:
    from transformers import LlamaForCausalLM

    from offline.train.trainer import rank_examples

    model = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
    t0 = time.monotonic()
    ranked = rank_examples(model, catalog, info.token_ids, examples, beam, k=k, progress=progress)
    return Ranked(ranked, 0, time.monotonic() - t0)


def run_eval(
    model_dir: Path,
    catalog_dir: Path,
    interactions: Path,
    out: Path,
    *,
    split: str = "test",
    mode: str = "full",
    beam: int = 20,
    prefixes: int = 32,
    engine: str = "vllm",
    limit: int | None = None,
    k: int = 10,
    progress: bool = True,
) -> dict[str, Any]:
    if split not in ("test", "valid"):
        raise InputError(None, f"--split must be test or valid, got {split!r}")
    if mode not in ("full", "think-ahead"):
        raise InputError(None, f"--mode must be full or think-ahead, got {mode!r}")
    if engine not in ("vllm", "torch") or (engine == "torch" and mode != "full"):
        raise InputError(None, "--engine must be vllm, or torch with --mode full")
    if beam < k:
        raise InputError(None, f"--beam must be >= {k} for top-{k} metrics")
    catalog = Catalog.load(catalog_dir)
    info = load_model_info(model_dir, catalog)
    examples, data = select_examples(interactions, split, info.max_history, limit)
    if engine == "torch":
        ranked = rank_full_torch(model_dir, info, catalog, examples, k, beam, progress)
    else:
        from service.engine.vllm_engine import VllmBatchEngine, VllmOptions

        batch = VllmBatchEngine(model_dir, VllmOptions())
        if mode == "full":
            ranked = rank_full(batch, info, catalog, examples, k, beam, progress=progress)
        else:
            weight = float(load_serving_config(model_dir).get("offline_weight", 0.0))  # type: ignore[arg-type]
            (ranked,) = rank_think_ahead(
                batch,
                info,
                catalog,
                examples,
                k,
                prefixes,
                beam,
                offline_weights=(weight,),
                progress=progress,
            )
    rows = {
        f"decoder ({mode}, {engine}, beam {beam})": report_row(ranked, examples),
        "co-visitation (train split)": {
            k_: round(v, 5) for k_, v in covisitation_baseline(data, examples, k).items()
        },
    }
    report = {
        "created_at": utc_now(),
        "split": split,
        "mode": mode,
        "users": len(examples),
        "model_version": info.version,
        "catalog_version": catalog.version,
        "model_manifest": info.manifest.model_dump(mode="json", exclude={"metrics"}),
        "validation_at_training": info.manifest.metrics.get("validation"),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "rows": rows,
    }
    write_json_atomic(Path(out), report)
    return report


def tune_blend(
    model_dir: Path,
    catalog_dir: Path,
    interactions: Path,
    *,
    weights: list[float],
    prefixes: int = 32,
    beam: int = 32,
    limit: int | None = 3000,
    k: int = 10,
    progress: bool = True,
) -> dict[str, Any]:
    """Choose the offline prefix score's blend weight on the validation split and record it in
    the model directory's ``serving.json`` (the service's default)."""
    from service.engine.vllm_engine import VllmBatchEngine, VllmOptions

    catalog = Catalog.load(catalog_dir)
    info = load_model_info(model_dir, catalog)
    examples, _ = select_examples(interactions, "valid", info.max_history, limit)
    batch = VllmBatchEngine(model_dir, VllmOptions())
    ranked = rank_think_ahead(
        batch,
        info,
        catalog,
        examples,
        k,
        prefixes,
        beam,
        offline_weights=weights,
        progress=progress,
    )
    rows = {str(w): report_row(r, examples) for w, r in zip(weights, ranked, strict=True)}
    best = max(weights, key=lambda w: (rows[str(w)]["ndcg@10"], rows[str(w)]["recall@10"], -w))
    config = {
        "offline_weight": best,
        "chosen_on": "validation split, NDCG@10",
        "users": len(examples),
        "prefixes": prefixes,
        "candidates": rows,
        "created_at": utc_now(),
    }
    write_json_atomic(Path(model_dir) / SERVING_FILE, config)
    return config
