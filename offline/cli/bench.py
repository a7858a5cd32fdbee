"""``thinkahead bench`` (quality and speed through the service) and ``thinkahead demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from offline.cli.common import CatalogDir, Interactions, ModelDir, Progress, user_errors
from offline.demo import DEMO_EPOCHS


@user_errors
def bench_cmd(
    model: ModelDir,
    catalog: CatalogDir,
    interactions: Interactions,
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
    rethink: Annotated[
        bool,
        typer.Option(
            help="run `thinkahead rethink` (torch engine) beside the service during the locust "
            "mix and report its lag and throughput"
        ),
    ] = True,
    progress: Progress = True,
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
        rethink=rethink,
    )
    typer.echo((out / "report.md").read_text())
    typer.echo(f"seconds: {report['seconds']}")


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
    epochs: Annotated[
        int, typer.Option(help="decoder epochs (a fixed amount of training)")
    ] = DEMO_EPOCHS,
    keep_running: Annotated[bool, typer.Option(help="keep serving after the tour")] = False,
    synthetic: Annotated[
        bool, typer.Option(help="a generated catalog and users instead of Amazon Beauty")
    ] = False,
) -> None:
    """The whole pipeline on a sample: catalog, model, think-ahead, service answering."""
    from offline.demo import run_demo

    run_demo(work, data, users, epochs, keep_running, synthetic_data=synthetic)
