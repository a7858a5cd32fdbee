"""C_u for a batch of users: (optionally) G sampled reasoning paths, then a trie-constrained beam
search over the first two semantic-ID tokens after each path, merged into the top M prefixes.

Aggregation over paths: a prefix's score is log of its mean probability across the G paths,
``logsumexp_g log P(a, b | history, path_g) - log G`` (a path whose beam missed the prefix
contributes 0). For G = 1 this is just the constrained log P(a, b | history).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from service.contracts.beam import BeamSearch, run_searches
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.scoring import ScoringPlan
from service.contracts.snapshot import Prefix
from service.contracts.tokens import Code, TokenIds
from service.engine.base import BatchEngine, TokenLogprobs


@dataclass(frozen=True)
class ReasoningPaths:
    """Token ids of the sampled paths per user (G each) and their text."""

    tokens: list[list[list[int]]]
    texts: list[list[str]]


@dataclass(frozen=True)
class UserResult:
    prefixes: list[Prefix]
    reasoning: str | None
    # log P(a | history) of the prefixes' first tokens (merged over paths like the prefixes)
    first_tokens: tuple[tuple[int, float], ...] = ()


def _log_mean_prob(scores: Sequence[float], g: int) -> float:
    """log of the mean probability over g paths; a path that missed contributes 0."""
    top = max(scores)
    return top + math.log(sum(math.exp(s - top) for s in scores)) - math.log(g)


def merge_paths(per_path: Sequence[Sequence[Prefix]], keep: int) -> list[Prefix]:
    pooled: dict[tuple[int, int], list[float]] = {}
    for beams in per_path:
        for p in beams:
            pooled.setdefault((p.a, p.b), []).append(p.score)
    merged = [
        Prefix(a, b, _log_mean_prob(scores, len(per_path))) for (a, b), scores in pooled.items()
    ]
    merged.sort(key=lambda p: (-p.score, p.a, p.b))
    return merged[:keep]


def merge_first_tokens(
    per_path: Sequence[Mapping[int, float]], wanted: set[int]
) -> tuple[tuple[int, float], ...]:
    pooled: dict[int, list[float]] = {}
    for first in per_path:
        for a, score in first.items():
            if a in wanted:
                pooled.setdefault(a, []).append(score)
    return tuple(sorted((a, _log_mean_prob(s, len(per_path))) for a, s in pooled.items()))


def compute_prefixes(
    engine: BatchEngine,
    ids: TokenIds,
    catalog: Catalog,
    histories: Sequence[Sequence[Code]],
    beam: int,
    keep: int,
    paths: ReasoningPaths | None = None,
) -> list[UserResult]:
    """Prefix search for many users at once: every step is one engine batch across them."""
    searches: list[BeamSearch] = []
    owners: list[int] = []
    for u, history in enumerate(histories):
        constraint = Constraint(catalog, history)
        base = ids.history(history)
        variants = [base]
        if paths is not None:
            head = base[:-1]  # drop the trailing <|sid_begin|>; reasoning comes first
            # each path already runs from <think> to </think>
            variants = [head + path + [ids.sid_begin] for path in paths.tokens[u]]
        for prompt in variants:
            searches.append(BeamSearch(prompt, ids, constraint, beam, depth=2))
            owners.append(u)
    run_searches(searches, engine.score_batch)
    per_user: list[list[list[Prefix]]] = [[] for _ in histories]
    firsts: list[list[dict[int, float]]] = [[] for _ in histories]
    for owner, search in zip(owners, searches, strict=True):
        per_user[owner].append([Prefix(b.code[0], b.code[1], b.score) for b in search.beams])
        firsts[owner].append(search.first)
    results = []
    for u, per_path in enumerate(per_user):
        reasoning = None
        if paths is not None and paths.texts[u]:
            reasoning = paths.texts[u][0]
        prefixes = merge_paths(per_path, keep)
        first = merge_first_tokens(firsts[u], {p.a for p in prefixes})
        results.append(UserResult(prefixes, reasoning, first))
    return results


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
