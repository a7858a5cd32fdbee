"""``thinkahead model add-item-tokens``: an existing LLM instead of a decoder of our own."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from offline.cli.common import CatalogDir, user_errors

model_app = typer.Typer(no_args_is_help=True, help="Decoder model utilities.")


@model_app.command("add-item-tokens")
@user_errors
def add_item_tokens_cmd(
    base_model: Annotated[Path, typer.Argument(help="an existing HF causal LM directory")],
    catalog: CatalogDir,
    out: Annotated[Path, typer.Option(help="output model directory")],
) -> None:
    """Itemic alignment, step one: add the catalog's item tokens to an existing LLM."""
    from offline.train.add_tokens import add_item_tokens

    manifest = add_item_tokens(base_model, catalog, out)
    typer.echo(
        f"model {manifest.model_version} -> {out} ({manifest.parameters['added_tokens']} "
        "tokens added)"
    )
