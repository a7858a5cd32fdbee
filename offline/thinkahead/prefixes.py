"""C_u for a batch of users: the user's thought paths (G of them for a reasoning model), then a
trie-constrained beam search over the first two semantic-ID tokens after each, merged into the
top M prefixes.

A path is a prompt (the history, then the path's rationale), the constraint its search runs
under, and its weight: a category rationale's log P(category | history), under which the search
is held to that category's items, so a prefix's merged score is the mixture
``log sum_g P(cat_g | h) P(a, b | h, cat_g)`` over the G likeliest categories. Sampled free-text
paths weigh the same: ``logsumexp_g log P(a, b | h, path_g) - log G``, the log of the mean
probability (a path whose beam missed the prefix contributes 0). One path with no rationale is
the constrained log P(a, b | history) itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from service.contracts.beam import BeamSearch, run_searches
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.rationale import Rationale
from service.contracts.scoring import ScoringPlan
from service.contracts.snapshot import Prefix
from service.contracts.tokens import Code, TokenIds
from service.engine.base import BatchEngine, TokenLogprobs


@dataclass(frozen=True)
class ThoughtPath:
    """One path: its whole prompt (ending in ``<|sid_begin|>``), the constraint its prefix
    search runs under (None: the user's catalog-wide one) and its log weight (None: 1 / G)."""

    prompt: list[int]
    constraint: Constraint | None = None
    logprob: float | None = None


@dataclass(frozen=True)
class Thoughts:
    """A user's paths, and what of them is stored: a free-text reasoning, category
    rationales (best first)."""

    paths: list[ThoughtPath]
    reasoning: str | None = None
    rationales: tuple[Rationale, ...] = field(default=())


@dataclass(frozen=True)
class UserResult:
    prefixes: list[Prefix]
    reasoning: str | None
    # log P(a | history) of the prefixes' first tokens (merged over paths like the prefixes)
    first_tokens: tuple[tuple[int, float], ...] = ()
    rationales: tuple[Rationale, ...] = ()


def _mixture(scores: Sequence[float]) -> float:
    """log sum exp: the paths' (weighted) probabilities added up."""
    top = max(scores)
    return top + math.log(sum(math.exp(s - top) for s in scores))


def _weights(paths: Sequence[ThoughtPath]) -> list[float]:
    return [p.logprob if p.logprob is not None else -math.log(len(paths)) for p in paths]


def merge_paths(
    per_path: Sequence[Sequence[Prefix]], keep: int, weights: Sequence[float] | None = None
) -> list[Prefix]:
    """The top ``keep`` prefixes of the mixture over paths (``weights``: log weights; None:
    the mean)."""
    weights = weights if weights is not None else [-math.log(len(per_path))] * len(per_path)
    pooled: dict[tuple[int, int], list[float]] = {}
    for w, beams in zip(weights, per_path, strict=True):
        for p in beams:
            pooled.setdefault((p.a, p.b), []).append(w + p.score)
    merged = [Prefix(a, b, _mixture(scores)) for (a, b), scores in pooled.items()]
    merged.sort(key=lambda p: (-p.score, p.a, p.b))
    return merged[:keep]


def merge_first_tokens(
    per_path: Sequence[Mapping[int, float]], wanted: set[int], weights: Sequence[float]
) -> tuple[tuple[int, float], ...]:
    pooled: dict[int, list[float]] = {}
    for w, first in zip(weights, per_path, strict=True):
        for a, score in first.items():
            if a in wanted:
                pooled.setdefault(a, []).append(w + score)
    return tuple(sorted((a, _mixture(s)) for a, s in pooled.items()))


def search_paths(
    engine: BatchEngine,
    ids: TokenIds,
    catalog: Catalog,
    histories: Sequence[Sequence[Code]],
    beam: int,
    thoughts: Sequence[Thoughts] | None = None,
    depth: int = 2,
) -> list[list[BeamSearch]]:
    """Each user's finished searches, one per path (``depth`` 2: prefixes, 3: items); every
    step is one engine batch across all users and paths."""
    searches: list[list[BeamSearch]] = []
    for u, history in enumerate(histories):
        constraint = Constraint(catalog, history)
        paths = thoughts[u].paths if thoughts is not None else [ThoughtPath(ids.history(history))]
        searches.append(
            [BeamSearch(p.prompt, ids, p.constraint or constraint, beam, depth) for p in paths]
        )
    run_searches([s for per_user in searches for s in per_user], engine.score_batch)
    return searches


def path_weights(thoughts: Thoughts | None) -> list[float]:
    """Each path's log weight in the mixture (one path without thoughts: 0)."""
    return _weights(thoughts.paths) if thoughts is not None else [0.0]


def compute_prefixes(
    engine: BatchEngine,
    ids: TokenIds,
    catalog: Catalog,
    histories: Sequence[Sequence[Code]],
    beam: int,
    keep: int,
    thoughts: Sequence[Thoughts] | None = None,
) -> list[UserResult]:
    """The top ``keep`` prefixes of each user, merged over the user's paths."""
    results = []
    searches = search_paths(engine, ids, catalog, histories, beam, thoughts)
    for u, per_user in enumerate(searches):
        mind = thoughts[u] if thoughts is not None else None
        weights = path_weights(mind)
        per_path = [[Prefix(b.code[0], b.code[1], b.score) for b in s.beams] for s in per_user]
        prefixes = merge_paths(per_path, keep, weights)
        first = merge_first_tokens([s.first for s in per_user], {p.a for p in prefixes}, weights)
        results.append(
            UserResult(
                prefixes,
                mind.reasoning if mind else None,
                first,
                mind.rationales if mind else (),
            )
        )
    return results


def merge_items(
    searches: Sequence[BeamSearch], weights: Sequence[float]
) -> list[tuple[Code, float]]:
    """Whole items of depth-3 searches, merged over paths like prefixes, best first."""
    pooled: dict[Code, list[float]] = {}
    for w, search in zip(weights, searches, strict=True):
        for b in search.beams:
            pooled.setdefault(b.code, []).append(w + b.score)  # type: ignore[arg-type]
    merged = [(code, _mixture(scores)) for code, scores in pooled.items()]
    merged.sort(key=lambda cs: (-cs[1], cs[0]))
    return merged


def split_answers(
    plans: Sequence[ScoringPlan], answers: Sequence[TokenLogprobs]
) -> list[Sequence[TokenLogprobs]]:
    """One batch's answers cut back into each plan's share, in plan order."""
    out, offset = [], 0
    for plan in plans:
        out.append(answers[offset : offset + len(plan.requests)])
        offset += len(plan.requests)
    return out


def score_plans(engine: BatchEngine, plans: Sequence[ScoringPlan]) -> list[Sequence[TokenLogprobs]]:
    """Every plan's requests in one engine batch; each plan's answers, in plan order."""
    return split_answers(plans, engine.score_batch([r for plan in plans for r in plan.requests]))
