"""``thinkahead eval``, ``tune-blend``, ``tune-rerank`` and ``quality-report``: quality on the
leave-one-out splits, the fused score's weights and the no-engine fresh answer's settings
(validation only) and the report beside published figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from offline.cli.common import (
    CatalogDir,
    EngineChoice,
    Interactions,
    ItemModelDir,
    ModelDir,
    Progress,
    default_of,
    options_of,
    user_errors,
)
from offline.eval.job import EvalJob
from service.config import RecommendSettings

_job = options_of(EvalJob)


@user_errors
def eval_cmd(
    model: ModelDir,
    catalog: CatalogDir,
    interactions: Interactions,
    out: Annotated[Path, typer.Option(help="report JSON to write")],
    split: Annotated[str, _job("split", "test or valid")] = default_of(EvalJob, "split"),
    mode: Annotated[
        str, _job("mode", "full, think-ahead, or items (the item-level model alone)")
    ] = default_of(EvalJob, "mode"),
    beam: Annotated[int, _job("beam")] = default_of(RecommendSettings, "full_decode_beam"),
    prefixes: Annotated[int, _job("prefixes")] = default_of(RecommendSettings, "max_prefixes"),
    covisit_candidates: Annotated[int | None, _job("covisit_candidates")] = None,
    engine: EngineChoice = "vllm",
    limit: Annotated[int | None, _job("limit")] = None,
    stale_events: Annotated[int, _job("stale_events")] = 0,
    reuse_snapshot_b: Annotated[
        bool, _job("reuse_snapshot_b", "think-ahead: after fresh events reuse log P(b | a)")
    ] = default_of(RecommendSettings, "reuse_snapshot_b"),
    reuse_snapshot_c: Annotated[
        bool, _job("reuse_snapshot_c", "think-ahead: reuse the snapshot's log P(c | a, b)")
    ] = default_of(RecommendSettings, "reuse_snapshot_c"),
    paths: Annotated[int | None, _job("paths")] = None,
    fresh_path: Annotated[str, _job("fresh_path")] = "engine",
    reasoning: Annotated[bool, _job("reasoning")] = True,
    item_model: ItemModelDir = None,
    progress: Progress = True,
) -> None:
    """Recall@5/10 and NDCG@5/10, full ranking over the catalog, beside co-visitation.
    Refuses a catalog, co-visitation table or model that counted the split's targets."""
    from offline.eval.job import run_eval

    job = EvalJob.model_validate(
        {
            "split": split,
            "mode": mode,
            "beam": beam,
            "prefixes": prefixes,
            "covisit_candidates": covisit_candidates,
            "engine": engine,
            "limit": limit,
            "stale_events": stale_events,
            "reuse_snapshot_b": reuse_snapshot_b,
            "reuse_snapshot_c": reuse_snapshot_c,
            "paths": paths,
            "fresh_path": fresh_path,
            "reasoning": reasoning,
            "item_model": item_model,
            "progress": progress,
        }
    )
    report = run_eval(model, catalog, interactions, out, job)
    typer.echo(json.dumps(report["rows"], indent=2))


@user_errors
def tune_blend_cmd(
    model: Annotated[Path, typer.Option(help="model directory (serving.json is written there)")],
    catalog: CatalogDir,
    interactions: Interactions,
    prefixes: Annotated[int, typer.Option(help="M prefixes, as served")] = default_of(
        RecommendSettings, "max_prefixes"
    ),
    limit: Annotated[int | None, typer.Option(help="validation users sampled")] = 5000,
    engine: EngineChoice = "vllm",
    item_model: ItemModelDir = None,
    judge_fresh: Annotated[
        bool | None,
        typer.Option(
            "--judge-fresh/--no-judge-fresh",
            help="also judge on users one event past their entry scored by an engine round; "
            "default: only without an item-level model (with one, tune-rerank owns that path)",
        ),
    ] = None,
    progress: Progress = True,
) -> None:
    """Learn the fused score's weights on the validation split (never on test)."""
    from offline.eval.tune import tune_blend

    config = tune_blend(
        model,
        catalog,
        interactions,
        prefixes=prefixes,
        beam=prefixes,
        limit=limit,
        engine=engine,
        progress=progress,
        item_model=item_model,
        judge_fresh=judge_fresh,
    )
    shown = ("weights", "covisit_candidates", "affinity_candidates", "tuning")
    typer.echo(json.dumps({k: config[k] for k in shown}))


@user_errors
def tune_rerank_cmd(
    model: Annotated[Path, typer.Option(help="model directory (serving.json is written there)")],
    catalog: CatalogDir,
    interactions: Interactions,
    prefixes: Annotated[int, typer.Option(help="M prefixes, as served")] = default_of(
        RecommendSettings, "max_prefixes"
    ),
    beam: Annotated[int, typer.Option(help="the worker's beam, as `eval --beam`")] = default_of(
        RecommendSettings, "full_decode_beam"
    ),
    limit: Annotated[int | None, typer.Option(help="validation users sampled")] = 3000,
    engine: EngineChoice = "vllm",
    item_model: ItemModelDir = None,
    progress: Progress = True,
) -> None:
    """Learn the no-engine fresh answer's settings on the validation split (after
    tune-blend): users one event past their entry, the stored answer re-ranked."""
    from offline.eval.tune_rerank import tune_rerank

    config = tune_rerank(
        model,
        catalog,
        interactions,
        prefixes=prefixes,
        beam=beam,
        limit=limit,
        engine=engine,
        progress=progress,
        item_model=item_model,
    )
    typer.echo(json.dumps({k: config[k] for k in ("rerank", "rerank_tuning")}))


@user_errors
def quality_report_cmd(
    served: Annotated[Path, typer.Option(help="`eval --mode think-ahead` report (test split)")],
    decoder: Annotated[
        list[Path], typer.Option(help="`eval --mode full` report (test split; repeat)")
    ],
    model: Annotated[Path, typer.Option(help="model directory (manifest, serving.json)")],
    out: Annotated[Path, typer.Option(help="directory for quality.md and quality.json")],
    refit: Annotated[
        list[Path] | None,
        typer.Option(help="`eval` report (think-ahead or full) of a refit model (repeat)"),
    ] = None,
    items: Annotated[
        Path | None, typer.Option(help="`eval --mode items` report (the item-level model alone)")
    ] = None,
) -> None:
    """The quality report: our rows beside co-visitation, popularity and published figures."""
    from offline.eval.report import BEAUTY_COMMANDS, REFIT_COMMANDS, build_quality_report

    # with refit reports the last command, the report's own, gains them
    commands = BEAUTY_COMMANDS[:-1] + REFIT_COMMANDS if refit else BEAUTY_COMMANDS
    build_quality_report(served, decoder, model, out, commands, refit=refit or (), items=items)
    typer.echo((out / "quality.md").read_text())
