"""``thinkahead train-items``: the item-level model, trained with a softmax over items.

Loss: at every position of every training sequence (``prefixes``: at the last position of every
prefix, each its own example), cross-entropy of the true next item against
every item (catalogs up to ``full_softmax_items``), else against ``negatives`` items drawn
uniformly for the batch (a negative equal to the target is masked): what scales to catalogs
whose logits do not fit. The softmax over items is what made the difference on Beauty
(notes/quality-probe.md), not size.
Validation (the leave-one-out validation target, full ranking, history excluded) after every
epoch; the best epoch by NDCG@10 is kept; training stops after ``patience`` epochs without gain.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from offline.data import Example, leave_one_out, read_interactions
from offline.errors import InputError
from offline.eval.metrics import TOP_K, ranking_metrics
from offline.fsutil import atomic_directory
from offline.items.artifact import save_item_model
from offline.items.config import ItemTrainConfig
from offline.selection import in_validated_tail
from offline.train.checkpoint import peak_rss_gb
from service.contracts.catalog import Catalog
from service.contracts.item_index import ExactIndex
from service.contracts.item_model import ItemModel, ItemModelManifest, left_padded
from service.contracts.item_network import ItemModelConfig, ItemSequenceModel

log = logging.getLogger(__name__)


def _rows(catalog: Catalog, items: Sequence[str]) -> list[int]:
    return [r for i in items if (r := catalog.row_of.get(i)) is not None]


def _batches(lengths: Sequence[int], size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of similar lengths (little padding), in random order."""
    order = np.argsort(np.asarray(lengths) + rng.random(len(lengths)), kind="stable")
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def sampled_softmax_loss(
    hidden: torch.Tensor, targets: torch.Tensor, items: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """hidden (n, d), targets (n,) item tokens, items (V, d) table, negatives (m,) tokens."""
    positive = (hidden * items[targets]).sum(-1, keepdim=True)
    negative = hidden @ items[negatives].T
    negative = negative.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), -torch.inf)
    logits = torch.cat([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long))


def evaluate(
    model: ItemSequenceModel,
    catalog: Catalog,
    examples: Sequence[Example],
    ks: Sequence[int] = (TOP_K,),
    batch: int = 1024,
) -> dict[str, float]:
    """Full ranking of the target among all items, history excluded (the eval's metrics)."""
    training = model.training
    model.eval()
    with torch.no_grad():
        index = ExactIndex(model.item_vectors().numpy())

        def encode(rows: Sequence[Sequence[int]]) -> np.ndarray:
            rows = [r[-model.cfg.max_len :] for r in rows]
            return model.user_vectors(left_padded(rows)).numpy()

        metrics = _ranked_metrics(encode, index, catalog, examples, ks, batch)
    model.train(training)
    return metrics


def evaluate_item_model(
    model: ItemModel, catalog: Catalog, examples: Sequence[Example], ks: Sequence[int] = (TOP_K,)
) -> dict[str, float]:
    """:func:`evaluate` for a loaded item model (one, or an ensemble's mean logit)."""
    return _ranked_metrics(model.user_vectors, model.index, catalog, examples, ks, 1024)


def _ranked_metrics(
    encode: Callable[[Sequence[Sequence[int]]], np.ndarray],
    index: ExactIndex,
    catalog: Catalog,
    examples: Sequence[Example],
    ks: Sequence[int],
    batch: int,
) -> dict[str, float]:
    ranked: list[list[str]] = []
    for start in range(0, len(examples), batch):
        rows = [_rows(catalog, e.history) for e in examples[start : start + batch]]
        found, _ = index.search(encode(rows), max(ks), rows)
        ranked += [[catalog.item_ids[r] for r in top if r >= 0] for top in found.tolist()]
    return ranking_metrics(ranked, [e.target for e in examples], ks)


def train_item_model(
    catalog: Catalog,
    interactions: Path,
    out: Path,
    cfg: ItemTrainConfig,
    refit: bool = False,
    progress: bool = True,
) -> ItemModelManifest:
    """Train on the training split (``refit``: train + validation, for exactly ``epochs``)
    and write the best epoch's model to ``out``."""
    t0 = time.monotonic()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    split = leave_one_out(read_interactions(interactions), cfg.max_len)
    source = split.train_and_valid if refit else split.train
    # the last max_len + 1 items: max_len inputs, each predicting the next
    sequences = [s for seq in source.items if len(s := _rows(catalog, seq)[-cfg.max_len - 1 :]) > 1]
    if not sequences:
        raise InputError(interactions, "no user has two catalog items in the training split")
    model = ItemSequenceModel(
        ItemModelConfig(
            num_items=len(catalog),
            dim=cfg.dim,
            blocks=cfg.blocks,
            heads=cfg.heads,
            max_len=cfg.max_len,
            dropout=cfg.dropout,
            mixer=cfg.mixer,
            alpha=cfg.alpha,
            c=cfg.c,
        )
    )
    # prefixes: (sequence, end): inputs sequence[:end] (at most max_len), target sequence[end]
    pieces = [(i, end) for i, s in enumerate(sequences) for end in range(1, len(s))]
    lengths = [end for _, end in pieces] if cfg.prefixes else [len(s) for s in sequences]
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    full_softmax = len(catalog) <= cfg.full_softmax_items
    best: tuple[float, int, dict[str, torch.Tensor], dict[str, float]] | None = None
    history: list[dict[str, float]] = []
    stale = 0
    epochs = tqdm(range(1, cfg.epochs + 1), desc="train-items", unit="epoch", disable=not progress)
    for epoch in epochs:
        losses = []
        for batch in _batches(lengths, cfg.batch_size, rng):
            if cfg.prefixes:
                tokens = left_padded(
                    [sequences[i][: end + 1] for i, end in (pieces[j] for j in batch)]
                )
                hidden, targets = model(tokens[:, -cfg.max_len - 1 : -1])[:, -1], tokens[:, -1]
            else:
                tokens = left_padded([sequences[i] for i in batch])
                inputs, targets = tokens[:, :-1], tokens[:, 1:]
                mask = (targets > 0) & (inputs > 0)
                hidden, targets = model(inputs)[mask], targets[mask]
            if full_softmax:
                logits = hidden @ model.items.weight[1:].T  # row r is token r + 1
                loss = F.cross_entropy(logits, targets - 1)
            else:
                negatives = torch.randint(1, len(catalog) + 1, (cfg.negatives,))
                loss = sampled_softmax_loss(hidden, targets, model.items.weight, negatives)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        row: dict[str, float] = {"epoch": epoch, "loss": round(float(np.mean(losses)), 4)}
        # taken before validation, so that the epoch a time limit ends on is validated
        over_time = cfg.max_minutes is not None and (time.monotonic() - t0) / 60 >= cfg.max_minutes
        scored = refit or over_time or in_validated_tail(epoch, cfg.epochs, cfg.val_tail)
        if scored and not refit:
            row.update({k: round(v, 5) for k, v in evaluate(model, catalog, split.valid).items()})
        history.append(row)
        epochs.set_postfix({k: v for k, v in row.items() if k != "users"})
        log.info("train-items %s", row)
        if scored:
            score = row.get(f"ndcg@{TOP_K}", float(epoch))  # refit: the last epoch
            if best is None or score > best[0]:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best, stale = (score, epoch, state, row), 0
            else:
                stale += 1
        if (not refit and stale >= cfg.patience) or over_time:
            break
    assert best is not None
    model.load_state_dict(best[2])
    record = {
        "settings": cfg.model_dump(),
        "loss": "full softmax" if full_softmax else f"sampled softmax, {cfg.negatives} negatives",
        "refit": refit,
        "train_sequences": len(sequences),
        "train_targets": len(pieces),
        "parameters": sum(p.numel() for p in model.parameters()),
        "best": best[3],
        "epochs": history,
        "seconds": round(time.monotonic() - t0, 1),
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }
    with atomic_directory(out) as work:
        return save_item_model(work, model, catalog.version, best[1], record)
