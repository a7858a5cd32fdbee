"""Distillation from the item-level model into the decoder (``thinkahead train --teacher``).

The item-level model (one model or an ensemble, ``thinkahead train-items``) ranks whole items
with a softmax over items, which the decoder cannot have (no per-item vocabulary). Its
next-item distribution is projected onto the decoder's levels and mixed into the decoder's
targets:

- level a: the teacher's probability of each first token, summed over its items;
- level b: the same among the items that share the true a (the decoder is teacher-forced on it),
  renormalised; where the teacher gives that a no mass, the hard target alone;
- level c: the hard target alone (most (a, b) prefixes hold one item).

Only the teacher's top ``top_k`` items per position count (a softmax over their logits, the
history's items excluded as the decoder's constraint excludes them): what an ANN index over
the item vectors returns, so the cost does not grow with the catalog.

The teacher's item model mixes a window's positions in both directions (BSARec's frequency
filter), so its prediction for a window's i-th item is computed from the items before it alone,
once per training window before the first epoch (``Teacher.precompute``). An epoch's item
dropout removes items from a window's context but not its targets: each kept target keeps the
teacher's prediction from its full context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from service.contracts.catalog import Catalog
from service.contracts.item_model import ItemModel
from service.contracts.tokens import Code, TokenIds


@dataclass(frozen=True)
class LevelTargets:
    """Soft targets for target items (rows): the teacher's first-token distribution, and its
    second-token distribution given the true first token."""

    a: torch.Tensor  # (P, K)
    b: torch.Tensor  # (P, K)
    b_known: torch.Tensor  # (P,) bool: the teacher gives the true first token some mass

    def __len__(self) -> int:
        return int(self.a.shape[0])

    def rows(self, index: torch.Tensor) -> LevelTargets:
        return LevelTargets(self.a[index].float(), self.b[index].float(), self.b_known[index])


@dataclass(frozen=True)
class WindowTargets:
    """Every training window's targets: window w's items 1..n-1 are rows
    ``offsets[w] .. offsets[w + 1] - 1``."""

    targets: LevelTargets
    offsets: np.ndarray  # (windows + 1,)

    def rows_of(self, window: int, kept: np.ndarray | None) -> np.ndarray:
        """Label rows of the window's targets; ``kept``: the window's item positions left by
        item dropout (None: all), the first of which is never a target."""
        start, end = int(self.offsets[window]), int(self.offsets[window + 1])
        if kept is None:
            return np.arange(start, end, dtype=np.int64)
        return start + kept[1:].astype(np.int64) - 1


class Teacher:
    def __init__(self, model: ItemModel, catalog: Catalog, top_k: int) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.model = model
        self.catalog = catalog
        self.top_k = min(top_k, len(catalog.codes))
        self.codes = torch.as_tensor(np.asarray(catalog.codes), dtype=torch.long)

    @property
    def version(self) -> str:
        return self.model.version

    def precompute(
        self, windows: Sequence[Sequence[Code]], batch: int = 2048, progress: bool = False
    ) -> WindowTargets:
        """The teacher's targets for items 1..n-1 of every window, each from the items before
        it (the newest ``max_len`` the teacher reads)."""
        rows = [[self.catalog.row_by_code[tuple(c)] for c in w] for w in windows]  # type: ignore[index]
        lengths = np.array([max(len(r) - 1, 0) for r in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        prefixes = [r[:i] for r in rows for i in range(1, len(r))]
        truth = torch.as_tensor(
            [self.catalog.row_by_code[tuple(c)] for w in windows for c in w[1:]],  # type: ignore[index]
            dtype=torch.long,
        )
        k = self.catalog.codebook_size
        a = torch.zeros(len(prefixes), k, dtype=torch.float16)
        b = torch.zeros(len(prefixes), k, dtype=torch.float16)
        known = torch.zeros(len(prefixes), dtype=torch.bool)
        starts = range(0, len(prefixes), batch)
        for s in tqdm(starts, desc="teacher", disable=not progress, unit="batch"):
            chunk = prefixes[s : s + batch]
            part = self.targets(chunk, self.codes[truth[s : s + len(chunk)]])
            a[s : s + len(chunk)] = part.a.half()
            b[s : s + len(chunk)] = part.b.half()
            known[s : s + len(chunk)] = part.b_known
        return WindowTargets(LevelTargets(a, b, known), offsets)

    @torch.no_grad()
    def targets(self, histories: Sequence[Sequence[int]], true: torch.Tensor) -> LevelTargets:
        """Level targets after each history (catalog rows, oldest first); ``true``: (P, 3) the
        codes of the items that followed."""
        found, scores = self.model.index.search(
            self.model.user_vectors(histories), self.top_k, histories
        )
        logits = torch.from_numpy(scores)
        probs = logits.softmax(dim=1)  # -inf (fewer items than top_k) gets 0
        top_codes = self.codes[torch.from_numpy(found).clamp_min(0)]  # (P, top_k, 3)
        k = self.catalog.codebook_size
        a = torch.zeros(len(probs), k).scatter_add_(1, top_codes[:, :, 0], probs)
        same_a = (top_codes[:, :, 0] == true[:, None, 0]).float() * probs
        mass = same_a.sum(dim=1, keepdim=True)
        b = torch.zeros(len(probs), k).scatter_add_(1, top_codes[:, :, 1], same_a)
        return LevelTargets(a, b / mass.clamp_min(1e-12), mass.squeeze(1) > 1e-6)


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
    item in turn (every c, and a b whose true a the teacher gave no mass, take the hard target
    alone)."""
    if logp.shape[0] != 3 * len(targets):
        raise ValueError(f"{logp.shape[0]} labels for {len(targets)} target items")
    hard = -logp.gather(1, labels[:, None]).squeeze(1)
    tok_a, tok_b = tokens
    # masked log-probs are -inf off the level: 0 * -inf must not reach the sum
    soft_a = -(targets.a * logp[0::3][:, tok_a].clamp_min(-1e4)).sum(dim=1)
    soft_b = -(targets.b * logp[1::3][:, tok_b].clamp_min(-1e4)).sum(dim=1)
    mixed = hard.clone()
    mixed[0::3] = (1 - alpha) * hard[0::3] + alpha * soft_a
    mixed[1::3] = torch.where(
        targets.b_known, (1 - alpha) * hard[1::3] + alpha * soft_b, hard[1::3]
    )
    return mixed.mean()
