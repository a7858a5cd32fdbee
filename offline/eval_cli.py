"""The ``thinkahead eval`` job: engine set-up, ranking, baseline and the JSON report."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from offline.errors import InputError
from offline.evaluate import (
    Ranked,
    ThinkAheadEval,
    covisit_table_ranking,
    covisitation_baseline,
    popularity_baseline,
    rank_full,
    rank_served,
    report_row,
    select_examples,
    think_ahead_candidates,
)
from offline.metrics import TOP_K
from offline.thinkahead.entries import ItemSource
from offline.tune import AFFINITY_CANDIDATES_GRID, CANDIDATES_GRID, grid_search
from service.contracts.catalog import Catalog
from service.contracts.covisit import CovisitTable, Neighbours
from service.contracts.fusion import FusionWeights
from service.contracts.manifest import utc_now, write_json_atomic
from service.contracts.model import (
    ServingConfig,
    load_model_info,
    load_serving_config,
)
from service.contracts.think_ahead import ScoringSettings


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


def batch_engine(engine: str, model_dir: Path, info: Any) -> Any:
    """vLLM's offline engine, or the plain-PyTorch one (same requests, same answers to ~1e-5:
    the whole test split in minutes on a CPU)."""
    if engine == "torch":
        from offline.decode.torch_engine import TorchBatchEngine

        return TorchBatchEngine(model_dir, info.token_ids)
    from service.engine.vllm_engine import VllmBatchEngine, VllmOptions

    return VllmBatchEngine(model_dir, VllmOptions())


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
    covisit_candidates: int | None = None,
    k: int = TOP_K,
    progress: bool = True,
    stale_events: int = 0,
    reuse_snapshot_b: bool = True,
    item_model: Path | None = None,
    reuse_snapshot_c: bool = True,
) -> dict[str, Any]:
    if split not in ("test", "valid"):
        raise InputError(None, f"--split must be test or valid, got {split!r}")
    if mode not in MODES:
        raise InputError(None, f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if engine not in ("vllm", "torch"):
        raise InputError(None, f"--engine must be vllm or torch, got {engine!r}")
    if beam < k:
        raise InputError(None, f"--beam must be >= {k} for top-{k} metrics")
    catalog = Catalog.load(catalog_dir)
    info = load_model_info(model_dir, catalog)
    serving = load_serving_config(model_dir)
    overrides: dict[str, Any] = {
        "prefixes": prefixes,
        "reuse_snapshot_b": reuse_snapshot_b,
        "reuse_snapshot_c": reuse_snapshot_c,
    }
    if covisit_candidates is not None:
        overrides["covisit_candidates"] = covisit_candidates
    scoring = serving.scoring(**overrides)
    examples, data = select_examples(interactions, split, info.max_history, limit)
    if mode == "items":
        return _write_item_model_report(model_dir, catalog, info, item_model, examples, split, out)
    covisit = load_covisit(catalog_dir, catalog)
    if engine == "torch" and mode == "full":
        ranked = rank_full_torch(model_dir, info, catalog, examples, k, beam, progress)
    else:
        batch = batch_engine(engine, model_dir, info)
        if mode == "full":
            ranked = rank_full(batch, info, catalog, examples, k, beam, progress=progress)
        else:
            spec = ThinkAheadEval(scoring, beam, k, stale_events=stale_events, progress=progress)
            items = ItemSource.load(model_dir, catalog, item_model)
            ranked = rank_served(batch, info, catalog, examples, spec, covisit, items)
    reused = reused_steps(reuse_snapshot_b, reuse_snapshot_c)
    stale = f", snapshot {stale_events} event(s) behind{reused}" if stale_events else ""
    label = (
        f"served answer (think-ahead M={prefixes} + {scoring.covisit_candidates} "
        f"co-visitation + {scoring.affinity_candidates} item-level candidates, "
        f"fused score{stale})"
        if mode == "think-ahead"
        else f"decoder ({mode}, {engine}, beam {beam})"
    )
    rows = {label: report_row(ranked, examples), **baseline_rows(data, examples, split, k)}
    if covisit:
        table = covisit_table_ranking(catalog, covisit, examples, k)
        rows[COVISIT_TABLE_ROW] = {m: round(v, 5) for m, v in table.items()}
    report = {
        "created_at": utc_now(),
        "split": split,
        "mode": mode,
        "users": len(examples),
        "model_version": info.version,
        "catalog_version": catalog.version,
        "model_manifest": info.manifest.model_dump(mode="json", exclude={"metrics"}),
        "validation_at_training": info.manifest.metrics.get("validation"),
        "serving": serving.model_dump(mode="json") if mode == "think-ahead" else None,
        "scoring": scoring.model_dump(mode="json") if mode == "think-ahead" else None,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "rows": rows,
    }
    write_json_atomic(Path(out), report)
    return report


MODES = ("full", "think-ahead", "items")
COVISIT_TABLE_ROW = "co-visitation table (the catalog's, as the fallback serves it)"
ITEM_MODEL_ROW = "item-level model alone (SASRec, softmax over items), full ranking"


def _write_item_model_report(
    model_dir: Path,
    catalog: Catalog,
    info: Any,
    item_model: Path | None,
    examples: list[Any],
    split: str,
    out: Path,
) -> dict[str, Any]:
    """``--mode items``: the worker's item-level model ranking every item by itself, history
    excluded: what it brings before fusion, comparable with the published SASRec rows."""
    from offline.items.train import evaluate

    items = ItemSource.load(model_dir, catalog, item_model)
    if items is None:
        raise InputError(model_dir, "no item-level model (items/ or --item-model)")
    t0 = time.monotonic()
    metrics = evaluate(items.model.network, catalog, examples, ks=(5, TOP_K))
    row = {m: round(v, 5) for m, v in metrics.items() if m != "users"}
    row |= {"users": len(examples), "invalid_items": 0}
    row["seconds"] = round(time.monotonic() - t0, 1)
    report = {
        "created_at": utc_now(),
        "split": split,
        "mode": "items",
        "users": len(examples),
        "model_version": info.version,
        "catalog_version": catalog.version,
        "item_model": items.model.manifest.model_dump(mode="json"),
        "rows": {ITEM_MODEL_ROW: row},
    }
    write_json_atomic(Path(out), report)
    return report


def reused_steps(b: bool, c: bool) -> str:
    """The report label's note on which snapshot log-probs a stale history reused."""
    reused = [step for step, on in (("log P(b | a)", b), ("log P(c | a, b)", c)) if on]
    return f", {' and '.join(reused)} reused" if reused else ", all steps fresh"


def tune_blend(
    model_dir: Path,
    catalog_dir: Path,
    interactions: Path,
    *,
    prefixes: int = 32,
    beam: int = 32,
    limit: int | None = 5000,
    k: int = TOP_K,
    engine: str = "vllm",
    progress: bool = True,
    item_model: Path | None = None,
) -> dict[str, Any]:
    """Learn the fused score's weights and the co-visitation and item-level candidate counts
    on the validation split only, and record them in the model directory's ``serving.json``
    (the service's, the eval's and the bench's default)."""
    catalog = Catalog.load(catalog_dir)
    info = load_model_info(model_dir, catalog)
    examples, _ = select_examples(interactions, "valid", info.max_history, limit)
    table = CovisitTable.load_optional(catalog_dir, catalog.item_ids, catalog.version)
    covisit = table.as_mapping() if table is not None else {}
    batch = batch_engine(engine, model_dir, info)
    items = ItemSource.load(model_dir, catalog, item_model)
    # every candidate the grid can reach, scored once
    widest = ScoringSettings(
        covisit_candidates=max(CANDIDATES_GRID),
        affinity_candidates=max(AFFINITY_CANDIDATES_GRID) if items is not None else 0,
        prefixes=prefixes,
    )
    t0 = time.monotonic()
    # as the service meets users: the history of their snapshot, and one event past it
    users, fresh = (
        think_ahead_candidates(
            batch,
            info,
            catalog,
            examples,
            ThinkAheadEval(
                widest, beam, k, stale_events=stale_events, prune=False, progress=progress
            ),
            covisit,
            items,
        )[0]
        for stale_events in (0, 1)
    )
    trials = grid_search(users, k, fresh=fresh)
    best = trials[0]
    decoder_only = next(
        t
        for t in trials
        if t.candidates == 0 and t.weights == FusionWeights(offline=t.weights.offline)
    )
    config = ServingConfig(
        weights=best.weights,
        covisit_candidates=best.covisit_candidates,
        affinity_candidates=best.affinity_candidates,
        covisit_version=table.version if table is not None else None,
        item_model_version=items.model.version if items is not None else None,
        chosen_on=f"validation split, {len(examples)} users, each scored unchanged and one "
        f"event past its snapshot: the fewest extra candidates within 1% of the best mean "
        f"NDCG@{k} over a grid of {len(trials)} settings",
        created_at=utc_now(),
        tuning={
            "best": best.row(),
            "grid_best_ndcg@10": round(max(t.ndcg for t in trials), 5),
            "decoder_only": decoder_only.row(),
            "top": [t.row() for t in trials[:10]],
            "prefixes": prefixes,
            "seconds": round(time.monotonic() - t0, 1),
        },
    )
    config.write(model_dir)
    return config.model_dump(mode="json")


def load_covisit(catalog_dir: Path, catalog: Catalog) -> dict[str, Neighbours]:
    """The catalog's co-visitation table; empty (decoder only) when it has none."""
    table = CovisitTable.load_optional(catalog_dir, catalog.item_ids, catalog.version)
    return table.as_mapping() if table is not None else {}


def baseline_rows(data: Any, examples: list[Any], split: str, k: int) -> dict[str, Any]:
    """Co-visitation from the training split (comparable with the papers) and, on test, with
    the validation transitions counted too (what a refit model sees)."""
    rows = {"co-visitation (train split)": covisitation_baseline(data.train, examples, k)}
    if split == "test":
        rows["co-visitation (train + validation)"] = covisitation_baseline(
            data.train_and_valid, examples, k
        )
    rows["popularity (train split)"] = popularity_baseline(data.train, examples, k)
    return {name: {m: round(v, 5) for m, v in row.items()} for name, row in rows.items()}
