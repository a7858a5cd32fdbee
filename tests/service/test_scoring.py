"""Logic of the one-round whole-item scoring, with hand-made engine answers (the engine itself is
exercised for real in tests/integration)."""

from __future__ import annotations

import math

from offline.train.tokenizer import build_tokenizer
from service.constraint import Constraint
from service.scoring import combine, plan_item_scoring
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
