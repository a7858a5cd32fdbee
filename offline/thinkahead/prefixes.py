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
from pathlib import Path
from typing import TYPE_CHECKING

from offline.errors import InputError
from service.contracts.affinity import DEFAULT_AFFINITY_ITEMS, NO_AFFINITY, Affinity
from service.contracts.answers import AnswerScoring, pack_answer
from service.contracts.beam import BeamSearch, run_searches
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.covisit import CovisitTable, Neighbours, covisit_scores
from service.contracts.fusion import ItemFeatures, extra_prefixes
from service.contracts.model import load_serving_config
from service.contracts.scoring import (
    MIN_TOP_C,
    CandidatePrefix,
    ScoringPlan,
    combine,
    first_token_logprobs,
    plan_item_scoring,
    plan_think_ahead,
    prefix_heads,
    rank_think_ahead,
)
from service.contracts.snapshot import Prefix
from service.contracts.tokens import Code, TokenIds
from service.engine.base import BatchEngine, TokenLogprobs

if TYPE_CHECKING:  # torch stays out of imports that only read prefixes
    from offline.items.artifact import ItemModel


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


@dataclass(frozen=True)
class CovisitSource:
    """The catalog's co-visitation table and how many neighbours the service adds to the
    candidates (the model's serving.json)."""

    neighbours: Mapping[str, Neighbours]
    candidates: int
    version: str | None = None  # the table's, recorded in the snapshot manifest

    @classmethod
    def load(cls, catalog_dir: Path, catalog: Catalog, model_dir: Path) -> CovisitSource | None:
        table = CovisitTable.load_optional(catalog_dir, catalog.item_ids, catalog.version)
        if table is None:
            return None
        candidates = load_serving_config(model_dir).covisit_candidates
        return cls(table.as_mapping(), candidates, table.version)


ITEMS_DIR = "items"  # the item-level model's default place: inside the model directory


@dataclass(frozen=True)
class ItemSource:
    """The item-level model whose best items per user the worker stores (``<model>/items`` by
    default; ``thinkahead train-items``)."""

    model: ItemModel
    items: int = DEFAULT_AFFINITY_ITEMS  # stored per user
    candidates: int = 0  # of them among the service's candidates (serving.json)

    @classmethod
    def load(
        cls,
        model_dir: Path,
        catalog: Catalog,
        directory: Path | None = None,
        items: int = DEFAULT_AFFINITY_ITEMS,
        candidates: int | None = None,
    ) -> ItemSource | None:
        """The item model in ``directory``, else in ``<model_dir>/items`` when there is one;
        ``candidates`` None: the model's serving.json."""
        from offline.items.artifact import ItemModel

        path = Path(directory) if directory is not None else Path(model_dir) / ITEMS_DIR
        if directory is not None and not path.is_dir():
            raise InputError(path, "no item model here (thinkahead train-items --out ...)")
        if not path.is_dir() or items == 0:
            return None
        if candidates is None:
            candidates = load_serving_config(model_dir).affinity_candidates
        return cls(ItemModel.load(path, catalog), items, min(candidates, items))

    def affinities(
        self, catalog: Catalog, histories: Sequence[Sequence[Code]], exclude_history: bool = True
    ) -> list[Affinity]:
        top = self.model.top_items(catalog, histories, self.items, exclude_history)
        return [Affinity.of_items(ranked) for ranked in top]


def history_covisit(
    catalog: Catalog, history: Sequence[Code], source: CovisitSource
) -> dict[str, float]:
    """The co-visitation scores the service computes for this history when nothing was added
    (history items excluded, as the service excludes them)."""
    items = [item for code in history if (item := catalog.item_at(code)) is not None]
    return covisit_scores(items, source.neighbours, set(items))


def extra_candidates(
    catalog: Catalog,
    history: Sequence[Code],
    result: UserResult,
    source: CovisitSource | None,
    affinity: Affinity,
    affinity_candidates: int,
) -> list[tuple[int, int]]:
    """The prefixes the service will add for an unchanged history (co-visitation neighbours,
    the item-level model's best items) that the prefix search did not keep."""
    scores = history_covisit(catalog, history, source) if source is not None else {}
    kept = {(p.a, p.b) for p in result.prefixes}
    candidates = source.candidates if source is not None else 0
    return [
        ab
        for ab in extra_prefixes(catalog, scores, candidates, affinity, affinity_candidates)
        if ab not in kept
    ]


def extra_head_plan(
    ids: TokenIds, catalog: Catalog, history: Sequence[Code], extra: Sequence[tuple[int, int]]
) -> ScoringPlan:
    """The a and b steps of the extra prefixes under the history."""
    return plan_item_scoring(
        ids.history(history),
        [CandidatePrefix(a, b, 0.0) for a, b in extra],
        Constraint(catalog, history),
        ids,
        top_c=1,
        heads_only=True,
    )


CTails = tuple[tuple[Code, float], ...]  # log P(c | a, b, history) per item


def c_tail_plan(
    ids: TokenIds, catalog: Catalog, history: Sequence[Code], prefixes: Sequence[tuple[int, int]]
) -> ScoringPlan:
    """The c step of every given prefix that holds more than one item, under the constraint
    the service uses for an unchanged history (history items excluded), every c returned. A
    single-item prefix needs none (log P(c | a, b) = 0); one holding more than ``MIN_TOP_C``
    c's is left to the engine online, which asks only its top max(k, 32) (10 B per item would
    not bound a value in a catalog of 10^8 items)."""
    constraint = Constraint(catalog, history)
    wanted = [
        CandidatePrefix(a, b, 0.0, head=0.0)  # head 0: the c steps alone
        for a, b in prefixes
        if 1 < len(constraint.c_values(a, b)) <= MIN_TOP_C
    ]
    return plan_item_scoring(ids.history(history), wanted, constraint, ids, top_c=MIN_TOP_C)


def read_heads(
    plan: ScoringPlan, part: Sequence[TokenLogprobs], ids: TokenIds
) -> tuple[Prefix, ...]:
    return tuple(Prefix(a, b, h) for (a, b), h in prefix_heads(plan, part, ids).items())


def read_c_tails(plan: ScoringPlan, part: Sequence[TokenLogprobs], ids: TokenIds) -> CTails:
    return tuple((s.code, s.decoder) for s in combine(plan, part, ids))


@dataclass(frozen=True)
class StoredScores:
    """What the worker stores beside a user's prefixes so the online step skips engine
    requests: log P(a, b) of the extra prefixes (snapshot field ``covisit_heads``), log P(a)
    of every first token the prefixes and extras use (``first_tokens``: after a fresh event
    log P(b | a) is reused for both), and log P(c | a, b) of the items under their
    multi-item prefixes (``c_tails``)."""

    heads: tuple[Prefix, ...]
    c_tails: CTails
    first_tokens: tuple[tuple[int, float], ...]


def stored_scores(
    engine: BatchEngine,
    ids: TokenIds,
    catalog: Catalog,
    histories: Sequence[Sequence[Code]],
    results: Sequence[UserResult],
    tail_prefixes: int,
    source: CovisitSource | None,
    affinities: Sequence[Affinity],
    affinity_candidates: int,
) -> list[StoredScores]:
    """Every user's ``StoredScores`` in one engine batch; c's over the first
    ``tail_prefixes`` prefixes and the extras (0: none)."""
    extras = [
        extra_candidates(catalog, history, result, source, affinity, affinity_candidates)
        for history, result, affinity in zip(histories, results, affinities, strict=True)
    ]
    head_plans = [
        extra_head_plan(ids, catalog, history, extra)
        for history, extra in zip(histories, extras, strict=True)
    ]
    tail_plans = [
        c_tail_plan(
            ids,
            catalog,
            history,
            [(p.a, p.b) for p in result.prefixes[:tail_prefixes]] + extra if tail_prefixes else [],
        )
        for history, result, extra in zip(histories, results, extras, strict=True)
    ]
    parts = score_plans(engine, [*head_plans, *tail_plans])
    out = []
    for u, result in enumerate(results):
        head_plan, head_part = head_plans[u], parts[u]
        first = dict(result.first_tokens)
        for a, lp in first_token_logprobs(head_plan, head_part, ids).items():
            first.setdefault(a, lp)  # the prefixes' own (merged over paths) stay
        out.append(
            StoredScores(
                read_heads(head_plan, head_part, ids),
                read_c_tails(tail_plans[u], parts[len(head_plans) + u], ids),
                tuple(sorted(first.items())),
            )
        )
    return out


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


def think_ahead_answers(
    engine: BatchEngine,
    ids: TokenIds,
    catalog: Catalog,
    histories: Sequence[Sequence[Code]],
    results: Sequence[UserResult],
    heads: Sequence[Sequence[Prefix]],
    source: CovisitSource | None,
    scoring: AnswerScoring,
    items: int,
    affinities: Sequence[Affinity] | None = None,
    c_tails: Sequence[Sequence[tuple[Code, float]]] | None = None,
) -> list[bytes]:
    """Each user's whole think-ahead answer for the unchanged history, top ``items``,
    scored exactly as the service would (``plan_think_ahead`` / ``rank_think_ahead``), in one
    engine batch for all users. ``c_tails``: the stored log P(c | a, b), as the service reads
    them (float32): the snapshot prefixes' c steps need no request here either."""
    plans, user_features = [], []
    affinities = affinities or [NO_AFFINITY] * len(histories)
    tails = c_tails or [()] * len(histories)
    for history, result, extra, affinity, tail in zip(
        histories, results, heads, affinities, tails, strict=True
    ):
        scores = history_covisit(catalog, history, source) if source is not None else {}
        features = ItemFeatures(catalog, scores, affinity)
        plans.append(
            plan_think_ahead(
                ids.history(history),
                result.prefixes[: scoring.prefixes],
                extra_prefixes(
                    catalog,
                    scores,
                    scoring.covisit_candidates,
                    affinity,
                    scoring.affinity_candidates,
                ),
                Constraint(catalog, history if scoring.exclude_history else ()),
                ids,
                items,
                scoring.weights,
                features,
                unchanged=True,
                covisit_heads=extra,
                c_tails=tail,
            )
        )
        user_features.append(features)
    packed = []
    for plan, part, features in zip(plans, score_plans(engine, plans), user_features, strict=True):
        ranked = rank_think_ahead(plan, part, ids, features, scoring.weights)
        kept = [(code, s) for code, s in ranked if math.isfinite(s)][:items]
        packed.append(pack_answer(kept))
    return packed
