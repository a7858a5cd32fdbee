"""Online whole-item scoring under the fresh history, in ONE engine round.

For the user's candidate prefixes C_u, the service asks, all at once (so the prefix cache serves
the shared history): log P(a) for the distinct a's; log P(b | a) per distinct a; and the top
log P(c | a, b) per prefix. Every log-prob is renormalised over what the constraint allows at
that step, exactly as in constrained beam search, so the summed item score equals the score a
full decode would give that item. The offline prefix score is blended in with a weight chosen
on the validation split. (Scoring only the last token cannot reorder prefixes that hold a
single item: P(c | a, b) = 1 there.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.constraint import Constraint
from service.engine.base import MAX_WANTED_IDS, ScoreRequest, TokenLogprobs
from service.snapshot import Prefix
from service.tokens import Code, TokenIds


@dataclass(frozen=True)
class ScoredCode:
    code: Code
    score: float
    online: float  # log P(a) + log P(b|a) + log P(c|a,b) under the fresh history
    offline: float  # the snapshot's prefix score


@dataclass
class ScoringPlan:
    requests: list[ScoreRequest]
    a_slots: list[tuple[int, list[int]]]  # (request index, a values asked)
    b_slots: dict[int, list[tuple[int, list[int]]]]  # a -> [(request index, b values asked)]
    c_slots: list[tuple[int, Prefix]]  # (request index, prefix)


def _chunks(values: list[int], size: int = MAX_WANTED_IDS) -> list[list[int]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


def plan_item_scoring(
    prompt: Sequence[int],
    prefixes: Sequence[Prefix],
    constraint: Constraint,
    ids: TokenIds,
    top_c: int,
) -> ScoringPlan:
    """Requests for every usable prefix; prefixes left empty by exclusions are dropped."""
    prompt = tuple(prompt)
    usable = [p for p in prefixes if constraint.has_prefix(p.a, p.b)]
    plan = ScoringPlan([], [], {}, [])
    if not usable:
        return plan
    a_allowed = tuple(ids.level_ids("a", constraint.a_values()))
    distinct_a = sorted({p.a for p in usable})
    for chunk in _chunks(distinct_a):
        plan.a_slots.append((len(plan.requests), chunk))
        want = tuple(ids.level_ids("a", chunk))
        plan.requests.append(ScoreRequest(prompt, a_allowed, want=want))
    for a in distinct_a:
        b_allowed = tuple(ids.level_ids("b", constraint.b_values(a)))
        wanted_b = sorted({p.b for p in usable if p.a == a})
        a_prompt = (*prompt, int(ids.a[a]))
        for chunk in _chunks(wanted_b):
            plan.b_slots.setdefault(a, []).append((len(plan.requests), chunk))
            want = tuple(ids.level_ids("b", chunk))
            plan.requests.append(ScoreRequest(a_prompt, b_allowed, want=want))
    for p in usable:
        c_values = constraint.c_values(p.a, p.b)
        plan.c_slots.append((len(plan.requests), p))
        plan.requests.append(
            ScoreRequest(
                (*prompt, int(ids.a[p.a]), int(ids.b[p.b])),
                tuple(ids.level_ids("c", c_values)),
                top_n=top_c,
            )
        )
    return plan


def combine(
    plan: ScoringPlan,
    results: Sequence[TokenLogprobs],
    ids: TokenIds,
    offline_weight: float,
) -> list[ScoredCode]:
    """Item scores, best first; ties broken by code so the order is deterministic."""
    log_a: dict[int, float] = {}
    for index, values in plan.a_slots:
        for a in values:
            lp = results[index].get(int(ids.a[a]))
            if lp is not None:
                log_a[a] = lp
    log_b: dict[tuple[int, int], float] = {}
    for a, slots in plan.b_slots.items():
        for index, values in slots:
            for b in values:
                lp = results[index].get(int(ids.b[b]))
                if lp is not None:
                    log_b[(a, b)] = lp
    scored: list[ScoredCode] = []
    for index, p in plan.c_slots:
        head = log_a.get(p.a, float("-inf")) + log_b.get((p.a, p.b), float("-inf"))
        for token, lp_c in results[index].items():
            c = ids.index_of.get(token)
            if c is None:
                continue
            online = head + lp_c
            scored.append(
                ScoredCode((p.a, p.b, c), online + offline_weight * p.score, online, p.score)
            )
    scored.sort(key=lambda s: (-s.score, s.code))
    return scored
