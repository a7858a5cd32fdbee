"""Snapshot entries: what the worker thinks ahead for each user.

:class:`Thinker` turns users' histories into :class:`UserPrefixes` values: the top-M prefixes
of a 2-token trie beam search (after G sampled reasoning paths when the model has them), the
scores the service would otherwise ask the engine for (log P(a, b) of the extra candidates,
log P(a) of the first tokens, log P(c | a, b) under multi-item prefixes), the user's best
item-level items and the whole answer for the unchanged history, ranked by the service's own
:class:`~service.contracts.think_ahead.ThinkAheadScorer`. The nightly worker, ``thinkahead
eval`` (a history some events behind) and anything that re-thinks a user call it, so an entry
is the same whoever computes it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from offline.errors import InputError
from offline.thinkahead.prefixes import UserResult, compute_prefixes, score_plans
from service.contracts.affinity import DEFAULT_AFFINITY_ITEMS, NO_AFFINITY, Affinity
from service.contracts.answers import pack_answer
from service.contracts.catalog import Catalog
from service.contracts.covisit import CovisitTable, Neighbours, covisit_scores
from service.contracts.packed import pack_scored
from service.contracts.rationale import answer_rationales, pack_rationales
from service.contracts.scoring import (
    MIN_TOP_C,
    CandidatePrefix,
    ScoringPlan,
    combine,
    first_token_logprobs,
    plan_item_scoring,
    prefix_heads,
)
from service.contracts.snapshot import Prefix, UserPrefixes, history_digest
from service.contracts.think_ahead import ThinkAheadScorer
from service.contracts.tokens import Code
from service.engine.base import BatchEngine

if TYPE_CHECKING:  # torch stays out of imports that only read entries
    from offline.thinkahead.reasoning import CategoryReasoner, Reasoner
    from service.contracts.item_model import ItemModel


@dataclass(frozen=True)
class CovisitSource:
    """The catalog's co-visitation table, as the snapshot publishes it."""

    neighbours: Mapping[str, Neighbours]
    version: str | None = None  # the table's, recorded in the snapshot manifest

    @classmethod
    def load(cls, catalog_dir: Path, catalog: Catalog) -> CovisitSource | None:
        table = CovisitTable.load_optional(catalog_dir, catalog.item_ids, catalog.version)
        return None if table is None else cls(table.as_mapping(), table.version)


@dataclass(frozen=True)
class ItemSource:
    """The item-level model whose best items per user the worker stores (``<model>/items`` by
    default; ``thinkahead train-items``)."""

    model: ItemModel
    path: Path
    items: int = DEFAULT_AFFINITY_ITEMS  # stored per user

    @property
    def refit(self) -> bool:
        """Trained on train + validation (``train-items --refit``)."""
        return self.model.refit

    @classmethod
    def load(
        cls,
        model_dir: Path,
        catalog: Catalog,
        directory: Path | None = None,
        items: int = DEFAULT_AFFINITY_ITEMS,
    ) -> ItemSource | None:
        """The item model in ``directory``, else in ``<model_dir>/items`` when there is one."""
        from service.contracts.item_model import ITEMS_DIR, ItemModel

        path = Path(directory) if directory is not None else Path(model_dir) / ITEMS_DIR
        if directory is not None and not path.is_dir():
            raise InputError(path, "no item model here (thinkahead train-items --out ...)")
        if not path.is_dir() or items == 0:
            return None
        return cls(ItemModel.load(path, catalog), path, items)

    def affinities(
        self, catalog: Catalog, histories: Sequence[Sequence[Code]], exclude_history: bool = True
    ) -> list[Affinity]:
        return self.model.affinities(catalog, histories, self.items, exclude_history)

    @cached_property
    def fresh_model(self) -> ItemModel:
        """Built once: ``for_fresh`` concatenates the members' item vectors anew."""
        return self.model.for_fresh()

    def fresh_affinities(
        self, catalog: Catalog, histories: Sequence[Sequence[Code]], exclude_history: bool = True
    ) -> list[Affinity]:
        """What the service's fresh encode gives (``ItemModel.for_fresh``), for the evals and
        the tune of the no-engine fresh answer."""
        return self.fresh_model.affinities(
            catalog, histories, DEFAULT_AFFINITY_ITEMS, exclude_history
        )


def history_covisit(
    catalog: Catalog, history: Sequence[Code], neighbours: Mapping[str, Neighbours]
) -> dict[str, float]:
    """The co-visitation scores the service computes for this history when nothing was added
    (history items excluded, as the service excludes them)."""
    items = [item for code in history if (item := catalog.item_at(code)) is not None]
    return covisit_scores(items, neighbours, set(items))


@dataclass(frozen=True)
class StoredScores:
    """What the worker stores beside a user's prefixes so the online step skips engine
    requests: log P(a, b) of the extra prefixes (snapshot field ``covisit_heads``), log P(a)
    of every first token the prefixes and extras use (``first_tokens``: after a fresh event
    log P(b | a) is reused for both), and log P(c | a, b) of the items under their
    multi-item prefixes (``c_tails``)."""

    heads: tuple[Prefix, ...] = ()
    c_tails: tuple[tuple[Code, float], ...] = ()
    first_tokens: tuple[tuple[int, float], ...] = ()


def _head_plan(
    scorer: ThinkAheadScorer, history: Sequence[Code], extra: Sequence[tuple[int, int]]
) -> ScoringPlan:
    """The a and b steps of the extra prefixes under the history."""
    return plan_item_scoring(
        scorer.ids.history(history),
        [CandidatePrefix(a, b, 0.0) for a, b in extra],
        scorer.constraint(history),
        scorer.ids,
        top_c=1,
        heads_only=True,
    )


def _c_tail_plan(
    scorer: ThinkAheadScorer, history: Sequence[Code], prefixes: Sequence[tuple[int, int]]
) -> ScoringPlan:
    """The c step of every given prefix that holds more than one item, under the constraint
    the service uses for an unchanged history, every c returned. A single-item prefix needs
    none (log P(c | a, b) = 0); one holding more than ``MIN_TOP_C`` c's is left to the engine
    online, which asks only its top max(k, 32) (10 B per item would not bound a value in a
    catalog of 10^8 items)."""
    constraint = scorer.constraint(history)
    wanted = [
        CandidatePrefix(a, b, 0.0, head=0.0)  # head 0: the c steps alone
        for a, b in prefixes
        if 1 < len(constraint.c_values(a, b)) <= MIN_TOP_C
    ]
    return plan_item_scoring(
        scorer.ids.history(history), wanted, constraint, scorer.ids, top_c=MIN_TOP_C
    )


def stored_scores(
    engine: BatchEngine,
    scorer: ThinkAheadScorer,
    histories: Sequence[Sequence[Code]],
    results: Sequence[UserResult],
    neighbours: Mapping[str, Neighbours],
    affinities: Sequence[Affinity],
    tail_prefixes: int,
) -> list[StoredScores]:
    """Every user's :class:`StoredScores` in one engine batch; c's over the first
    ``tail_prefixes`` prefixes and the extras (0: none)."""
    extras = []
    for history, result, affinity in zip(histories, results, affinities, strict=True):
        kept = {(p.a, p.b) for p in result.prefixes}
        covisit = history_covisit(scorer.catalog, history, neighbours)
        extras.append([ab for ab in scorer.extras(covisit, affinity) if ab not in kept])
    head_plans = [_head_plan(scorer, h, extra) for h, extra in zip(histories, extras, strict=True)]
    tail_plans = [
        _c_tail_plan(
            scorer,
            history,
            [(p.a, p.b) for p in result.prefixes[:tail_prefixes]] + extra if tail_prefixes else [],
        )
        for history, result, extra in zip(histories, results, extras, strict=True)
    ]
    parts = score_plans(engine, [*head_plans, *tail_plans])
    ids = scorer.ids
    out = []
    for u, result in enumerate(results):
        head_plan, head_part = head_plans[u], parts[u]
        first = dict(result.first_tokens)
        for a, lp in first_token_logprobs(head_plan, head_part, ids).items():
            first.setdefault(a, lp)  # the prefixes' own (merged over paths) stay
        heads = prefix_heads(head_plan, head_part, ids)
        tails = combine(tail_plans[u], parts[len(head_plans) + u], ids)
        out.append(
            StoredScores(
                tuple(Prefix(a, b, h) for (a, b), h in heads.items()),
                tuple((s.code, s.decoder) for s in tails),
                tuple(sorted(first.items())),
            )
        )
    return out


@dataclass(frozen=True)
class Thinker:
    """Computes users' snapshot entries. ``scorer.settings.prefixes`` is M, the prefixes kept
    per user; ``answer_items`` 0 stores no answer, ``c_tails`` False no log P(c | a, b);
    ``stored`` False skips every stored score (an eval of the unchanged history, whose online
    step asks the engine the same questions)."""

    engine: BatchEngine
    scorer: ThinkAheadScorer
    model_version: str
    beam: int
    covisit: CovisitSource | None = None
    items: ItemSource | None = None
    answer_items: int = 0
    c_tails: bool = True
    stored: bool = True
    reasoner: Reasoner | CategoryReasoner | None = None
    paths: int = 1

    def entries(self, histories: Sequence[Sequence[Code]], seed: int = 0) -> list[UserPrefixes]:
        """One entry per history (each already capped at the model's history length)."""
        scorer = self.scorer
        catalog, keep = scorer.catalog, scorer.settings.prefixes
        thoughts = (
            self.reasoner.think(self.engine, histories, self.paths, seed=seed)
            if self.reasoner is not None
            else None
        )
        results = compute_prefixes(
            self.engine, scorer.ids, catalog, histories, self.beam, keep, thoughts
        )
        affinities = (
            self.items.affinities(catalog, histories)
            if self.items is not None
            else [NO_AFFINITY] * len(histories)
        )
        neighbours = self.covisit.neighbours if self.covisit is not None else {}
        stored = (
            stored_scores(
                self.engine,
                scorer,
                histories,
                results,
                neighbours,
                affinities,
                keep if self.c_tails else 0,
            )
            if self.stored
            else [StoredScores() for _ in histories]
        )
        now = time.time()
        values = [
            UserPrefixes(
                self.model_version,
                catalog.version,
                now,
                tuple(result.prefixes),
                history_digest=history_digest(history),
                reasoning=result.reasoning,
                rationales=pack_rationales(result.rationales) if result.rationales else b"",
                covisit_heads=scores.heads,
                first_tokens=scores.first_tokens,
                affinity=affinity.pack(),
                c_tails=pack_scored(scores.c_tails, precise=True),
            )
            for history, result, scores, affinity in zip(
                histories, results, stored, affinities, strict=True
            )
        ]
        # what the service will read: every stored number at its stored precision
        values = [UserPrefixes.decode(v.encode()) for v in values]
        if self.answer_items == 0:
            return values
        answers = self.answers(histories, values, neighbours)
        return [
            replace(v, answer=pack_answer(a), rationales=v.rationales or self._explain(h, a))
            for v, h, a in zip(values, histories, answers, strict=True)
        ]

    def _explain(self, history: Sequence[Code], answer: Sequence[tuple[Code, float]]) -> bytes:
        """The answer's own rationale (basis "answer") for an entry whose model stated none,
        when the catalog has categories."""
        catalog = self.scorer.catalog
        if catalog.categories is None:
            return b""
        ranked = [(i, s) for c, s in answer if (i := catalog.item_at(c)) is not None]
        seen = [i for c in history if (i := catalog.item_at(c)) is not None]
        found = answer_rationales(
            ranked,
            catalog.categories,
            catalog.category_of,
            seen,
            settings=self.scorer.settings.rationale,
        )
        return pack_rationales(found) if found else b""

    def answers(
        self,
        histories: Sequence[Sequence[Code]],
        values: Sequence[UserPrefixes],
        neighbours: Mapping[str, Neighbours],
    ) -> list[list[tuple[Code, float]]]:
        """Each user's whole think-ahead answer for the unchanged history, top
        ``answer_items``, scored exactly as the service would, in one engine batch."""
        scorer = self.scorer
        plans = [
            scorer.plan(
                value,
                history,
                history_covisit(scorer.catalog, history, neighbours),
                self.answer_items,
                unchanged=True,
            )
            for history, value in zip(histories, values, strict=True)
        ]
        parts = score_plans(self.engine, [p.scoring for p in plans])
        answers = []
        for plan, part in zip(plans, parts, strict=True):
            ranked = scorer.rank(plan, part)
            answers.append(
                [(code, s) for code, s in ranked if math.isfinite(s)][: self.answer_items]
            )
        return answers
