"""The ``thinkahead`` command line: a thin mapping of flags onto the offline functions and the
service. A flag that fills in a field of ``TrainConfig``, ``ThinkAheadJob`` or the service's
``Settings`` takes its default from that field instead of repeating it.

Pipeline stages, in order: ``catalog build``, ``train``, ``model add-item-tokens`` (an existing
LLM instead), ``tune-blend``, ``think-ahead``, ``serve``; beside them ``covisit build``,
``history load``, ``eval``, ``quality-report``, ``bench`` and ``demo`` (the whole pipeline on a
sample). Input errors print ``error: <message>`` to stderr and exit with code 2.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from offline.catalog.covisit import DEFAULT_TOP_N
from offline.errors import InputError
from service.contracts.answers import DEFAULT_ANSWER_ITEMS
from service.contracts.catalog import CatalogError
from service.contracts.manifest import ManifestError

# ValidationError: a setting out of range (a training config built from the options)
USER_ERRORS: tuple[type[Exception], ...] = (
    InputError,
    CatalogError,
    ManifestError,
    ValidationError,
)
INPUT_ERROR_EXIT = 2

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Think-Ahead recommendation.")
catalog_app = typer.Typer(no_args_is_help=True, help="Semantic-ID catalogs.")
app.add_typer(catalog_app, name="catalog")

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn the project's input errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(INPUT_ERROR_EXIT) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@catalog_app.command("build")
@user_errors
def catalog_build(
    items: Annotated[Path, typer.Option(help="items CSV: item_id, title[, categories, ...]")],
    out: Annotated[Path, typer.Option(help="catalog directory to write (replaced atomically)")],
    interactions: Annotated[
        Path | None, typer.Option(help="interactions CSV (user_id, item_id[, timestamp]) for CF")
    ] = None,
    codebook_size: Annotated[int, typer.Option(help="codes per level (K)")] = 256,
    embeddings: Annotated[
        Path | None, typer.Option(help=".npy item vectors (N x d) instead of MiniLM")
    ] = None,
    cf_dim: Annotated[int, typer.Option(help="CF vector dimensions")] = 64,
    cf_weight: Annotated[
        float, typer.Option(help="weight of the CF part (0 = content only)")
    ] = 1.0,
    cf_idf: Annotated[
        bool, typer.Option(help="idf-weight the user x item matrix (--cf-kind user-item)")
    ] = False,
    cf_kind: Annotated[
        str,
        typer.Option(
            help="transitions (what follows what: next items share prefixes) or user-item "
            "(SVD of who bought what)"
        ),
    ] = "transitions",
    holdout_last: Annotated[
        int, typer.Option(help="ignore each user's last N interactions (benchmarks: 2)")
    ] = 0,
    seed: Annotated[int, typer.Option(help="k-means / SVD seed")] = 0,
    iters: Annotated[int, typer.Option(help="Lloyd iterations per level")] = 20,
    text_column: Annotated[
        list[str] | None, typer.Option(help="text column (repeat); default title + known ones")
    ] = None,
    precision: Annotated[
        str, typer.Option(help="MiniLM precision: auto (bf16 where native), float32, bfloat16")
    ] = "auto",
    progress: Annotated[bool, typer.Option(help="show the embedding progress bar")] = True,
) -> None:
    """Build semantic IDs (3 tokens per item) for an items file."""
    from offline.catalog.build import build_catalog

    report = build_catalog(
        items,
        out,
        codebook_size=codebook_size,
        interactions=interactions,
        embeddings=embeddings,
        cf_dim=cf_dim,
        cf_weight=cf_weight,
        cf_idf=cf_idf,
        cf_kind=cf_kind,
        holdout_last=holdout_last,
        seed=seed,
        iters=iters,
        text_columns=text_column or None,
        precision=precision,
        show_progress=progress,
    )
    levels = report["levels"]
    secs = report["seconds"]
    typer.echo(
        f"catalog {report['catalog_version']} -> {out}\n"
        f"  items {report['items']}, K {report['codebook_size']}, vectors "
        f"{report['embedding_model']} ({report['vector_dim']} dims)\n"
        f"  collisions before {report['collisions_before']} (moved {report['moved']}, spilled "
        f"{report['spilled']}), after {report['collisions_after']}\n"
        f"  utilisation a/b/c "
        + "/".join(f"{levels[lv]['utilisation']:.2f}" for lv in "abc")
        + f", prefixes {report['prefixes']} (single-item share "
        f"{report['single_item_prefix_share']:.2f}, max {report['max_items_per_prefix']})\n"
        f"  unknown-item interactions {report['unknown_item_interactions']}\n"
        f"  seconds: total {secs['total']:.1f} ("
        + ", ".join(f"{k} {v:.1f}" for k, v in secs.items() if k != "total")
        + ")"
    )


def _train_default(name: str) -> Any:
    from offline.train.config import TrainConfig

    return TrainConfig.model_fields[name].default


def _train_help(name: str) -> str | None:
    from offline.train.config import TrainConfig

    return TrainConfig.model_fields[name].description


def _items_default(name: str) -> Any:
    from offline.items.config import ItemTrainConfig

    return ItemTrainConfig.model_fields[name].default


def _job_default(name: str) -> Any:
    from offline.thinkahead.worker import ThinkAheadJob

    return ThinkAheadJob.model_fields[name].default


def _redis_default(name: str) -> Any:
    from service.config import RedisSettings

    return RedisSettings.model_fields[name].default


def _recommend_default(name: str) -> Any:
    from service.config import RecommendSettings

    return RecommendSettings.model_fields[name].default


@app.command("train")
@user_errors
def train_cmd(
    catalog: Annotated[Path, typer.Option(help="catalog directory")],
    interactions: Annotated[Path, typer.Option(help="interactions CSV")],
    out: Annotated[Path, typer.Option(help="model directory to write (HF format)")],
    preset: Annotated[str, typer.Option(help="model size: tiny, small, base")] = _train_default(
        "preset"
    ),
    epochs: Annotated[
        int, typer.Option(help="epochs of the cosine schedule (early stopping may end sooner)")
    ] = _train_default("epochs"),
    batch_size: Annotated[int, typer.Option()] = _train_default("batch_size"),
    lr: Annotated[float, typer.Option()] = _train_default("lr"),
    patience: Annotated[int, typer.Option(help="epochs without validation gain")] = _train_default(
        "patience"
    ),
    val_users: Annotated[int, typer.Option(help="validation sample (0 = all)")] = _train_default(
        "val_users"
    ),
    embed_dropout: Annotated[
        float, typer.Option(help=_train_help("embed_dropout"))
    ] = _train_default("embed_dropout"),
    item_dropout: Annotated[float, typer.Option(help=_train_help("item_dropout"))] = _train_default(
        "item_dropout"
    ),
    test_shaped_validation: Annotated[
        bool, typer.Option(help=_train_help("test_shaped_validation"))
    ] = _train_default("test_shaped_validation"),
    max_minutes: Annotated[
        float | None, typer.Option(help="stop after this long")
    ] = _train_default("max_minutes"),
    refit: Annotated[
        bool,
        typer.Option(
            help="train on train + validation for exactly --epochs (the serving model; use the "
            "best epoch of a selection run; its figures are not comparable with the papers)"
        ),
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="continue a killed run of the same settings from its checkpoint")
    ] = True,
    low_memory: Annotated[
        bool, typer.Option(help="keep resident memory near the live tensors (slower)")
    ] = False,
    seed: Annotated[int, typer.Option()] = _train_default("seed"),
    progress: Annotated[bool, typer.Option()] = True,
) -> None:
    """Train the decoder on the leave-one-out train split; the best epoch on validation is
    kept. Checkpointed every epoch: rerunning a killed command continues it."""
    from offline.train.trainer import TrainConfig, train

    cfg = TrainConfig(
        preset=preset,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        val_users=val_users,
        embed_dropout=embed_dropout,
        item_dropout=item_dropout,
        test_shaped_validation=test_shaped_validation,
        max_minutes=max_minutes,
        refit=refit,
        resume=resume,
        low_memory=low_memory,
        seed=seed,
    )
    manifest = train(catalog, interactions, out, cfg, progress=progress)
    best = manifest.metrics["validation"]
    params = manifest.parameters
    chosen = _chosen_by(refit, best)
    typer.echo(
        f"model {manifest.model_version} -> {out}\n  best epoch {best.get('epoch')}: {chosen}; "
        f"{params['train_seconds']:.0f}s, peak RSS {params['peak_rss_gb']:.1f} GB"
    )


@app.command("train-items")
@user_errors
def train_items_cmd(
    catalog: Annotated[Path, typer.Option(help="catalog directory")],
    interactions: Annotated[Path, typer.Option(help="interactions CSV")],
    out: Annotated[Path, typer.Option(help="item model directory to write")],
    epochs: Annotated[int, typer.Option(help="at most this many epochs")] = _items_default(
        "epochs"
    ),
    patience: Annotated[int, typer.Option(help="epochs without validation gain")] = _items_default(
        "patience"
    ),
    dim: Annotated[int, typer.Option(help="item vector size")] = _items_default("dim"),
    negatives: Annotated[
        int, typer.Option(help="sampled negatives per batch (catalogs above --full-softmax-items)")
    ] = _items_default("negatives"),
    full_softmax_items: Annotated[
        int, typer.Option(help="catalogs up to this size train with the full softmax")
    ] = _items_default("full_softmax_items"),
    max_minutes: Annotated[
        float | None, typer.Option(help="stop after this long")
    ] = _items_default("max_minutes"),
    refit: Annotated[
        bool,
        typer.Option(help="train on train + validation for exactly --epochs (not comparable)"),
    ] = False,
    seed: Annotated[int, typer.Option()] = _items_default("seed"),
    progress: Annotated[bool, typer.Option()] = True,
) -> None:
    """Train the item-level model (SASRec, softmax over items) whose per-user best items the
    think-ahead worker stores as candidates and a feature of the fused score."""
    from offline.items.config import ItemTrainConfig
    from offline.items.train import train_item_model
    from service.contracts.catalog import Catalog

    cfg = ItemTrainConfig(
        epochs=epochs,
        patience=patience,
        dim=dim,
        negatives=negatives,
        full_softmax_items=full_softmax_items,
        max_minutes=max_minutes,
        seed=seed,
    )
    manifest = train_item_model(Catalog.load(catalog), interactions, out, cfg, refit, progress)
    best = manifest.training["best"]
    chosen = _chosen_by(refit, best)
    typer.echo(
        f"item model {manifest.version} -> {out}\n  best epoch {manifest.best_epoch}: "
        f"{chosen}; {manifest.training['seconds']:.0f}s, "
        f"peak RSS {manifest.training['peak_rss_gb']:.1f} GB"
    )


def _chosen_by(refit: bool, best: dict[str, Any]) -> str:
    """What picked a trained model's epoch, for the train commands' last line."""
    if refit:
        return "refit on train + validation"
    return f"val R@10 {best.get('recall@10', 0):.4f} N@10 {best.get('ndcg@10', 0):.4f}"


@app.command("eval")
@user_errors
def eval_cmd(
    model: Annotated[Path, typer.Option(help="model directory")],
    catalog: Annotated[Path, typer.Option(help="catalog directory")],
    interactions: Annotated[Path, typer.Option(help="interactions CSV")],
    out: Annotated[Path, typer.Option(help="report JSON to write")],
    split: Annotated[str, typer.Option(help="test or valid")] = "test",
    mode: Annotated[
        str, typer.Option(help="full, think-ahead, or items (the item-level model alone)")
    ] = "full",
    beam: Annotated[int, typer.Option(help="beam width (>= 10)")] = _recommend_default(
        "full_decode_beam"
    ),
    prefixes: Annotated[int, typer.Option(help="think-ahead: M prefixes")] = _recommend_default(
        "max_prefixes"
    ),
    covisit_candidates: Annotated[
        int | None,
        typer.Option(help="think-ahead: co-visitation candidates (default: serving.json)"),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="vllm, or torch (plain PyTorch, same requests, minutes per split on CPU)"
        ),
    ] = "vllm",
    limit: Annotated[int | None, typer.Option(help="evaluate a random sample of users")] = None,
    stale_events: Annotated[
        int,
        typer.Option(help="think-ahead: the snapshot misses each user's last N events"),
    ] = 0,
    reuse_snapshot_b: Annotated[
        bool,
        typer.Option(help="think-ahead: after fresh events reuse log P(b | a) (as served)"),
    ] = _recommend_default("reuse_snapshot_b"),
    reuse_snapshot_c: Annotated[
        bool,
        typer.Option(help="think-ahead: reuse the snapshot's log P(c | a, b) (as served)"),
    ] = _recommend_default("reuse_snapshot_c"),
    item_model: Annotated[
        Path | None,
        typer.Option(help="item-level model directory (default: the model's items/ if any)"),
    ] = None,
    progress: Annotated[bool, typer.Option()] = True,
) -> None:
    """Recall@5/10 and NDCG@5/10, full ranking over the catalog, beside co-visitation."""
    from offline.eval_cli import run_eval

    report = run_eval(
        model,
        catalog,
        interactions,
        out,
        split=split,
        mode=mode,
        beam=beam,
        prefixes=prefixes,
        covisit_candidates=covisit_candidates,
        engine=engine,
        limit=limit,
        progress=progress,
        stale_events=stale_events,
        reuse_snapshot_b=reuse_snapshot_b,
        item_model=item_model,
        reuse_snapshot_c=reuse_snapshot_c,
    )
    typer.echo(json.dumps(report["rows"], indent=2))


@app.command("think-ahead")
@user_errors
def think_ahead_cmd(
    model: Annotated[Path, typer.Option(help="model directory")],
    catalog: Annotated[Path, typer.Option(help="catalog directory")],
    interactions: Annotated[Path, typer.Option(help="interactions CSV (users' histories)")],
    redis: Annotated[str, typer.Option(help="redis URL")] = _redis_default("url"),
    paths: Annotated[
        int, typer.Option(help="G reasoning paths (1 without a template)")
    ] = _job_default("paths"),
    prefixes: Annotated[int, typer.Option(help="M prefixes kept per user")] = _job_default(
        "prefixes"
    ),
    beam: Annotated[int | None, typer.Option(help="beam width (default: M)")] = None,
    ttl: Annotated[int, typer.Option(help="seconds a user value lives")] = _job_default("ttl_s"),
    grace: Annotated[
        float, typer.Option(help="seconds replaced snapshots are kept")
    ] = _job_default("grace_s"),
    shard_size: Annotated[int, typer.Option()] = _job_default("shard_size"),
    batch_users: Annotated[int, typer.Option()] = _job_default("batch_users"),
    holdout_last: Annotated[
        int, typer.Option(help="ignore each user's last N events")
    ] = _job_default("holdout_last"),
    max_users: Annotated[
        int | None, typer.Option(help="only the first N users (canary and smoke runs)")
    ] = None,
    key_prefix: Annotated[str, typer.Option()] = _job_default("key_prefix"),
    history_prefix: Annotated[
        str | None, typer.Option(help="prefix of the history lists (default: key prefix)")
    ] = None,
    cluster: Annotated[bool, typer.Option(help="the URL is a Redis Cluster node")] = False,
    ray: Annotated[bool, typer.Option(help="run shards on Ray")] = False,
    ray_workers: Annotated[int, typer.Option(help="Ray actors, one vLLM engine each")] = 1,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address")] = None,
    seed_history: Annotated[
        bool, typer.Option(help="also load users' histories into ta:hist (demo, benchmarks)")
    ] = False,
    answer_items: Annotated[
        int,
        typer.Option(
            help="items of each user's whole answer stored for an unchanged history "
            "(served with no engine work); 0: prefixes only"
        ),
    ] = DEFAULT_ANSWER_ITEMS,
    affinity_items: Annotated[
        int,
        typer.Option(help="each user's best item-level items stored (0: none)"),
    ] = _job_default("affinity_items"),
    item_model: Annotated[
        Path | None,
        typer.Option(help="item-level model directory (default: the model's items/ if any)"),
    ] = None,
    c_tails: Annotated[
        bool,
        typer.Option(
            help="store log P(c | a, b) of the items under multi-item prefixes "
            "(after fresh events the service skips their c steps)"
        ),
    ] = _job_default("c_tails"),
    progress: Annotated[bool, typer.Option()] = True,
) -> None:
    """Compute every user's candidate prefixes (and whole answer) and publish them as a new
    Redis snapshot."""
    from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun, local_engine_factory

    job = ThinkAheadJob(
        paths=paths,
        prefixes=prefixes,
        beam=beam or prefixes,
        ttl_s=ttl,
        grace_s=grace,
        shard_size=shard_size,
        batch_users=batch_users,
        holdout_last=holdout_last,
        max_users=max_users,
        key_prefix=key_prefix,
        history_prefix=history_prefix,
        answer_items=answer_items,
        affinity_items=affinity_items,
        item_model=str(item_model) if item_model is not None else None,
        c_tails=c_tails,
    )
    run = ThinkAheadRun(model, catalog, interactions, redis, job, cluster=cluster)
    if seed_history:
        typer.echo(f"histories loaded: {run.seed_histories(interactions)}")
    if ray:
        from offline.thinkahead.ray_runner import run_on_ray

        summary = run_on_ray(run, workers=ray_workers, address=ray_address, progress=progress)
    else:
        summary = run.run(local_engine_factory(model), progress=progress)
    typer.echo(json.dumps(summary.as_dict(), indent=2))


@app.command("serve")
@user_errors
def serve_cmd(
    model: Annotated[Path, typer.Option(help="model directory")],
    catalog: Annotated[Path, typer.Option(help="catalog directory")],
    redis: Annotated[str | None, typer.Option(help="redis URL")] = None,
    http_port: Annotated[int | None, typer.Option()] = None,
    grpc_port: Annotated[int | None, typer.Option()] = None,
    host: Annotated[str | None, typer.Option(help="bind address for both transports")] = None,
    engine: Annotated[str | None, typer.Option(help="local (vLLM in-process) or remote")] = None,
    remote_url: Annotated[str | None, typer.Option(help="remote vllm serve base URL")] = None,
    insecure: Annotated[
        bool, typer.Option(help="serve without API keys on a non-loopback --host")
    ] = False,
) -> None:
    """Serve REST and gRPC recommendations (settings: flags, then THINKAHEAD_* env vars)."""
    from service.app import run
    from service.config import Settings

    overrides: dict[str, Any] = {"model_dir": model, "catalog_dir": catalog}
    if http_port is not None:
        overrides["http_port"] = http_port
    if grpc_port is not None:
        overrides["grpc_port"] = grpc_port
    if host is not None:
        overrides["http_host"] = overrides["grpc_host"] = host
    settings = Settings(**overrides)  # type: ignore[arg-type]
    updates: dict[str, Any] = {}
    if redis is not None:
        updates["redis"] = settings.redis.model_copy(update={"url": redis})
    if engine is not None or remote_url is not None:
        updates["engine"] = settings.engine.model_validate(
            {
                **settings.engine.model_dump(),
                **({"mode": engine} if engine else {}),
                **({"remote_url": remote_url} if remote_url else {}),
            }
        )
    if insecure:
        updates["auth"] = settings.auth.model_copy(update={"insecure": True})
    run(settings.model_copy(update=updates))


covisit_app = typer.Typer(no_args_is_help=True, help="Item-to-item co-visitation tables.")
app.add_typer(covisit_app, name="covisit")


@covisit_app.command("build")
@user_errors
def covisit_build(
    catalog: Annotated[Path, typer.Option(help="catalog directory (covisit.npz is written there)")],
    interactions: Annotated[Path, typer.Option(help="interactions CSV (user_id, item_id, ...)")],
    holdout_last: Annotated[
        int, typer.Option(help="ignore each user's last N interactions (benchmarks: 2)")
    ] = 0,
    top_n: Annotated[int, typer.Option(help="neighbours kept per item")] = DEFAULT_TOP_N,
) -> None:
    """Rebuild the co-visitation table of a catalog from fresher interactions (the catalog's
    version does not change; the next think-ahead run publishes it)."""
    from offline.catalog.covisit import build_covisit_file

    if top_n < 1:
        raise InputError(None, f"--top-n must be >= 1, got {top_n}")
    table = build_covisit_file(catalog, interactions, top_n=top_n, holdout_last=holdout_last)
    typer.echo(
        f"co-visitation {table.version} -> {catalog}/covisit.npz: "
        f"{int(table.offsets[-1])} neighbours over {len(table.item_ids)} items "
        f"({table.parameters['pairs']} pairs within {table.parameters['window']} steps)"
    )


@app.command("tune-blend")
@user_errors
def tune_blend_cmd(
    model: Annotated[Path, typer.Option(help="model directory (serving.json is written there)")],
    catalog: Annotated[Path, typer.Option(help="catalog directory (with its covisit.npz)")],
    interactions: Annotated[Path, typer.Option(help="interactions CSV")],
    prefixes: Annotated[int, typer.Option(help="M prefixes, as served")] = _recommend_default(
        "max_prefixes"
    ),
    limit: Annotated[int | None, typer.Option(help="validation users sampled")] = 5000,
    engine: Annotated[str, typer.Option(help="vllm or torch (same requests)")] = "vllm",
    item_model: Annotated[
        Path | None,
        typer.Option(help="item-level model directory (default: the model's items/ if any)"),
    ] = None,
    progress: Annotated[bool, typer.Option()] = True,
) -> None:
    """Learn the fused score's weights on the validation split (never on test)."""
    if engine not in ("vllm", "torch"):
        raise InputError(None, f"--engine must be vllm or torch, got {engine!r}")
    from offline.eval_cli import tune_blend

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
    )
    shown = ("weights", "covisit_candidates", "affinity_candidates", "tuning")
    typer.echo(json.dumps({k: config[k] for k in shown}))


@app.command("quality-report")
@user_errors
def quality_report_cmd(
    served: Annotated[Path, typer.Option(help="`eval --mode think-ahead` report (test split)")],
    decoder: Annotated[Path, typer.Option(help="`eval --mode full` report (test split)")],
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
    from offline.bench.quality import BEAUTY_COMMANDS, REFIT_COMMANDS, build_quality_report

    # with refit reports the last command, the report's own, gains them
    commands = BEAUTY_COMMANDS[:-1] + REFIT_COMMANDS if refit else BEAUTY_COMMANDS
    build_quality_report(served, decoder, model, out, commands, refit=refit or (), items=items)
    typer.echo((out / "quality.md").read_text())


history_app = typer.Typer(no_args_is_help=True, help="Users' recent histories in Redis.")
app.add_typer(history_app, name="history")


@history_app.command("load")
@user_errors
def history_load(
    interactions: Annotated[Path, typer.Option(help="interactions CSV")],
    redis: Annotated[str, typer.Option(help="redis URL")] = _redis_default("url"),
    holdout_last: Annotated[int, typer.Option(help="drop each user's last N events")] = 0,
    cap: Annotated[int, typer.Option(help="items kept per user")] = _redis_default("history_cap"),
    key_prefix: Annotated[str, typer.Option(help="prefix of the history lists")] = _redis_default(
        "prefix"
    ),
    cluster: Annotated[bool, typer.Option()] = False,
) -> None:
    """Replace users' ta:hist lists with their latest events from an interactions log."""
    from offline.data import read_interactions
    from offline.thinkahead.publish import SnapshotWriter, connect_sync
    from service.contracts.snapshot import Keyspace

    seqs = read_interactions(interactions).truncated(holdout_last)
    writer = SnapshotWriter(connect_sync(redis, cluster=cluster), Keyspace(key_prefix), 0)
    n = writer.seed_histories(zip(seqs.users, seqs.items, strict=True), cap)
    typer.echo(f"histories loaded: {n}")


model_app = typer.Typer(no_args_is_help=True, help="Decoder model utilities.")
app.add_typer(model_app, name="model")


@model_app.command("add-item-tokens")
@user_errors
def add_item_tokens_cmd(
    base_model: Annotated[Path, typer.Argument(help="an existing HF causal LM directory")],
    catalog: Annotated[Path, typer.Option(help="catalog directory")],
    out: Annotated[Path, typer.Option(help="output model directory")],
) -> None:
    """Itemic alignment, step one: add the catalog's item tokens to an existing LLM."""
    from offline.train.add_tokens import add_item_tokens

    manifest = add_item_tokens(base_model, catalog, out)
    typer.echo(
        f"model {manifest.model_version} -> {out} ({manifest.parameters['added_tokens']} "
        "tokens added)"
    )


@app.command("bench")
@user_errors
def bench_cmd(
    model: Annotated[Path, typer.Option(help="model directory")],
    catalog: Annotated[Path, typer.Option(help="catalog directory")],
    interactions: Annotated[Path, typer.Option(help="interactions CSV")],
    out: Annotated[Path, typer.Option(help="report directory")],
    quality_users: Annotated[
        int | None, typer.Option(help="test users for quality (default: all)")
    ] = None,
    speed_users: Annotated[int, typer.Option(help="users in the speed snapshot")] = 2000,
    prefixes: Annotated[int, typer.Option(help="M prefixes per user")] = 32,
    beam: Annotated[int, typer.Option(help="full-decode beam width")] = 20,
    concurrency: Annotated[str, typer.Option(help="comma-separated client counts")] = "1,8,32",
    seconds: Annotated[float, typer.Option(help="measured seconds per load point")] = 20.0,
    skip_quality: Annotated[bool, typer.Option(help="speed only")] = False,
    locust_seconds: Annotated[float, typer.Option(help="locust mix run (0 = skip)")] = 30.0,
    floor_users: Annotated[
        int, typer.Option(help="users timed for the plain-PyTorch floor row (0 = skip)")
    ] = 200,
    progress: Annotated[bool, typer.Option()] = True,
) -> None:
    """Think-ahead vs full decode: quality on the test split, speed through the service."""
    from offline.bench.runner import run_bench

    levels = [int(c) for c in concurrency.split(",") if c.strip()]
    report = run_bench(
        model,
        catalog,
        interactions,
        out,
        quality_users=quality_users,
        speed_users=speed_users,
        prefixes=prefixes,
        beam=beam,
        concurrency=levels,
        seconds=seconds,
        skip_quality=skip_quality,
        progress=progress,
        locust_seconds=locust_seconds,
        floor_users=floor_users,
    )
    typer.echo((out / "report.md").read_text())
    typer.echo(f"seconds: {report['seconds']}")


@app.command("demo")
def demo_cmd(
    work: Annotated[Path, typer.Option(help="work directory (generated files only)")] = Path(
        "artifacts/demo"
    ),
    data: Annotated[
        Path | None,
        typer.Option(
            help="benchmark directory (items.csv[.gz], interactions.csv[.gz]); default: "
            "../shared/data/beauty beside the checkout, else the copy in data/beauty"
        ),
    ] = None,
    users: Annotated[int, typer.Option(help="users sampled from the benchmark")] = 3000,
    minutes: Annotated[float, typer.Option(help="training time budget")] = 3.0,
    keep_running: Annotated[bool, typer.Option(help="keep serving after the tour")] = False,
    synthetic: Annotated[
        bool, typer.Option(help="a generated catalog and users instead of Amazon Beauty")
    ] = False,
) -> None:
    """The whole pipeline on a sample: catalog, model, think-ahead, service answering."""
    from offline.demo import run_demo

    run_demo(work, data, users, minutes, keep_running, synthetic_data=synthetic)


if __name__ == "__main__":
    app()
