"""``thinkahead catalog build`` and ``thinkahead covisit build``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from offline.catalog.build import CatalogSpec
from offline.catalog.covisit import DEFAULT_TOP_N
from offline.cli.common import (
    CatalogDir,
    HoldoutLast,
    Interactions,
    default_of,
    options_of,
    user_errors,
)
from offline.errors import InputError

catalog_app = typer.Typer(no_args_is_help=True, help="Semantic-ID catalogs.")
covisit_app = typer.Typer(no_args_is_help=True, help="Item-to-item co-visitation tables.")


_spec = options_of(CatalogSpec)


@catalog_app.command("build")
@user_errors
def catalog_build(
    items: Annotated[Path, typer.Option(help="items CSV: item_id, title[, categories, ...]")],
    out: Annotated[Path, typer.Option(help="catalog directory to write (replaced atomically)")],
    interactions: Annotated[
        Path | None, typer.Option(help="interactions CSV (user_id, item_id[, timestamp]) for CF")
    ] = None,
    codebook_size: Annotated[int, _spec("codebook_size")] = default_of(
        CatalogSpec, "codebook_size"
    ),
    embeddings: Annotated[
        Path | None, typer.Option(help=".npy item vectors (N x d) instead of MiniLM")
    ] = None,
    cf_dim: Annotated[int, _spec("cf_dim")] = default_of(CatalogSpec, "cf_dim"),
    cf_weight: Annotated[float, _spec("cf_weight")] = default_of(CatalogSpec, "cf_weight"),
    cf_idf: Annotated[bool, _spec("cf_idf")] = default_of(CatalogSpec, "cf_idf"),
    cf_kind: Annotated[str, _spec("cf_kind")] = default_of(CatalogSpec, "cf_kind"),
    holdout_last: HoldoutLast = 0,
    seed: Annotated[int, typer.Option(help="k-means / SVD seed")] = 0,
    iters: Annotated[int, _spec("iters")] = default_of(CatalogSpec, "iters"),
    text_column: Annotated[
        list[str] | None, typer.Option(help="text column (repeat); default title + known ones")
    ] = None,
    precision: Annotated[str, _spec("precision")] = default_of(CatalogSpec, "precision"),
    progress: Annotated[bool, typer.Option(help="show the embedding progress bar")] = True,
) -> None:
    """Build semantic IDs (3 tokens per item) for an items file."""
    from offline.catalog.build import build_catalog

    spec = CatalogSpec.model_validate(
        {
            "codebook_size": codebook_size,
            "cf_dim": cf_dim,
            "cf_weight": cf_weight,
            "cf_idf": cf_idf,
            "cf_kind": cf_kind,
            "holdout_last": holdout_last,
            "seed": seed,
            "iters": iters,
            "text_columns": tuple(text_column) if text_column else None,
            "precision": precision,
        }
    )
    report = build_catalog(
        items, out, spec, interactions=interactions, embeddings=embeddings, show_progress=progress
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


@covisit_app.command("build")
@user_errors
def covisit_build(
    catalog: CatalogDir,
    interactions: Interactions,
    holdout_last: HoldoutLast = 0,
    top_n: Annotated[int, typer.Option(help="neighbours kept per item")] = DEFAULT_TOP_N,
) -> None:
    """Rebuild the co-visitation table of a catalog (covisit.npz in its directory) from fresher
    interactions; the catalog's version does not change and the next think-ahead run
    publishes it."""
    from offline.catalog.covisit import build_covisit_file

    if top_n < 1:
        raise InputError(None, f"--top-n must be >= 1, got {top_n}")
    table = build_covisit_file(catalog, interactions, top_n=top_n, holdout_last=holdout_last)
    typer.echo(
        f"co-visitation {table.version} -> {catalog}/covisit.npz: "
        f"{int(table.offsets[-1])} neighbours over {len(table.item_ids)} items "
        f"({table.parameters['pairs']} pairs within {table.parameters['window']} steps)"
    )
