"""What the service's fresh encode costs (``service.core.fresh_items``): the item-level model on a
user's history and its best 50 items, on one thread as the service runs it, for each item-model
directory given (one model or an ensemble).

    .venv/bin/python scripts/encode_time.py --catalog artifacts/beauty-catalog \
        --interactions ../shared/data/beauty/interactions.csv artifacts/beauty-model/items
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer


def main(
    items: Annotated[list[Path], typer.Argument(help="item model directories")],
    catalog: Annotated[Path, typer.Option(help="catalog directory")],
    interactions: Annotated[Path, typer.Option(help="interactions.csv")],
    users: Annotated[int, typer.Option(help="test histories timed")] = 300,
) -> None:
    import torch

    from offline.data import leave_one_out, read_interactions
    from service.contracts.affinity import DEFAULT_AFFINITY_ITEMS
    from service.contracts.catalog import Catalog
    from service.contracts.item_model import ItemModel

    torch.set_num_threads(1)  # as FreshItems.load
    loaded = Catalog.load(catalog)
    split = leave_one_out(read_interactions(interactions))
    histories = [
        [loaded.code_of(i) for i in e.history if i in loaded.row_of] for e in split.test[:users]
    ]
    for directory in items:
        model = ItemModel.load(directory, loaded)
        for h in histories[:20]:  # warm-up
            model.top_items(loaded, [h], DEFAULT_AFFINITY_ITEMS, True)
        seconds = []
        for h in histories:
            t0 = time.perf_counter()
            model.top_items(loaded, [h], DEFAULT_AFFINITY_ITEMS, True)
            seconds.append(time.perf_counter() - t0)
        seconds.sort()
        p50, p90 = seconds[len(seconds) // 2], seconds[int(len(seconds) * 0.9)]
        typer.echo(
            f"{directory}: {len(model.members)} model(s), {len(seconds)} encodes, "
            f"p50 {p50 * 1e3:.2f} ms, p90 {p90 * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    typer.run(main)
