"""Logic of the one-round whole-item scoring, with hand-made engine answers (the engine itself is
exercised for real in tests/integration)."""

from __future__ import annotations

import math

import numpy as np

from offline.train.tokenizer import build_tokenizer
from service.catalog import Catalog
from service.constraint import Constraint
from service.manifest import CatalogManifest
from service.scoring import ScoringPlan, combine, plan_item_scoring
from service.snapshot import Prefix
from service.tokens import TokenIds
from tests.service.test_constraint import tiny_catalog

IDS = TokenIds.from_vocab(build_tokenizer(4).get_vocab(), 4)
PROMPT = IDS.history([(1, 0, 0)])
# tiny catalog: (0,0)->c{0,1}  (0,1)->c{0}  (1,0)->c{0,2};  a=0 -> b{0,1}, a=1 -> b{0}
PREFIXES = [Prefix(0, 0, -0.1), Prefix(0, 1, -0.2), Prefix(1, 0, -0.3)]


def test_plan_skips_steps_with_a_single_allowed_token() -> None:
    plan = plan_item_scoring(PROMPT, PREFIXES, Constraint(tiny_catalog()), IDS, top_c=5)
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
    plan = plan_item_scoring(
        PROMPT, PREFIXES, Constraint(tiny_catalog()), IDS, top_c=5, reuse_prefix_scores=True
    )
    assert len(plan.requests) == 2 and not plan.a_slots and not plan.b_slots
    results = [
        {int(IDS.c[0]): math.log(0.25), int(IDS.c[1]): math.log(0.75)},
        {int(IDS.c[0]): math.log(0.5), int(IDS.c[2]): math.log(0.5)},
    ]
    scored = combine(plan, results, IDS, offline_weight=0.0)
    # the single-item prefix keeps its offline score exactly (P(c | a, b) = 1)
    assert scored[0].code == (0, 1, 0) and scored[0].online == -0.2
    assert scored[1].code == (0, 0, 1)
    assert math.isclose(scored[1].online, -0.1 + math.log(0.75))
    assert {s.code for s in scored} == {(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 0, 2)}


def test_fully_excluded_prefixes_are_dropped_never_sent_empty() -> None:
    con = Constraint(tiny_catalog(), [(0, 1, 0)])
    plan = plan_item_scoring(PROMPT, [Prefix(0, 1, 0.0)], con, IDS, top_c=5)
    assert plan.requests == [] and plan.prefixes == []
    plan = plan_item_scoring(PROMPT, [Prefix(0, 1, 0.0), Prefix(0, 0, 0.0)], con, IDS, top_c=5)
    assert all(r.allowed for r in plan.requests)
    assert plan.prefixes == [Prefix(0, 0, 0.0)]


def test_item_score_sums_levels_and_blends_offline_score() -> None:
    prefixes = [Prefix(0, 1, math.log(0.9)), Prefix(1, 0, math.log(0.1))]
    plan = plan_item_scoring(PROMPT, prefixes, Constraint(tiny_catalog()), IDS, top_c=5)
    # a request, b request (a=0), c request for (1, 0); (0, 1) holds one item
    assert len(plan.requests) == 3
    results = [
        {int(IDS.a[0]): math.log(0.2), int(IDS.a[1]): math.log(0.8)},
        {int(IDS.b[1]): math.log(0.5)},
        {int(IDS.c[0]): math.log(0.7), int(IDS.c[2]): math.log(0.3)},
    ]
    scored = combine(plan, results, IDS, offline_weight=0.0)
    # Fresh context prefers a=1 although the offline score preferred (0, 1).
    assert [s.code for s in scored] == [(1, 0, 0), (1, 0, 2), (0, 1, 0)]
    assert math.isclose(scored[0].online, math.log(0.8 * 1.0 * 0.7))
    blended = combine(plan, results, IDS, offline_weight=2.0)
    assert blended[0].code == (0, 1, 0)
    assert math.isclose(blended[0].score, math.log(0.2 * 0.5) + 2 * math.log(0.9))


def random_catalog(rng: np.random.Generator, k: int = 8, items: int = 120) -> Catalog:
    """Codes spread so that prefixes hold one to several items, as on Beauty."""
    codes: set[tuple[int, int, int]] = set()
    while len(codes) < items:
        a, b = int(rng.integers(k)), int(rng.integers(k))
        codes.add((a, b, int(rng.integers(1 + (a % 4)))))  # a % 4 + 1 items at most per (a, b)
    array = np.array(sorted(codes), dtype=np.int32)
    manifest = CatalogManifest(
        catalog_version="r", codebook_size=k, num_items=len(array), embedding_model="test"
    )
    return Catalog(manifest, [f"r{i}" for i in range(len(array))], array, np.ones(len(array)))


def softmax_answers(rng: np.random.Generator, plan: ScoringPlan) -> list[dict[int, float]]:
    """A normalised distribution over each request's allowed tokens (what processed log-probs
    return), all of it: the unpruned and pruned plans read the same numbers."""
    answers = []
    for request in plan.requests:
        logits = rng.normal(scale=2.0, size=len(request.allowed))
        logp = logits - np.logaddexp.reduce(logits)
        answers.append({t: float(v) for t, v in zip(request.allowed, logp, strict=True)})
    return answers


def test_bounded_prefixes_keep_the_exact_top_k() -> None:
    rng = np.random.default_rng(7)
    ids = TokenIds.from_vocab(build_tokenizer(8).get_vocab(), 8)
    prompt = ids.history([(1, 1, 0)])
    pruned_total = 0
    for trial in range(200):
        catalog = random_catalog(rng)
        constraint = Constraint(catalog)
        ab = sorted({(int(a), int(b)) for a, b, _ in catalog.codes})
        chosen = rng.choice(len(ab), size=min(16, len(ab)), replace=False)
        prefixes = [Prefix(*ab[i], float(-rng.exponential(3.0))) for i in chosen]
        k = int(rng.integers(1, 11))
        weight = float(rng.choice([0.0, 0.25, 1.0]))
        full = plan_item_scoring(
            prompt, prefixes, constraint, ids, top_c=8, reuse_prefix_scores=True
        )
        # one distribution per prefix, shared by both plans
        by_prefix = dict(zip(full.c_slots, softmax_answers(rng, full), strict=True))
        pruned = plan_item_scoring(
            prompt, prefixes, constraint, ids, top_c=8, reuse_prefix_scores=True,
            prune_for=(k, weight),
        )  # fmt: skip
        assert len(pruned.requests) <= len(full.requests)
        assert pruned.pruned == len(full.prefixes) - len(pruned.prefixes)
        pruned_total += pruned.pruned
        want = combine(full, [by_prefix[p] for p in full.c_slots], ids, weight)[:k]
        got = combine(pruned, [by_prefix[p] for p in pruned.c_slots], ids, weight)[:k]
        assert [s.code for s in got] == [s.code for s in want], trial
    assert pruned_total > 0  # the bound does bite


def test_pruning_needs_reused_prefix_scores() -> None:
    # without them the prefix scores are not the fresh log P(a, b): nothing can be bounded
    plan = plan_item_scoring(
        PROMPT, PREFIXES, Constraint(tiny_catalog()), IDS, top_c=5, prune_for=(1, 0.0)
    )
    assert plan.pruned == 0 and len(plan.prefixes) == 3
