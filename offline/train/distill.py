"""Distillation from the item-level model into the decoder (``thinkahead train --teacher``).

The item-level model (``offline.items``) ranks whole items with a softmax over items, which the
decoder cannot have (no per-item vocabulary). Its next-item distribution is projected onto the
decoder's levels and mixed into the decoder's targets:

- level a: the teacher's probability of each first token, summed over its items;
- level b: the same among the items that share the true a (the decoder is teacher-forced on it),
  renormalised; where the teacher gives that a no mass, the hard target alone;
- level c: the hard target alone (most (a, b) prefixes hold one item).

Only the teacher's top ``top_k`` items per position are used (a softmax over their logits): what
an ANN index over the item vectors returns, so the cost does not grow with the catalog.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from offline.items.artifact import ItemModel, left_padded
from service.contracts.catalog import Catalog
from service.contracts.tokens import Code, TokenIds


@dataclass(frozen=True)
class LevelTargets:
    """Soft targets for every target item of a batch, in label order (window by window)."""

    a: torch.Tensor  # (P, K) teacher probability of each first token
    b: torch.Tensor  # (P, K) of each second token given the true first one
    b_known: torch.Tensor  # (P,) bool: the teacher gives the true first token some mass


class Teacher:
    def __init__(self, model: ItemModel, catalog: Catalog, top_k: int) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.network = model.network.eval()
        self.version = model.version
        self.catalog = catalog
        self.top_k = min(top_k, len(catalog.codes))
        with torch.no_grad():
            self.item_vectors = self.network.item_vectors().detach().float()
        self.codes = torch.as_tensor(np.asarray(catalog.codes), dtype=torch.long)

    @torch.no_grad()
    @torch.autocast("cpu", enabled=False)
    def targets(self, windows: Sequence[Sequence[Code]]) -> LevelTargets:
        """Soft targets for items 2..n of each window, given the items before each."""
        k = self.catalog.codebook_size
        rows = [[self.catalog.row_by_code[tuple(c)] for c in w] for w in windows]  # type: ignore[arg-type]
        hidden = self._states([r[:-1] for r in rows])  # the newest item is never an input
        logits = hidden @ self.item_vectors.T
        top_logits, top_rows = logits.topk(self.top_k, dim=1)
        probs = top_logits.softmax(dim=1)
        top_codes = self.codes[top_rows]  # (P, top_k, 3)
        true = torch.as_tensor([c for w in windows for c in w[1:]], dtype=torch.long)
        a = torch.zeros(len(true), k).scatter_add_(1, top_codes[:, :, 0], probs)
        same_a = (top_codes[:, :, 0] == true[:, None, 0]).float() * probs
        mass = same_a.sum(dim=1, keepdim=True)
        b = torch.zeros(len(true), k).scatter_add_(1, top_codes[:, :, 1], same_a)
        return LevelTargets(a, b / mass.clamp_min(1e-12), mass.squeeze(1) > 1e-6)

    def _states(self, inputs: list[list[int]]) -> torch.Tensor:
        """(P, dim): the teacher's state after each input item, window by window."""
        max_len = self.network.cfg.max_len
        width = max(len(r) for r in inputs)
        if width <= max_len:
            hidden = self.network(left_padded(inputs, width))
            return torch.cat([hidden[w, width - len(r) :] for w, r in enumerate(inputs)])
        # a window longer than the teacher's history: each state from its newest max_len items
        out = []
        for r in inputs:
            histories = [r[max(0, j + 1 - max_len) : j + 1] for j in range(len(r))]
            out.append(self.network.user_vectors(left_padded(histories, max_len)))
        return torch.cat(out)


def level_tokens(ids: TokenIds) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(ids.a, dtype=torch.long), torch.as_tensor(ids.b, dtype=torch.long)


def distilled_loss(
    logp: torch.Tensor,
    labels: torch.Tensor,
    targets: LevelTargets,
    tokens: tuple[torch.Tensor, torch.Tensor],
    alpha: float,
) -> torch.Tensor:
    """Mean cross-entropy against (1 - alpha) * the true token + alpha * the teacher's level
    distribution. ``logp``: (3P, vocab) level-masked log-probs, labels a, b, c of each target
    item in turn."""
    if logp.shape[0] != 3 * targets.a.shape[0]:
        raise ValueError(f"{logp.shape[0]} labels for {targets.a.shape[0]} target items")
    hard = -logp.gather(1, labels[:, None]).squeeze(1)
    tok_a, tok_b = tokens
    soft_a = -(targets.a * logp[0::3][:, tok_a]).sum(dim=1)
    soft_b = -(targets.b * logp[1::3][:, tok_b]).sum(dim=1)
    soft_b = torch.where(targets.b_known, soft_b, hard[1::3])
    mixed = hard.clone()
    mixed[0::3] = (1 - alpha) * hard[0::3] + alpha * soft_a
    mixed[1::3] = (1 - alpha) * hard[1::3] + alpha * soft_b
    return mixed.mean()
