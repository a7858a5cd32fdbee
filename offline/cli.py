"""The ``thinkahead`` command line: a thin mapping of flags onto the offline functions.

Sub-apps, one per stage (``catalog`` now; ``train``, ``eval``, ``think-ahead``, ``serve`` are
added the same way). Input errors print ``error: <message>`` to stderr and exit with code 2.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from offline.errors import InputError
from service.catalog import CatalogError
from service.manifest import ManifestError

USER_ERRORS: tuple[type[Exception], ...] = (InputError, CatalogError, ManifestError)
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
    cf_idf: Annotated[bool, typer.Option(help="idf-weight the user x item matrix")] = False,
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


if __name__ == "__main__":
    app()
