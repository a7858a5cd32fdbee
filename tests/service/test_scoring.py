"""Logic of the one-round whole-item scoring and the fused score, with hand-made engine answers
(the engine itself is exercised for real in tests/integration)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from offline.train.tokenizer import build_tokenizer
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.fusion import FusionWeights, ItemFeatures, rank_fused
from service.contracts.manifest import CatalogManifest
from service.contracts.scoring import (
    CandidatePrefix,
    Pruning,
    ScoringPlan,
    candidate_prefixes,
    combine,
    known_c_scores,
    plan_item_scoring,
)
from service.contracts.snapshot import Prefix
from service.contracts.tokens import Code, TokenIds
from tests.helpers import tiny_catalog

IDS = TokenIds.from_vocab(build_tokenizer(4).get_vocab(), 4)
PROMPT = IDS.history([(1, 0, 0)])
# tiny catalog: (0,0)->c{0,1}  (0,1)->c{0}  (1,0)->c{0,2};  a=0 -> b{0,1}, a=1 -> b{0}
PREFIXES = [Prefix(0, 0, -0.1), Prefix(0, 1, -0.2), Prefix(1, 0, -0.3)]


def fresh(prefixes: list[Prefix]) -> list[CandidatePrefix]:
    return candidate_prefixes(prefixes)


def test_plan_skips_steps_with_a_single_allowed_token() -> None:
    plan = plan_item_scoring(PROMPT, fresh(PREFIXES), Constraint(tiny_catalog()), IDS, top_c=5)
    # 1 request for the a's, 1 for the b's under a=0 (a=1 has a single b), and c requests only
    # for the two prefixes that hold more than one item.
    assert len(plan.requests) == 4
    a_req = plan.requests[0]
    assert set(a_req.allowed) == {int(IDS.a[0]), int(IDS.a[1])}
    assert set(a_req.want or ()) == {int(IDS.a[0]), int(IDS.a[1])}
    assert plan.single_b == {(1, 0)}
    assert plan.single_c == {(0, 1): 0}
    c_req = plan.requests[plan.c_slots[(1, 0)]]
    assert c_req.prompt == (*PROMPT, int(IDS.a[1]), int(IDS.b[0]))
    assert set(c_req.allowed) == {int(IDS.c[0]), int(IDS.c[2])}


def test_unchanged_history_reuses_offline_prefix_scores() -> None:
    candidates = candidate_prefixes(PREFIXES, reuse_prefix_scores=True)
    plan = plan_item_scoring(PROMPT, candidates, Constraint(tiny_catalog()), IDS, top_c=5)
    assert len(plan.requests) == 2 and not plan.a_slots and not plan.b_slots
    results = [
        {int(IDS.c[0]): math.log(0.25), int(IDS.c[1]): math.log(0.75)},
        {int(IDS.c[0]): math.log(0.5), int(IDS.c[2]): math.log(0.5)},
    ]
    scored = {s.code: s for s in combine(plan, results, IDS)}
    # the single-item prefix keeps its offline score exactly (P(c | a, b) = 1)
    assert scored[(0, 1, 0)].decoder == -0.2
    assert math.isclose(scored[(0, 0, 1)].decoder, -0.1 + math.log(0.75))
    assert set(scored) == {(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 0, 2)}


def test_covisitation_prefixes_the_snapshot_lacks_need_their_a_and_b_steps() -> None:
    candidates = candidate_prefixes(
        [Prefix(0, 0, -0.1), Prefix(0, 1, -0.7)], extra=[(0, 1), (1, 0)], reuse_prefix_scores=True
    )
    # (0, 1) is in the snapshot already; (1, 0) joins with the lowest snapshot score
    assert [(c.a, c.b, c.offline, c.head) for c in candidates] == [
        (0, 0, -0.1, -0.1),
        (0, 1, -0.7, -0.7),
        (1, 0, -0.7, None),
    ]
    plan = plan_item_scoring(PROMPT, candidates, Constraint(tiny_catalog()), IDS, top_c=5)
    assert plan.a_slots == [(0, [1])] and plan.single_b == {(1, 0)} and not plan.b_slots


def test_fully_excluded_prefixes_are_dropped_never_sent_empty() -> None:
    con = Constraint(tiny_catalog(), [(0, 1, 0)])
    plan = plan_item_scoring(PROMPT, fresh([Prefix(0, 1, 0.0)]), con, IDS, top_c=5)
    assert plan.requests == [] and plan.prefixes == []
    plan = plan_item_scoring(
        PROMPT, fresh([Prefix(0, 1, 0.0), Prefix(0, 0, 0.0)]), con, IDS, top_c=5
    )
    assert all(r.allowed for r in plan.requests)
    assert [(p.a, p.b) for p in plan.prefixes] == [(0, 0)]


def test_item_score_sums_levels_and_fuses_the_other_terms() -> None:
    catalog = tiny_catalog()
    prefixes = [Prefix(0, 1, math.log(0.9)), Prefix(1, 0, math.log(0.1))]
    plan = plan_item_scoring(PROMPT, fresh(prefixes), Constraint(catalog), IDS, top_c=5)
    # a request, b request (a=0), c request for (1, 0); (0, 1) holds one item
    assert len(plan.requests) == 3
    results = [
        {int(IDS.a[0]): math.log(0.2), int(IDS.a[1]): math.log(0.8)},
        {int(IDS.b[1]): math.log(0.5)},
        {int(IDS.c[0]): math.log(0.7), int(IDS.c[2]): math.log(0.3)},
    ]
    scored = [(s.code, s.decoder, s.offline) for s in combine(plan, results, IDS)]
    none = ItemFeatures(catalog, {})
    # Fresh context prefers a=1 although the offline score preferred (0, 1).
    ranked = rank_fused(scored, none, FusionWeights())
    assert [code for code, _ in ranked] == [(1, 0, 0), (1, 0, 2), (0, 1, 0)]
    assert math.isclose(ranked[0][1], math.log(0.8 * 1.0 * 0.7))
    blended = rank_fused(scored, none, FusionWeights(offline=2.0))
    assert blended[0][0] == (0, 1, 0)
    assert math.isclose(blended[0][1], math.log(0.2 * 0.5) + 2 * math.log(0.9))
    # co-visitation of the fresh history lifts i4 = (1, 0, 2) to the top
    covisit = ItemFeatures(catalog, {"i4": 20.0})
    lifted = rank_fused(scored, covisit, FusionWeights(covisit=1.0))
    assert lifted[0][0] == (1, 0, 2)
    assert math.isclose(lifted[0][1], math.log(0.8 * 0.3) + math.log1p(20.0))


def test_a_fresh_history_reuses_b_given_a_from_the_snapshot() -> None:
    first = [(0, -0.05), (1, -0.2)]  # the snapshot's log P(a) under its own history
    candidates = candidate_prefixes(PREFIXES, first_tokens=first)
    assert [(c.head, c.tail) for c in candidates] == [
        (None, -0.1 + 0.05),
        (None, -0.2 + 0.05),
        (None, -0.3 + 0.2),
    ]
    plan = plan_item_scoring(PROMPT, candidates, Constraint(tiny_catalog()), IDS, top_c=5)
    # the a step under the fresh history and the two multi-item c steps: no b step at all
    assert not plan.b_slots and plan.a_slots == [(0, [0, 1])] and len(plan.requests) == 3
    results = [
        {int(IDS.a[0]): math.log(0.6), int(IDS.a[1]): math.log(0.4)},
        {int(IDS.c[0]): math.log(0.25), int(IDS.c[1]): math.log(0.75)},
        {int(IDS.c[0]): math.log(0.5), int(IDS.c[2]): math.log(0.5)},
    ]
    scored = {s.code: s.decoder for s in combine(plan, results, IDS)}
    assert math.isclose(scored[(0, 0, 1)], math.log(0.6) - 0.05 + math.log(0.75))
    assert math.isclose(scored[(0, 1, 0)], math.log(0.6) - 0.15)
    assert math.isclose(scored[(1, 0, 2)], math.log(0.4) - 0.1 + math.log(0.5))
    # an unchanged history needs neither: the prefix scores are the heads
    unchanged = candidate_prefixes(PREFIXES, reuse_prefix_scores=True, first_tokens=first)
    assert all(c.tail is None and c.head == c.offline for c in unchanged)


def catalog_of(codes: set[Code], k: int) -> Catalog:
    array = np.array(sorted(codes), dtype=np.int32)
    manifest = CatalogManifest(
        catalog_version="r", codebook_size=k, num_items=len(array), embedding_model="test"
    )
    return Catalog(manifest, [f"r{i}" for i in range(len(array))], array, np.ones(len(array)))


def random_catalog(rng: np.random.Generator, k: int = 8, items: int = 120) -> Catalog:
    """Codes spread so that prefixes hold one to several items, as on Beauty."""
    codes: set[tuple[int, int, int]] = set()
    while len(codes) < items:
        a, b = int(rng.integers(k)), int(rng.integers(k))
        codes.add((a, b, int(rng.integers(1 + (a % 4)))))  # a % 4 + 1 items at most per (a, b)
    return catalog_of(codes, k)


def uniform_answers(plan: ScoringPlan) -> list[dict[int, float]]:
    return [{t: -math.log(len(r.allowed)) for t in r.allowed} for r in plan.requests]


def test_stored_c_scores_replace_c_steps_renormalised_over_the_cs_still_allowed() -> None:
    # (0,0)->c{0,1,2}  (0,1)->c{0}  (1,0)->c{0,2}  (2,0)->c{0,1}
    catalog = catalog_of({(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (1, 0, 0), (1, 0, 2),
                          (2, 0, 0), (2, 0, 1)}, k=4)  # fmt: skip
    stored = [
        ((0, 0, 0), math.log(0.5)),
        ((0, 0, 1), math.log(0.3)),
        ((0, 0, 2), math.log(0.2)),
        ((1, 0, 0), 0.0),  # (1, 0, 2) was in the snapshot's history: not stored
        ((2, 0, 0), math.log(0.9)),  # (2, 0) is no snapshot prefix here
        ((2, 0, 1), math.log(0.1)),
    ]
    first = [(0, -0.05), (1, -0.2)]
    candidates = candidate_prefixes(PREFIXES, [(2, 0)], first_tokens=first, c_tails=stored)
    # an extra prefix the worker scored has its c's too
    assert candidates[-1].c_scores == ((0, math.log(0.9)), (1, math.log(0.1)))
    # a fresh exclusion under (0, 0): its stored c's are renormalised over c 0 and 2
    constraint = Constraint(catalog, [(0, 0, 1)])
    plan = plan_item_scoring(PROMPT, candidates, constraint, IDS, top_c=5)
    renormalised = {0: math.log(0.5 / 0.7), 2: math.log(0.2 / 0.7)}
    assert plan.known_c == {
        (0, 0): pytest.approx(renormalised),
        (2, 0): pytest.approx({0: math.log(0.9), 1: math.log(0.1)}),
    }
    # (1, 0, 2) is allowed now but was not stored: that prefix asks the engine
    assert set(plan.c_slots) == {(1, 0)} and plan.single_c == {(0, 1): 0}
    scored = {s.code: s.decoder for s in combine(plan, uniform_answers(plan), IDS)}
    log_a0 = -math.log(3)  # a in {0, 1, 2}, uniform
    assert math.isclose(scored[(0, 0, 2)], log_a0 + (-0.1 + 0.05) + math.log(0.2 / 0.7))
    assert (0, 0, 1) not in scored
    assert math.isclose(scored[(1, 0, 2)], log_a0 + (-0.3 + 0.2) + math.log(0.5))
    # an unchanged history with its own constraint: every stored c exactly as stored
    plan = plan_item_scoring(
        PROMPT,
        candidate_prefixes(PREFIXES, reuse_prefix_scores=True, c_tails=stored),
        Constraint(catalog, [(1, 0, 2)]),
        IDS,
        top_c=5,
    )
    assert plan.requests == [] and set(plan.known_c) == {(0, 0)} and plan.single_c[(1, 0)] == 0


def test_extra_prefixes_the_worker_scored_skip_their_b_and_c_steps_after_a_fresh_event() -> None:
    # (0,0)->c{0,1}  (0,1)->c{0}  (1,0)->c{0,2}  (2,0)->c{0,1}  (3,0)->c{0,1}  (3,1)->c{0}
    catalog = catalog_of({(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 0, 2), (2, 0, 0),
                          (2, 0, 1), (3, 0, 0), (3, 0, 1), (3, 1, 0)}, k=4)  # fmt: skip
    first = [(0, -0.05), (1, -0.2), (2, -1.0)]  # log P(a) under the snapshot's history
    heads = [Prefix(2, 0, -1.5)]  # log P(2, 0) there: the worker knew this extra
    stored = [
        ((0, 0, 0), math.log(0.5)),
        ((0, 0, 1), math.log(0.5)),
        ((1, 0, 0), math.log(0.6)),
        ((1, 0, 2), math.log(0.4)),
        ((2, 0, 0), math.log(0.9)),
        ((2, 0, 1), math.log(0.1)),
    ]
    # (3, 0): a neighbour of the fresh event, unknown to the worker
    candidates = candidate_prefixes(
        PREFIXES, [(2, 0), (3, 0)], extra_heads=heads, first_tokens=first, c_tails=stored
    )
    extra, unknown = candidates[-2:]
    assert (extra.head, extra.tail) == (None, pytest.approx(-0.5))  # log P(b | a) reused
    assert (unknown.head, unknown.tail, unknown.c_scores) == (None, None, None)
    plan = plan_item_scoring(PROMPT, candidates, Constraint(catalog), IDS, top_c=5)
    # one a step for every first token; b and c steps only for the unknown prefix
    assert plan.a_slots == [(0, [0, 1, 2, 3])]
    assert [(a, b) for _, a, b in plan.b_slots] == [(3, [0])] and set(plan.c_slots) == {(3, 0)}
    assert len(plan.requests) == 3
    scored = {s.code: s.decoder for s in combine(plan, uniform_answers(plan), IDS)}
    log_a = -math.log(4)  # a in {0, 1, 2, 3}, uniform
    assert math.isclose(scored[(2, 0, 0)], log_a - 0.5 + math.log(0.9))
    assert math.isclose(scored[(3, 0, 1)], log_a + math.log(0.5) + math.log(0.5))
    # unchanged history: the stored head is the fresh one, no a step for it
    unchanged = candidate_prefixes(
        PREFIXES, [(2, 0), (3, 0)], True, heads, first_tokens=first, c_tails=stored
    )
    assert [(c.head, c.tail) for c in unchanged[-2:]] == [(-1.5, None), (None, None)]
    assert unchanged[-2].c_scores == ((0, math.log(0.9)), (1, math.log(0.1)))


def test_unusable_stored_c_scores_fall_back_to_the_c_step() -> None:
    for bad in (math.nan, math.inf):
        prefix = CandidatePrefix(0, 0, 0.0, c_scores=((0, bad), (1, -1.0)))
        assert known_c_scores(prefix, [0, 1]) is None
    assert known_c_scores(CandidatePrefix(0, 0, 0.0), [0, 1]) is None


def stored_c_tails(
    rng: np.random.Generator, snapshot: list[Prefix], constraint: Constraint
) -> list[tuple[Code, float]]:
    """A normalised log P(c | a, b) over the c's ``constraint`` allowed, per multi-item prefix,
    as the worker stores them."""
    out: list[tuple[Code, float]] = []
    for p in snapshot:
        cs = constraint.c_values(p.a, p.b)
        if len(cs) > 1:
            logits = rng.normal(scale=2.0, size=len(cs))
            logp = logits - np.logaddexp.reduce(logits)
            out += [((p.a, p.b, int(c)), float(v)) for c, v in zip(cs, logp, strict=True)]
    return out


def answers_by_request(
    rng: np.random.Generator, plan: ScoringPlan
) -> dict[object, dict[int, float]]:
    """A normalised distribution over each request's allowed tokens (what processed log-probs
    return), all of it, keyed by prompt and allowed set: the unpruned and pruned plans read the same
    numbers."""
    answers: dict[object, dict[int, float]] = {}
    for request in plan.requests:
        logits = rng.normal(scale=2.0, size=len(request.allowed))
        logp = logits - np.logaddexp.reduce(logits)
        answers[(request.prompt, request.allowed)] = {
            t: float(v) for t, v in zip(request.allowed, logp, strict=True)
        }
    return answers


def ranking(
    plan: ScoringPlan,
    answers: dict[object, dict[int, float]],
    ids: TokenIds,
    features: ItemFeatures,
    weights: FusionWeights,
    k: int,
) -> list[tuple[int, int, int]]:
    results = [answers[(r.prompt, r.allowed)] for r in plan.requests]
    scored = [(s.code, s.decoder, s.offline) for s in combine(plan, results, ids)]
    return [code for code, _ in rank_fused(scored, features, weights)[:k]]


def test_bounded_prefixes_keep_the_exact_top_k_of_the_fused_score() -> None:
    rng = np.random.default_rng(7)
    ids = TokenIds.from_vocab(build_tokenizer(8).get_vocab(), 8)
    prompt = ids.history([(1, 1, 0)])
    pruned_total = known_total = fallbacks = 0
    for trial in range(200):
        catalog = random_catalog(rng)
        codes = [tuple(int(v) for v in code) for code in catalog.codes]
        # the items excluded when the snapshot was computed, and now (events come and go)
        then, now = ([codes[i] for i in rng.choice(len(codes), 6)] for _ in range(2))
        constraint = Constraint(catalog, now)
        ab = sorted({(int(a), int(b)) for a, b, _ in catalog.codes})
        chosen = rng.choice(len(ab), size=min(20, len(ab)), replace=False)
        snapshot = [Prefix(*ab[i], float(-rng.exponential(3.0))) for i in chosen[:16]]
        extra = [ab[i] for i in chosen[16:]]  # co-visitation prefixes: heads unknown
        # odd trials: a fresh history with log P(b | a) reused (tails known, heads not); trials
        # 2 and 3 mod 4 also know log P(c | a, b) from the snapshot
        fresh_history = trial % 2 == 1
        first = [
            (a, max(p.score for p in snapshot if p.a == a) / 2) for a in {p.a for p in snapshot}
        ]
        c_tails = stored_c_tails(rng, snapshot, Constraint(catalog, then)) if trial % 4 > 1 else []
        candidates = candidate_prefixes(
            snapshot,
            extra,
            reuse_prefix_scores=not fresh_history,
            first_tokens=first,
            c_tails=c_tails,
        )
        k = int(rng.integers(1, 11))
        weights = FusionWeights(
            offline=float(rng.choice([0.0, 0.25, 1.0])),
            covisit=float(rng.choice([0.0, 1.0, 4.0])),
            popularity=float(rng.choice([0.0, 0.5])),
        )
        covisit = {
            catalog.item_ids[r]: float(rng.exponential(2.0))
            for r in rng.choice(len(catalog), size=10, replace=False)
        }
        catalog.popularity[:] = rng.integers(0, 50, size=len(catalog))
        features = ItemFeatures(catalog, covisit)
        full = plan_item_scoring(prompt, candidates, constraint, ids, top_c=8)
        pruned = plan_item_scoring(
            prompt, candidates, constraint, ids, top_c=8,
            prune=Pruning(k, weights.offline, features.bonus_with(weights)),
        )  # fmt: skip
        answers = answers_by_request(rng, full)
        assert len(pruned.requests) <= len(full.requests)
        assert pruned.pruned == len(full.prefixes) - len(pruned.prefixes)
        pruned_total += pruned.pruned
        known_total += len(full.known_c)
        fallbacks += sum(
            p.c_scores is not None and (p.a, p.b) in full.c_slots for p in full.prefixes
        )

        assert ranking(pruned, answers, ids, features, weights, k) == ranking(
            full, answers, ids, features, weights, k
        ), trial
    assert pruned_total > 0  # the bound does bite
    assert known_total > 0 and fallbacks > 0  # stored c's used, and refused where incomplete


def test_pruning_needs_known_prefix_heads() -> None:
    # without them the prefix scores are not the fresh log P(a, b): nothing can be bounded
    features = ItemFeatures(tiny_catalog(), {})
    plan = plan_item_scoring(
        PROMPT,
        fresh(PREFIXES),
        Constraint(tiny_catalog()),
        IDS,
        top_c=5,
        prune=Pruning(1, 0.0, features.bonus_with(FusionWeights())),
    )
    assert plan.pruned == 0 and len(plan.prefixes) == 3
