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


def test_plan_asks_one_request_per_a_per_a_prefix_and_per_prefix() -> None:
    cat = tiny_catalog()
    prefixes = [Prefix(0, 0, -0.1), Prefix(0, 1, -0.2), Prefix(1, 0, -0.3)]
    plan = plan_item_scoring(PROMPT, prefixes, Constraint(cat), IDS, top_c=5)
    # 1 request for the a's, 2 for b's (a=0, a=1), 3 for c's
    assert len(plan.requests) == 6
    a_req = plan.requests[0]
    assert set(a_req.allowed) == {int(IDS.a[0]), int(IDS.a[1])}
    assert set(a_req.want or ()) == {int(IDS.a[0]), int(IDS.a[1])}
    c_req = plan.requests[plan.c_slots[2][0]]
    assert c_req.prompt == (*PROMPT, int(IDS.a[1]), int(IDS.b[0]))
    assert set(c_req.allowed) == {int(IDS.c[0]), int(IDS.c[2])}


def test_fully_excluded_prefixes_are_dropped_never_sent_empty() -> None:
    cat = tiny_catalog()
    con = Constraint(cat, [(0, 1, 0)])
    plan = plan_item_scoring(PROMPT, [Prefix(0, 1, 0.0)], con, IDS, top_c=5)
    assert plan.requests == []
    plan = plan_item_scoring(PROMPT, [Prefix(0, 1, 0.0), Prefix(0, 0, 0.0)], con, IDS, top_c=5)
    assert all(r.allowed for r in plan.requests)
    assert [p for _, p in plan.c_slots] == [Prefix(0, 0, 0.0)]


def test_item_score_sums_levels_and_blends_offline_score() -> None:
    cat = tiny_catalog()
    prefixes = [Prefix(0, 1, math.log(0.9)), Prefix(1, 0, math.log(0.1))]
    plan = plan_item_scoring(PROMPT, prefixes, Constraint(cat), IDS, top_c=5)
    la = {int(IDS.a[0]): math.log(0.2), int(IDS.a[1]): math.log(0.8)}
    results = [
        la,
        {int(IDS.b[1]): math.log(0.5)},
        {int(IDS.b[0]): math.log(1.0)},
        {int(IDS.c[0]): 0.0},
        {int(IDS.c[0]): math.log(0.7), int(IDS.c[2]): math.log(0.3)},
    ]
    scored = combine(plan, results, IDS, offline_weight=0.0)
    # Fresh context prefers a=1 although the offline score preferred (0, 1).
    assert [s.code for s in scored] == [(1, 0, 0), (1, 0, 2), (0, 1, 0)]
    assert math.isclose(scored[0].online, math.log(0.8 * 1.0 * 0.7))
    blended = combine(plan, results, IDS, offline_weight=2.0)
    assert blended[0].code == (0, 1, 0)
    assert math.isclose(blended[0].score, math.log(0.2 * 0.5) + 2 * math.log(0.9))
