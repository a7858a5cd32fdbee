"""Rankings an evaluation scores: the decoder's full decode and the served think-ahead answer.

Modes of ``thinkahead eval``:
- ``full``: trie-constrained beam search over all three tokens (width >= k);
- ``think-ahead``: the architecture as served: top-M prefixes from a 2-token beam search over
  the history the worker saw (optionally ``stale_events`` events short), then the online step
  scores whole items under the fresh history (``service.contracts.scoring``) in one engine round.
History items are excluded from the ranking in every mode (as the service does).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tqdm.auto import tqdm

from offline.data import Example
from offline.eval.metrics import TOP_K
from offline.eval.rationale import RationaleStats
from offline.thinkahead.entries import CovisitSource, ItemSource, Thinker
from offline.thinkahead.prefixes import merge_items, path_weights, score_plans, search_paths
from service.contracts.affinity import Affinity
from service.contracts.answers import DEFAULT_ANSWER_ITEMS
from service.contracts.catalog import Catalog
from service.contracts.covisit import Neighbours, covisit_scores
from service.contracts.fusion import FusionWeights, ItemFeatures, rank_fused
from service.contracts.model import ModelInfo
from service.contracts.rationale import (
    ANSWER_RATIONALE_ITEMS,
    Categories,
    Rationale,
    answer_rationales,
    unpack_rationales,
)
from service.contracts.scoring import ScoredCode
from service.contracts.snapshot import UserPrefixes
from service.contracts.think_ahead import ScoringSettings, ThinkAheadScorer
from service.contracts.tokens import Code
from service.engine.base import BatchEngine

if TYPE_CHECKING:  # torch and tokenizers stay out until a reasoning model is evaluated
    from offline.thinkahead.reasoning import CategoryReasoner, Reasoner


@dataclass(frozen=True)
class Ranked:
    items: list[list[str]]
    invalid: int  # codes that are not catalog items (must stay 0)
    seconds: float
    # share of targets whose (a, b) is among the user's top-m offline prefixes, per m: the
    # ceiling of think-ahead recall
    coverage: dict[str, float] | None = None
    rationale: dict[str, float | int] | None = None  # accuracy and faithfulness, when stored


def _to_items(catalog: Catalog, codes: Sequence[Code], k: int) -> tuple[list[str], int]:
    items, invalid = [], 0
    for code in codes[:k]:
        item = catalog.item_at(code)
        if item is None:
            invalid += 1
        else:
            items.append(item)
    return items, invalid


def rank_full(
    engine: BatchEngine,
    model: ModelInfo,
    catalog: Catalog,
    examples: Sequence[Example],
    k: int,
    beam: int,
    progress: bool = True,
    reasoner: Reasoner | CategoryReasoner | None = None,
    paths: int = 1,
    batch_users: int = 128,
) -> Ranked:
    """The decoder alone: a trie-constrained beam search over the three tokens; with a
    ``reasoner``, one under each of the user's ``paths`` thought paths, merged (for a category
    model: sum over its G likeliest categories of P(category) P(item | category))."""
    t0 = time.monotonic()
    ranked: list[list[str]] = []
    invalid = 0
    ids = model.token_ids
    for start in tqdm(
        range(0, len(examples), batch_users), desc="full decode", disable=not progress, unit="batch"
    ):
        chunk = examples[start : start + batch_users]
        histories = [catalog.codes_of(e.history)[0][-model.max_history :] for e in chunk]
        thoughts = reasoner.think(engine, histories, paths) if reasoner is not None else None
        searches = search_paths(engine, ids, catalog, histories, max(beam, k), thoughts, depth=3)
        for u, per_user in enumerate(searches):
            weights = path_weights(thoughts[u] if thoughts is not None else None)
            codes = [code for code, _ in merge_items(per_user, weights)]
            items, bad = _to_items(catalog, codes, k)
            ranked.append(items)
            invalid += bad
    return Ranked(ranked, invalid, time.monotonic() - t0)


@dataclass
class UserCandidates:
    """One user's scored think-ahead candidates: enough to rank them under any weights."""

    target: str
    scored: list[ScoredCode]
    features: ItemFeatures
    snapshot_ab: frozenset[tuple[int, int]]
    covisit_ab: tuple[tuple[int, int], ...]  # best first
    affinity_ab: tuple[tuple[int, int], ...] = ()  # best first
    rationales: tuple[Rationale, ...] = ()  # the entry's, best first
    history: tuple[str, ...] = ()

    def ranked(
        self,
        weights: FusionWeights,
        k: int,
        covisit_candidates: int | None = None,
        affinity_candidates: int | None = None,
    ) -> list[Code]:
        ranked = self.ranked_scored(weights, k, covisit_candidates, affinity_candidates)
        return [code for code, _ in ranked]

    def ranked_scored(
        self,
        weights: FusionWeights,
        k: int,
        covisit_candidates: int | None = None,
        affinity_candidates: int | None = None,
    ) -> list[tuple[Code, float]]:
        affinity_ab = (
            self.affinity_ab
            if affinity_candidates is None
            else self.features.affinity.prefixes(affinity_candidates)
        )
        keep = self.snapshot_ab | set(self.covisit_ab[:covisit_candidates]) | set(affinity_ab)
        scored = [(s.code, s.decoder, s.offline) for s in self.scored if s.code[:2] in keep]
        return rank_fused(scored, self.features, weights)[:k]

    def answer(
        self,
        catalog: Catalog,
        weights: FusionWeights,
        covisit_candidates: int | None = None,
        affinity_candidates: int | None = None,
    ) -> list[tuple[str, float]]:
        """The top ``ANSWER_RATIONALE_ITEMS`` as (item id, fused score): what an answer's
        rationale is made of."""
        return [
            (item, score)
            for code, score in self.ranked_scored(
                weights, ANSWER_RATIONALE_ITEMS, covisit_candidates, affinity_candidates
            )
            if (item := catalog.item_at(code)) is not None
        ]


@dataclass(frozen=True)
class ThinkAheadEval:
    """How ``thinkahead eval --mode think-ahead`` and ``tune-blend`` meet the users: the
    worker's entry for the history minus its last ``stale_events`` items, then the service's
    online step over the fresh history. ``prune`` False scores every candidate (to learn the
    weights)."""

    scoring: ScoringSettings
    beam: int
    k: int = TOP_K
    stale_events: int = 0
    prune: bool = True
    batch_users: int = 128
    progress: bool = True
    reasoner: Reasoner | CategoryReasoner | None = None  # the model's, as the worker thinks
    paths: int = 1  # G
    # after fresh events: the engine round, or the stored answer re-ranked without one
    fresh_path: Literal["engine", "rerank"] = "engine"

    def thinker(
        self,
        engine: BatchEngine,
        scorer: ThinkAheadScorer,
        model: ModelInfo,
        covisit: Mapping[str, Neighbours],
        items: ItemSource | None,
        answer_items: int = 0,
    ) -> Thinker:
        """The worker's entry computer as this eval meets users. Stored scores only for a
        stale history (with an unchanged one the online step asks the engine the same
        questions) or when the entry's stored answer is re-ranked."""
        return Thinker(
            engine,
            scorer,
            model.version,
            beam=max(self.beam, self.scoring.prefixes),
            covisit=CovisitSource(covisit),
            items=items,
            answer_items=answer_items,
            c_tails=self.scoring.reuse_snapshot_c,
            stored=self.stale_events > 0 or answer_items > 0,
            reasoner=self.reasoner,
            paths=self.paths,
        )

    def entries(
        self,
        thinker: Thinker,
        catalog: Catalog,
        model: ModelInfo,
        examples: Sequence[Example],
        desc: str,
    ) -> Iterator[tuple[Sequence[Example], list[list[Code]], list[UserPrefixes]]]:
        """Per batch of examples: the examples, their fresh histories (codes, the model's
        window) and the entries computed ``stale_events`` before them."""
        for start in tqdm(
            range(0, len(examples), self.batch_users),
            desc=desc,
            disable=not self.progress,
            unit="batch",
        ):
            chunk = examples[start : start + self.batch_users]
            fresh = [catalog.codes_of(e.history)[0][-model.max_history :] for e in chunk]
            stale = [h[: len(h) - self.stale_events] if self.stale_events else h for h in fresh]
            yield chunk, fresh, thinker.entries(stale)


def think_ahead_candidates(
    engine: BatchEngine,
    model: ModelInfo,
    catalog: Catalog,
    examples: Sequence[Example],
    spec: ThinkAheadEval,
    covisit: Mapping[str, Neighbours],
    items: ItemSource | None = None,
) -> tuple[list[UserCandidates], dict[str, float]]:
    """The architecture as served, per user: the worker's entry (``Thinker``) for the stale
    history, then the service's plan (``ThinkAheadScorer``) over the fresh one, with the
    co-visitation neighbours of the fresh last items among the candidates. The entry's stored
    scores are computed only for a stale history: with an unchanged one the online step asks
    the engine the same questions."""
    scorer = ThinkAheadScorer(catalog, model.token_ids, spec.scoring)
    prefixes = spec.scoring.prefixes
    thinker = spec.thinker(engine, scorer, model, covisit, items)
    covered = {m: 0 for m in (8, 16, 32, prefixes) if m <= prefixes}
    with_covisit = with_extra = 0
    out: list[UserCandidates] = []
    for chunk, fresh, values in spec.entries(thinker, catalog, model, examples, "think-ahead"):
        start = len(out)
        plans = []
        for e, history, value in zip(chunk, fresh, values, strict=True):
            plan = scorer.plan(
                value,
                history,
                covisit_scores(e.history, covisit, set(e.history)),
                spec.k,
                unchanged=spec.stale_events == 0,
                prune=spec.prune,
            )
            target = catalog.code_of(e.target)
            ranked_ab = [(p.a, p.b) for p in value.prefixes]
            if target is not None:
                for m in covered:
                    covered[m] += target[:2] in ranked_ab[:m]
                with_covisit += target[:2] in {*ranked_ab, *plan.covisit_ab}
                with_extra += target[:2] in {*ranked_ab, *plan.covisit_ab, *plan.affinity_ab}
            plans.append(plan)
            out.append(
                UserCandidates(
                    e.target,
                    [],
                    plan.features,
                    plan.snapshot_ab,
                    plan.covisit_ab,
                    plan.affinity_ab,
                    unpack_rationales(value.rationales) if value.rationales else (),
                    tuple(e.history),
                )
            )
        parts = score_plans(engine, [p.scoring for p in plans])
        for plan, part, user in zip(plans, parts, out[start:], strict=True):
            user.scored = scorer.scored(plan, part)
    n = max(len(examples), 1)
    coverage: dict[str, float] = {f"M={m}": round(c / n, 5) for m, c in sorted(covered.items())}
    coverage[f"M={prefixes} + co-visitation"] = round(with_covisit / n, 5)
    if items is not None:
        coverage[f"M={prefixes} + co-visitation + item-level"] = round(with_extra / n, 5)
    return out, coverage


def rank_candidates(
    catalog: Catalog,
    users: Sequence[UserCandidates],
    weights: FusionWeights,
    k: int,
    covisit_candidates: int | None = None,
) -> tuple[list[list[str]], int]:
    ranked, invalid = [], 0
    for user in users:
        items, bad = _to_items(catalog, user.ranked(weights, k, covisit_candidates), k)
        ranked.append(items)
        invalid += bad
    return ranked, invalid


def rerank_covisit(
    history: Sequence[str], covisit: Mapping[str, Neighbours], stale_events: int
) -> tuple[dict[str, float], dict[str, float]]:
    """What the re-rank reads for a user ``stale_events`` past their entry: the co-visitation
    scores of the fresh history and of the entry's, each without its own history, as the
    service reads them."""
    before = history[: len(history) - stale_events]
    return (
        covisit_scores(history, covisit, set(history)),
        covisit_scores(before, covisit, set(before)),
    )


def rank_reranked(
    engine: BatchEngine,
    model: ModelInfo,
    catalog: Catalog,
    examples: Sequence[Example],
    spec: ThinkAheadEval,
    covisit: Mapping[str, Neighbours],
    items: ItemSource | None = None,
) -> Ranked:
    """The no-engine fresh path: the worker's entry (with its stored answer) for the history
    ``spec.stale_events`` short, re-ranked for the fresh history (``ThinkAheadScorer.rerank``),
    with the fresh history's item-level scores when there is an item-level model (as the
    service encodes them: ``service.core.fresh_items``)."""
    t0 = time.monotonic()
    scorer = ThinkAheadScorer(catalog, model.token_ids, spec.scoring)
    thinker = spec.thinker(engine, scorer, model, covisit, items, DEFAULT_ANSWER_ITEMS)
    ranked: list[list[str]] = []
    invalid = 0
    for chunk, fresh, values in spec.entries(thinker, catalog, model, examples, "re-rank"):
        encoded: list[Affinity | None] = (
            list(items.fresh_affinities(catalog, fresh, spec.scoring.exclude_history))
            if items is not None
            else [None] * len(chunk)
        )
        for e, history, value, fresh_affinity in zip(chunk, fresh, values, encoded, strict=True):
            order = scorer.rerank(
                value,
                history,
                *rerank_covisit(e.history, covisit, spec.stale_events),
                fresh_affinity=fresh_affinity,
            )
            codes = [code for code, _ in order or []]
            got, bad = _to_items(catalog, codes, spec.k)
            ranked.append(got)
            invalid += bad
    return Ranked(ranked, invalid, time.monotonic() - t0)


def rank_served(
    engine: BatchEngine,
    model: ModelInfo,
    catalog: Catalog,
    examples: Sequence[Example],
    spec: ThinkAheadEval,
    covisit: Mapping[str, Neighbours],
    items: ItemSource | None = None,
    categories: Categories | None = None,
) -> Ranked:
    """The served ranking (fused score, served weights and pruning) for every example; with
    the catalog's ``categories``, how the stored rationales fare."""
    t0 = time.monotonic()
    users, coverage = think_ahead_candidates(engine, model, catalog, examples, spec, covisit, items)
    ranked, invalid = rank_candidates(catalog, users, spec.scoring.weights, spec.k)
    rationale = None
    if categories is not None:
        stats = RationaleStats(categories, catalog)
        for user, served in zip(users, ranked, strict=True):
            # a model that states none: the worker stores the rationale of this very answer
            shown = user.rationales or answer_rationales(
                user.answer(catalog, spec.scoring.weights),
                categories,
                catalog.category_of,
                user.history,
                settings=spec.scoring.rationale,
            )
            stats.add(user.history, user.target, shown, served)
        rationale = stats.report()
    return Ranked(ranked, invalid, time.monotonic() - t0, coverage, rationale)


def rank_full_torch(
    model_dir: Path,
    info: Any,
    catalog: Catalog,
    examples: list[Any],
    k: int,
    beam: int,
    progress: bool,
) -> Ranked:
    from transformers import LlamaForCausalLM

    from offline.train.trainer import rank_examples

    model = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
    t0 = time.monotonic()
    ranked = rank_examples(model, catalog, info.token_ids, examples, beam, k=k, progress=progress)
    return Ranked(ranked, 0, time.monotonic() - t0)
