"""``thinkahead train`` (the decoder) and ``thinkahead train-items`` (the item-level model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from offline.cli.common import (
    CatalogDir,
    Interactions,
    Progress,
    Refit,
    default_of,
    options_of,
    user_errors,
)
from offline.items.config import DEFAULT_MEMBERS, ItemTrainConfig
from offline.train.config import DpoConfig, TrainConfig

_train = options_of(TrainConfig)


_items = options_of(ItemTrainConfig)


@user_errors
def train_cmd(
    catalog: CatalogDir,
    interactions: Interactions,
    out: Annotated[Path, typer.Option(help="model directory to write (HF format)")],
    preset: Annotated[str, _train("preset", "model size: tiny, small, base")] = default_of(
        TrainConfig, "preset"
    ),
    epochs: Annotated[
        int, _train("epochs", "epochs of the cosine schedule (early stopping may end sooner)")
    ] = default_of(TrainConfig, "epochs"),
    batch_size: Annotated[int, _train("batch_size")] = default_of(TrainConfig, "batch_size"),
    lr: Annotated[float, _train("lr")] = default_of(TrainConfig, "lr"),
    patience: Annotated[int, _train("patience", "validated epochs without gain")] = default_of(
        TrainConfig, "patience"
    ),
    val_users: Annotated[int, _train("val_users", "validation sample (0 = all)")] = default_of(
        TrainConfig, "val_users"
    ),
    val_tail: Annotated[float, _train("val_tail")] = default_of(TrainConfig, "val_tail"),
    tail_average: Annotated[bool, _train("tail_average")] = default_of(TrainConfig, "tail_average"),
    embed_dropout: Annotated[float, _train("embed_dropout")] = default_of(
        TrainConfig, "embed_dropout"
    ),
    item_dropout: Annotated[float, _train("item_dropout")] = default_of(
        TrainConfig, "item_dropout"
    ),
    test_shaped_validation: Annotated[bool, _train("test_shaped_validation")] = default_of(
        TrainConfig, "test_shaped_validation"
    ),
    max_minutes: Annotated[
        float | None, _train("max_minutes", "stop after this long")
    ] = default_of(TrainConfig, "max_minutes"),
    reasoning: Annotated[bool, _train("reasoning")] = default_of(TrainConfig, "reasoning"),
    rationale_rate: Annotated[float, _train("rationale_rate")] = default_of(
        TrainConfig, "rationale_rate"
    ),
    alignment: Annotated[bool, _train("alignment")] = default_of(TrainConfig, "alignment"),
    teacher: Annotated[Path | None, _train("teacher")] = default_of(TrainConfig, "teacher"),
    distill_alpha: Annotated[float, _train("distill_alpha")] = default_of(
        TrainConfig, "distill_alpha"
    ),
    distill_levels: Annotated[int, _train("distill_levels")] = default_of(
        TrainConfig, "distill_levels"
    ),
    distill_top_k: Annotated[int, _train("distill_top_k")] = default_of(
        TrainConfig, "distill_top_k"
    ),
    refit: Refit = False,
    resume: Annotated[
        bool, typer.Option(help="continue a killed run of the same settings from its checkpoint")
    ] = True,
    low_memory: Annotated[bool, _train("low_memory")] = False,
    seed: Annotated[int, _train("seed", "random seed")] = default_of(TrainConfig, "seed"),
    progress: Progress = True,
) -> None:
    """Train the decoder on the leave-one-out train split; the mean weights of the epochs
    validated (or, with --no-tail-average, the best of them) are kept. Checkpointed every
    epoch: rerunning a killed command continues it."""
    from offline.train.trainer import train

    cfg = TrainConfig(
        preset=preset,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        val_users=val_users,
        val_tail=val_tail,
        tail_average=tail_average,
        embed_dropout=embed_dropout,
        item_dropout=item_dropout,
        test_shaped_validation=test_shaped_validation,
        max_minutes=max_minutes,
        reasoning=reasoning,
        rationale_rate=rationale_rate,
        alignment=alignment,
        teacher=teacher,
        distill_alpha=distill_alpha,
        distill_levels=distill_levels,
        distill_top_k=distill_top_k,
        refit=refit,
        resume=resume,
        low_memory=low_memory,
        seed=seed,
    )
    manifest = train(catalog, interactions, out, cfg, progress=progress)
    params = manifest.parameters
    typer.echo(
        f"model {manifest.model_version} -> {out}\n"
        f"  {_chosen_by(refit, manifest.metrics['validation'])}; "
        f"{params['train_seconds']:.0f}s, peak RSS {params['peak_rss_gb']:.1f} GB"
    )


@user_errors
def train_items_cmd(
    catalog: CatalogDir,
    interactions: Interactions,
    out: Annotated[Path, typer.Option(help="item model directory to write")],
    epochs: Annotated[int, _items("epochs", "at most this many epochs")] = default_of(
        ItemTrainConfig, "epochs"
    ),
    patience: Annotated[int, _items("patience")] = default_of(ItemTrainConfig, "patience"),
    val_tail: Annotated[float, _items("val_tail")] = default_of(ItemTrainConfig, "val_tail"),
    dim: Annotated[int, _items("dim", "item vector size")] = default_of(ItemTrainConfig, "dim"),
    blocks: Annotated[int, _items("blocks", "encoder blocks")] = default_of(
        ItemTrainConfig, "blocks"
    ),
    mixer: Annotated[str, _items("mixer")] = default_of(ItemTrainConfig, "mixer"),
    prefixes: Annotated[bool, _items("prefixes")] = default_of(ItemTrainConfig, "prefixes"),
    lr: Annotated[float, _items("lr", "learning rate")] = default_of(ItemTrainConfig, "lr"),
    negatives: Annotated[
        int, _items("negatives", "sampled negatives per batch (above --full-softmax-items)")
    ] = default_of(ItemTrainConfig, "negatives"),
    full_softmax_items: Annotated[int, _items("full_softmax_items")] = default_of(
        ItemTrainConfig, "full_softmax_items"
    ),
    max_minutes: Annotated[
        float | None, _items("max_minutes", "stop after this long")
    ] = default_of(ItemTrainConfig, "max_minutes"),
    refit: Refit = False,
    seed: Annotated[int, _items("seed", "random seed")] = default_of(ItemTrainConfig, "seed"),
    members: Annotated[
        int,
        typer.Option(
            min=1,
            help="train this many models (seeds seed, seed + 1, ...) and serve their mean logit",
        ),
    ] = DEFAULT_MEMBERS,
    progress: Progress = True,
) -> None:
    """Train the item-level model (BSARec: a frequency filter beside self-attention; a softmax
    over items) whose per-user best items the
    think-ahead worker stores as candidates and a feature of the fused score."""
    from offline.items.ensemble import train_members
    from offline.items.train import train_item_model
    from service.contracts.catalog import Catalog

    cfg = ItemTrainConfig.model_validate(
        {
            "epochs": epochs,
            "patience": patience,
            "val_tail": val_tail,
            "dim": dim,
            "blocks": blocks,
            "mixer": mixer,
            "prefixes": prefixes,
            "lr": lr,
            "negatives": negatives,
            "full_softmax_items": full_softmax_items,
            "max_minutes": max_minutes,
            "seed": seed,
        }
    )
    loaded = Catalog.load(catalog)
    if members == 1:
        manifests = [train_item_model(loaded, interactions, out, cfg, refit, progress)]
    else:
        manifests = train_members(
            out,
            members,
            lambda directory, i: train_item_model(
                loaded,
                interactions,
                directory,
                cfg.model_copy(update={"seed": seed + i}),
                refit,
                progress,
            ),
        )
    for i, manifest in enumerate(manifests):
        name = "item model" if members == 1 else f"member {i} (seed {seed + i})"
        typer.echo(
            f"{name} {manifest.version} -> {out}\n"
            f"  {_chosen_by(refit, manifest.training['best'], manifest.best_epoch)}; "
            f"{manifest.training['seconds']:.0f}s, "
            f"peak RSS {manifest.training['peak_rss_gb']:.1f} GB"
        )


@user_errors
def ensemble_items_cmd(
    catalog: CatalogDir,
    sources: Annotated[
        list[Path], typer.Argument(help="trained item model directories (or ensembles)")
    ],
    out: Annotated[Path, typer.Option(help="ensemble directory to write")],
) -> None:
    """Gather item models trained apart into one ensemble (the mean of their logits), checked
    against the catalog as the service checks them."""
    from offline.items.ensemble import gather
    from service.contracts.catalog import Catalog

    model = gather(sources, out, Catalog.load(catalog))
    typer.echo(f"item ensemble {model.version} ({len(model.members)} members) -> {out}")


def _chosen_by(refit: bool, best: dict[str, Any], epoch: int | None = None) -> str:
    """What picked a trained model's epoch, for the train commands' last line."""
    epoch = epoch if epoch is not None else best.get("epoch")
    if refit:
        return f"epoch {epoch}: refit on train + validation"
    if best.get("averaged"):
        epochs = best["averaged"]
        return (
            f"the mean of epochs {epochs[0]}-{epochs[-1]}: val R@10 {best.get('recall@10', 0):.4f} "
            f"N@10 {best.get('ndcg@10', 0):.4f}"
        )
    return (
        f"best epoch {epoch}: val R@10 {best.get('recall@10', 0):.4f} "
        f"N@10 {best.get('ndcg@10', 0):.4f}"
    )


_dpo = options_of(DpoConfig)


@user_errors
def train_dpo_cmd(
    model: Annotated[Path, typer.Option(help="the supervised model directory (thinkahead train)")],
    catalog: CatalogDir,
    interactions: Interactions,
    out: Annotated[Path, typer.Option(help="model directory to write")],
    epochs: Annotated[int, _dpo("epochs")] = default_of(DpoConfig, "epochs"),
    beta: Annotated[float, _dpo("beta")] = default_of(DpoConfig, "beta"),
    rollouts: Annotated[int, _dpo("rollouts")] = default_of(DpoConfig, "rollouts"),
    rejected: Annotated[int, _dpo("rejected")] = default_of(DpoConfig, "rejected"),
    sft_weight: Annotated[float, _dpo("sft_weight")] = default_of(DpoConfig, "sft_weight"),
    lr: Annotated[float, _dpo("lr")] = default_of(DpoConfig, "lr"),
    max_users: Annotated[int | None, _dpo("max_users")] = None,
    val_users: Annotated[int, _dpo("val_users")] = default_of(DpoConfig, "val_users"),
    progress: Progress = True,
) -> None:
    """Preference alignment on the model's own rollouts (DPO), from a supervised model; the
    best epoch on validation is kept, the supervised weights if none beats them."""
    from offline.train.dpo import train_dpo

    cfg = DpoConfig(
        epochs=epochs,
        beta=beta,
        rollouts=rollouts,
        rejected=rejected,
        sft_weight=sft_weight,
        lr=lr,
        max_users=max_users,
        val_users=val_users,
    )
    manifest = train_dpo(model, catalog, interactions, out, cfg, progress)
    kept = manifest.parameters["dpo_kept_epoch"]
    best = manifest.metrics["validation"]
    typer.echo(
        f"model {manifest.model_version} -> {out}\n  "
        + (f"dpo epoch {kept} kept" if kept else "no dpo epoch beat the supervised model")
        + (
            f": val R@10 {best['recall@10']:.4f} N@10 {best['ndcg@10']:.4f}"
            if "recall@10" in best
            else ""
        )
        + f"; {manifest.parameters['dpo_seconds']:.0f}s"
    )
