"""The ``thinkahead`` command line: a thin mapping of flags onto the offline jobs and the
service, one module per group of commands (``offline/cli/<group>.py``) over the shared option
aliases of :mod:`offline.cli.common`.

Pipeline stages, in order: ``catalog build``, ``train`` (and ``train-items``), ``model
add-item-tokens`` (an existing LLM instead), ``tune-blend``, ``tune-rerank``, ``think-ahead``,
``serve``; beside them ``covisit build``, ``history load``, ``eval``, ``quality-report``,
``bench`` and ``demo`` (the whole pipeline on a sample). Input errors print
``error: <message>`` to stderr and exit with code 2.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from offline.cli import bench, evaluate, serve, thinkahead, train
from offline.cli.catalog import catalog_app, covisit_app
from offline.cli.model import model_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Think-Ahead recommendation.")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


app.add_typer(catalog_app, name="catalog")
app.command("train")(train.train_cmd)
app.command("train-items")(train.train_items_cmd)
app.command("ensemble-items")(train.ensemble_items_cmd)
app.command("train-dpo")(train.train_dpo_cmd)
app.command("eval")(evaluate.eval_cmd)
app.command("think-ahead")(thinkahead.think_ahead_cmd)
app.command("rethink")(thinkahead.rethink_cmd)
app.command("snapshot-size")(thinkahead.snapshot_size_cmd)
app.command("serve")(serve.serve_cmd)
app.add_typer(covisit_app, name="covisit")
app.command("tune-blend")(evaluate.tune_blend_cmd)
app.command("tune-rerank")(evaluate.tune_rerank_cmd)
app.command("quality-report")(evaluate.quality_report_cmd)
app.add_typer(thinkahead.history_app, name="history")
app.add_typer(model_app, name="model")
app.command("bench")(bench.bench_cmd)
app.command("demo")(bench.demo_cmd)

__all__ = ["app"]
