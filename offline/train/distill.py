"""Distillation from the item-level model into the decoder (``thinkahead train --teacher``).

The item-level model (one model or an ensemble, ``thinkahead train-items``) ranks whole items
with a softmax over items, which the decoder cannot have (no per-item vocabulary). Its
next-item distribution is projected onto the decoder's levels and mixed into the decoder's
targets:

- level a: the teacher's probability of each first token, summed over its items;
- level b: the same among the items that share the true a (the decoder is teacher-forced on it),
  renormalised; where the teacher gives that a no mass, the hard target alone;
- level c: the same among the items that share the true (a, b), with ``levels=3``
  (``TrainConfig.distill_levels``; 77% of Beauty's (a, b) prefixes hold one item, but those
  that hold more hold 44% of its items, and level c orders them).

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
    """Soft targets for target items (rows): the teacher's first-token distribution, its
    second-token distribution given the true first token, and its third given the true two."""

    a: torch.Tensor  # (P, K)
    b: torch.Tensor  # (P, K)
    b_known: torch.Tensor  # (P,) bool: the teacher gives the true first token some mass
    c: torch.Tensor  # (P, K)
    c_known: torch.Tensor  # (P,) bool: the teacher gives the true (a, b) some mass

    def __len__(self) -> int:
        return int(self.a.shape[0])

    def rows(self, index: torch.Tensor) -> LevelTargets:
        return LevelTargets(
            self.a[index].float(),
            self.b[index].float(),
            self.b_known[index],
            self.c[index].float(),
            self.c_known[index],
        )

    def levels(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each level's distribution and where it is known (None: everywhere)."""
        return [(self.a, None), (self.b, self.b_known), (self.c, self.c_known)]


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
        dists = [torch.zeros(len(prefixes), k, dtype=torch.float16) for _ in range(3)]
        known = [torch.zeros(len(prefixes), dtype=torch.bool) for _ in range(2)]
        starts = range(0, len(prefixes), batch)
        for s in tqdm(starts, desc="teacher", disable=not progress, unit="batch"):
            chunk = prefixes[s : s + batch]
            part = self.targets(chunk, self.codes[truth[s : s + len(chunk)]])
            for dist, new in zip(dists, (part.a, part.b, part.c), strict=True):
                dist[s : s + len(chunk)] = new.half()
            known[0][s : s + len(chunk)] = part.b_known
            known[1][s : s + len(chunk)] = part.c_known
        a, b, c = dists
        return WindowTargets(LevelTargets(a, b, known[0], c, known[1]), offsets)

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
        same_ab = (top_codes[:, :, 1] == true[:, None, 1]).float() * same_a
        mass_a = same_a.sum(dim=1, keepdim=True)
        mass_ab = same_ab.sum(dim=1, keepdim=True)
        b = torch.zeros(len(probs), k).scatter_add_(1, top_codes[:, :, 1], same_a)
        c = torch.zeros(len(probs), k).scatter_add_(1, top_codes[:, :, 2], same_ab)
        return LevelTargets(
            a,
            b / mass_a.clamp_min(1e-12),
            mass_a.squeeze(1) > 1e-6,
            c / mass_ab.clamp_min(1e-12),
            mass_ab.squeeze(1) > 1e-6,
        )


def level_tokens(ids: TokenIds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.as_tensor(t, dtype=torch.long) for t in (ids.a, ids.b, ids.c))  # type: ignore[return-value]


def distilled_loss(
    logp: torch.Tensor,
    labels: torch.Tensor,
    targets: LevelTargets,
    tokens: tuple[torch.Tensor, ...],
    alpha: float,
    levels: int = 2,
) -> torch.Tensor:
    """Mean cross-entropy against (1 - alpha) * the true token + alpha * the teacher's level
    distribution, on the first ``levels`` levels. ``logp``: (3P, vocab) level-masked log-probs,
    labels a, b, c of each target item in turn (a later level, and a b or c whose true prefix
    the teacher gave no mass, take the hard target alone)."""
    if logp.shape[0] != 3 * len(targets):
        raise ValueError(f"{logp.shape[0]} labels for {len(targets)} target items")
    if not 1 <= levels <= 3:
        raise ValueError(f"levels must be 1, 2 or 3, got {levels}")
    hard = -logp.gather(1, labels[:, None]).squeeze(1)
    mixed = hard.clone()
    for level, ((dist, known), tok) in enumerate(zip(targets.levels()[:levels], tokens)):
        # masked log-probs are -inf off the level: 0 * -inf must not reach the sum
        soft = -(dist * logp[level::3][:, tok].clamp_min(-1e4)).sum(dim=1)
        own = hard[level::3]
        blend = (1 - alpha) * own + alpha * soft
        mixed[level::3] = blend if known is None else torch.where(known, blend, own)
    return mixed.mean()
