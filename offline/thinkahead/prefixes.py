"""C_u for a batch of users: (optionally) G sampled reasoning paths, then a trie-constrained beam
search over the first two semantic-ID tokens after each path, merged into the top M prefixes.

Aggregation over paths: a prefix's score is log of its mean probability across the G paths,
``logsumexp_g log P(a, b | history, path_g) - log G`` (a path whose beam missed the prefix
contributes 0). For G = 1 this is just the constrained log P(a, b | history).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from service.beam import BeamSearch, run_searches
from service.catalog import Catalog
from service.constraint import Constraint
from service.engine.base import BatchEngine
from service.snapshot import Prefix
from service.tokens import Code, TokenIds


@dataclass(frozen=True)
class ReasoningPaths:
    """Token ids of the sampled paths per user (G each) and their text."""

    tokens: list[list[list[int]]]
    texts: list[list[str]]


@dataclass(frozen=True)
class UserResult:
    prefixes: list[Prefix]
    reasoning: str | None


def merge_paths(per_path: Sequence[Sequence[Prefix]], keep: int) -> list[Prefix]:
    g = len(per_path)
    pooled: dict[tuple[int, int], list[float]] = {}
    for beams in per_path:
        for p in beams:
            pooled.setdefault((p.a, p.b), []).append(p.score)
    merged = []
    for (a, b), scores in pooled.items():
        top = max(scores)
        lse = top + math.log(sum(math.exp(s - top) for s in scores))
        merged.append(Prefix(a, b, lse - math.log(g)))
    merged.sort(key=lambda p: (-p.score, p.a, p.b))
    return merged[:keep]


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
    for owner, search in zip(owners, searches, strict=True):
        per_user[owner].append([Prefix(b.code[0], b.code[1], b.score) for b in search.beams])
    results = []
    for u, per_path in enumerate(per_user):
        reasoning = None
        if paths is not None and paths.texts[u]:
            reasoning = paths.texts[u][0]
        results.append(UserResult(merge_paths(per_path, keep), reasoning))
    return results
