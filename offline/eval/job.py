"""The ``thinkahead eval`` job: engine set-up, ranking, baseline and the JSON report."""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from offline.data import Example
from offline.decode.engines import EngineName, batch_engine
from offline.errors import InputError
from offline.eval.baselines import baseline_rows, covisit_table_ranking
from offline.eval.candidates import (
    Ranked,
    ThinkAheadEval,
    rank_full,
    rank_full_torch,
    rank_reranked,
    rank_served,
)
from offline.eval.examples import select_examples
from offline.eval.guards import SplitName, check_item_model, check_sources, provenance
from offline.eval.metrics import TOP_K, ranking_metrics
from offline.thinkahead.entries import ItemSource
from offline.thinkahead.worker import reasoner_for, thought_paths
from service.contracts.catalog import Catalog
from service.contracts.covisit import CovisitTable
from service.contracts.manifest import utc_now, write_json_atomic
from service.contracts.model import ModelInfo, load_model_info, load_serving_config

Mode = Literal["full", "think-ahead", "items"]


class EvalJob(BaseModel):
    """What ``thinkahead eval`` scores and how (the CLI's flags, validated)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    split: SplitName = "test"
    mode: Mode = "full"
    beam: int = Field(default=20, ge=1, description="beam width (>= k)")
    prefixes: int = Field(default=32, ge=1, le=256, description="think-ahead: M prefixes")
    engine: EngineName = "vllm"
    limit: int | None = Field(default=None, ge=1, description="a seeded sample of users")
    covisit_candidates: int | None = Field(
        default=None, ge=0, description="think-ahead: co-visitation candidates (None: serving.json)"
    )
    k: int = Field(default=TOP_K, ge=1)
    stale_events: int = Field(
        default=0, ge=0, description="think-ahead: the snapshot misses each user's last N events"
    )
    reuse_snapshot_b: bool = True
    reuse_snapshot_c: bool = True
    paths: int | None = Field(
        default=None,
        ge=0,
        description="G thought paths of a reasoning model (None: its own; 0: a category "
        "model states its rationale and searches plainly)",
    )
    reasoning: bool = Field(
        default=True,
        description="a reasoning model thinks before the item (as the worker does); off: it "
        "decodes plainly, as the service's online step scores",
    )
    fresh_path: Literal["engine", "rerank"] = Field(
        default="engine",
        description="think-ahead with --stale-events: the engine round, or the stored answer "
        "re-ranked without one (the service's no-engine fresh path)",
    )
    item_model: Path | None = None
    progress: bool = True

    @model_validator(mode="after")
    def _beam_covers_k(self) -> EvalJob:
        if self.beam < self.k:
            raise ValueError(f"beam ({self.beam}) must be >= k ({self.k}) for top-k metrics")
        if self.fresh_path == "rerank" and not self.stale_events:
            raise ValueError("fresh_path rerank needs stale_events >= 1 (a fresh event)")
        return self


def run_eval(
    model_dir: Path, catalog_dir: Path, interactions: Path, out: Path, job: EvalJob
) -> dict[str, Any]:
    """Score ``job.split`` and write the JSON report to ``out``; refuses artifacts that
    counted the split's targets (``offline.eval.guards``)."""
    catalog = Catalog.load(catalog_dir)
    info = load_model_info(model_dir, catalog)
    serving = load_serving_config(model_dir)
    overrides: dict[str, Any] = {
        "prefixes": job.prefixes,
        "reuse_snapshot_b": job.reuse_snapshot_b,
        "reuse_snapshot_c": job.reuse_snapshot_c,
    }
    if job.covisit_candidates is not None:
        overrides["covisit_candidates"] = job.covisit_candidates
    scoring = serving.scoring(**overrides)
    examples, data = select_examples(interactions, job.split, info.max_history, job.limit)
    items = ItemSource.load(model_dir, catalog, job.item_model)
    if job.mode == "items":  # the item-level model alone: no catalog statistics, no decoder
        check_item_model(items, job.split)
        return _write_item_model_report(info, catalog, items, model_dir, examples, job, out)
    table = CovisitTable.load_optional(catalog_dir, catalog.item_ids, catalog.version)
    check_sources(job.split, info, catalog, catalog_dir, table, items)
    covisit = table.as_mapping() if table is not None else {}
    reasoner = reasoner_for(info, catalog, catalog_dir, job.paths) if job.reasoning else None
    paths = thought_paths(info, job.paths)
    ranked: Ranked
    if job.engine == "torch" and job.mode == "full" and reasoner is None:
        ranked = rank_full_torch(model_dir, info, catalog, examples, job.k, job.beam, job.progress)
    else:
        batch = batch_engine(job.engine, model_dir, info)
        if job.mode == "full":
            ranked = rank_full(
                batch, info, catalog, examples, job.k, job.beam, job.progress, reasoner, paths
            )
        else:
            spec = ThinkAheadEval(
                scoring,
                job.beam,
                job.k,
                stale_events=job.stale_events,
                progress=job.progress,
                reasoner=reasoner,
                paths=paths,
            )
            categories = catalog.categories
            if job.fresh_path == "rerank":
                ranked = rank_reranked(batch, info, catalog, examples, spec, covisit, items)
            else:
                ranked = rank_served(
                    batch, info, catalog, examples, spec, covisit, items, categories
                )
    reused = reused_steps(job.reuse_snapshot_b, job.reuse_snapshot_c)
    stale = f", snapshot {job.stale_events} event(s) behind{reused}" if job.stale_events else ""
    if job.fresh_path == "rerank":
        encoded = " with the fresh item-level scores" if items is not None else ""
        stale = f", snapshot {job.stale_events} event(s) behind, stored answer re-ranked{encoded}"
    label = (
        f"served answer (think-ahead M={job.prefixes} + {scoring.covisit_candidates} "
        f"co-visitation + {scoring.affinity_candidates} item-level candidates, "
        f"fused score{stale})"
        if job.mode == "think-ahead"
        else f"decoder ({job.mode}, {job.engine}, beam {job.beam}{_thinking(reasoner, paths)})"
    )
    rows = {label: report_row(ranked, examples), **baseline_rows(data, examples, job.split, job.k)}
    if covisit:
        table_row = covisit_table_ranking(catalog, covisit, examples, job.k)
        rows[COVISIT_TABLE_ROW] = {m: round(v, 5) for m, v in table_row.items()}
    think_ahead = job.mode == "think-ahead"
    report = {
        **_header(info, catalog, table, items, examples, job),
        "model_manifest": info.manifest.model_dump(mode="json", exclude={"metrics"}),
        "validation_at_training": info.manifest.metrics.get("validation"),
        "serving": serving.model_dump(mode="json") if think_ahead else None,
        "scoring": scoring.model_dump(mode="json") if think_ahead else None,
        "rows": rows,
    }
    write_json_atomic(Path(out), report)
    return report


def _header(
    info: ModelInfo,
    catalog: Catalog,
    table: CovisitTable | None,
    items: ItemSource | None,
    examples: Sequence[Example],
    job: EvalJob,
) -> dict[str, Any]:
    """What every eval report opens with: the job, the artifacts it scored with and how they
    were built, the machine."""
    item_model = None
    if items is not None:
        item_model = {"version": items.model.version, "refit": items.refit, "path": str(items.path)}
    return {
        "created_at": utc_now(),
        "split": job.split,
        "mode": job.mode,
        "users": len(examples),
        "job": job.model_dump(mode="json"),
        "model_version": info.version,
        "catalog_version": catalog.version,
        "provenance": provenance(info, catalog, table, item_model),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
    }


MODES = ("full", "think-ahead", "items")
COVISIT_TABLE_ROW = "co-visitation table (the catalog's, as the fallback serves it)"
ITEM_MODEL_ROW = "item-level model alone (softmax over items), full ranking"


def _write_item_model_report(
    info: ModelInfo,
    catalog: Catalog,
    items: ItemSource | None,
    model_dir: Path,
    examples: Sequence[Example],
    job: EvalJob,
    out: Path,
) -> dict[str, Any]:
    """``--mode items``: the worker's item-level model ranking every item by itself, history
    excluded: what it brings before fusion, comparable with the published SASRec rows."""
    from offline.items.train import evaluate_item_model

    if items is None:
        raise InputError(model_dir, "no item-level model (items/ or --item-model)")
    t0 = time.monotonic()
    metrics = evaluate_item_model(items.model, catalog, list(examples), ks=(5, TOP_K))
    row = {m: round(v, 5) for m, v in metrics.items() if m != "users"}
    row |= {"users": len(examples), "invalid_items": 0}
    row["seconds"] = round(time.monotonic() - t0, 1)
    report = {
        **_header(info, catalog, None, items, examples, job),
        "item_model": items.model.describe(),
        "rows": {ITEM_MODEL_ROW: row},
    }
    write_json_atomic(Path(out), report)
    return report


def _thinking(reasoner: object | None, paths: int) -> str:
    return f", reasoning over {paths} paths" if reasoner is not None else ""


def reused_steps(b: bool, c: bool) -> str:
    """The report label's note on which snapshot log-probs a stale history reused."""
    reused = [step for step, on in (("log P(b | a)", b), ("log P(c | a, b)", c)) if on]
    return f", {' and '.join(reused)} reused" if reused else ", all steps fresh"


def report_row(ranked: Ranked, examples: Sequence[Example]) -> dict[str, Any]:
    metrics = ranking_metrics(ranked.items, [e.target for e in examples])
    row: dict[str, Any] = {
        **{k: round(v, 5) for k, v in metrics.items()},
        "invalid_items": ranked.invalid,
        "seconds": round(ranked.seconds, 1),
    }
    if ranked.coverage:
        row["prefix_coverage"] = dict(ranked.coverage)
    if ranked.rationale:
        row["rationale"] = dict(ranked.rationale)
    return row
