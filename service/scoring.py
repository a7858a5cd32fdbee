"""Online whole-item scoring under the fresh history, in ONE engine round.

An item's score is log P(a) + log P(b | a) + log P(c | a, b) under the fresh history, each
log-prob renormalised over what the constraint allows at that step (exactly as constrained
beam search scores it), blended with the offline prefix score by a weight chosen on the
validation split. Scoring only the last token cannot reorder prefixes that hold a single item:
P(c | a, b) = 1 there.

All requests go to the engine at once, so the prefix cache serves the shared history:
- one request for log P(a) of the candidates' distinct a's, and one per distinct a for
  log P(b | a) — skipped when the history is exactly the one the snapshot was computed from
  (then the offline prefix score *is* log P(a, b) under the fresh history);
- one request per prefix for the top log P(c | a, b) — skipped where the constraint leaves a
  single choice, whose renormalised log-prob is exactly 0 (most prefixes: 70-80% of (a, b) hold
  one item at K = 256 on Beauty). The same holds for a single allowed b.

When the prefix scores are reused, each prefix's items are bounded before any request is sent:
an item scores at most the prefix's head (log P(c | a, b) <= 0), and the prefix's best item at
least head - log(n_c) (the largest of n_c probabilities is >= 1/n_c); a single-item prefix is
exact. A prefix whose upper bound is below the k-th best lower bound cannot place an item in the
top k, so its request is never sent: exact top-k, fewer requests (often none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from service.constraint import Constraint
from service.engine.base import MAX_WANTED_IDS, ScoreRequest, TokenLogprobs
from service.snapshot import Prefix
from service.tokens import Code, TokenIds


@dataclass(frozen=True)
class ScoredCode:
    code: Code
    score: float
    online: float  # log P(a, b, c) under the fresh history
    offline: float  # the snapshot's prefix score


@dataclass
class ScoringPlan:
    requests: list[ScoreRequest] = field(default_factory=list)
    prefixes: list[Prefix] = field(default_factory=list)
    reuse_prefix_scores: bool = False
    a_slots: list[tuple[int, list[int]]] = field(default_factory=list)
    b_slots: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (request, a, b's)
    single_b: set[tuple[int, int]] = field(default_factory=set)  # log P(b | a) = 0
    c_slots: dict[tuple[int, int], int] = field(default_factory=dict)  # prefix -> request
    single_c: dict[tuple[int, int], int] = field(default_factory=dict)  # prefix -> its only c
    pruned: int = 0  # prefixes bounded out of the top k without a request


def _chunks(values: list[int], size: int = MAX_WANTED_IDS) -> list[list[int]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


def plan_item_scoring(
    prompt: Sequence[int],
    prefixes: Sequence[Prefix],
    constraint: Constraint,
    ids: TokenIds,
    top_c: int,
    reuse_prefix_scores: bool = False,
    prune_for: tuple[int, float] | None = None,
) -> ScoringPlan:
    """Requests for every usable prefix; prefixes left empty by exclusions are dropped.

    ``prune_for=(k, offline_weight)``: with reused prefix scores, also drop the prefixes that
    cannot reach the top k under that blend (see the module docstring)."""
    prompt = tuple(prompt)
    plan = ScoringPlan(reuse_prefix_scores=reuse_prefix_scores)
    plan.prefixes = [p for p in prefixes if constraint.has_prefix(p.a, p.b)]
    if reuse_prefix_scores and prune_for is not None:
        kept = bounded_prefixes(plan.prefixes, constraint, *prune_for)
        plan.pruned = len(plan.prefixes) - len(kept)
        plan.prefixes = kept
    if not plan.prefixes:
        return plan
    if not reuse_prefix_scores:
        a_allowed = tuple(ids.level_ids("a", constraint.a_values()))
        distinct_a = sorted({p.a for p in plan.prefixes})
        for chunk in _chunks(distinct_a):
            plan.a_slots.append((len(plan.requests), chunk))
            plan.requests.append(
                ScoreRequest(prompt, a_allowed, want=tuple(ids.level_ids("a", chunk)))
            )
        for a in distinct_a:
            b_values = constraint.b_values(a)
            wanted = sorted({p.b for p in plan.prefixes if p.a == a})
            if len(b_values) == 1:
                plan.single_b.add((a, wanted[0]))
                continue
            b_allowed = tuple(ids.level_ids("b", b_values))
            for chunk in _chunks(wanted):
                plan.b_slots.append((len(plan.requests), a, chunk))
                plan.requests.append(
                    ScoreRequest(
                        (*prompt, int(ids.a[a])), b_allowed, want=tuple(ids.level_ids("b", chunk))
                    )
                )
    for p in plan.prefixes:
        c_values = constraint.c_values(p.a, p.b)
        if len(c_values) == 1:
            plan.single_c[(p.a, p.b)] = int(c_values[0])
            continue
        plan.c_slots[(p.a, p.b)] = len(plan.requests)
        plan.requests.append(
            ScoreRequest(
                (*prompt, int(ids.a[p.a]), int(ids.b[p.b])),
                tuple(ids.level_ids("c", c_values)),
                top_n=top_c,
            )
        )
    return plan


def bounded_prefixes(
    prefixes: Sequence[Prefix], constraint: Constraint, k: int, offline_weight: float
) -> list[Prefix]:
    """The prefixes that can still hold a top-k item, in their original order.

    With reused prefix scores an item scores (1 + w) * prefix score + log P(c | a, b)."""
    if len(prefixes) <= k:
        return list(prefixes)
    upper = [(1.0 + offline_weight) * p.score for p in prefixes]
    lower = [
        u - math.log(len(constraint.c_values(p.a, p.b)))
        for u, p in zip(upper, prefixes, strict=True)
    ]
    kth_best = sorted(lower, reverse=True)[k - 1]
    # the tolerance keeps ties that float rounding of the bounds could split
    return [p for p, u in zip(prefixes, upper, strict=True) if u >= kth_best - 1e-6]


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
    log_b: dict[tuple[int, int], float] = dict.fromkeys(plan.single_b, 0.0)
    for index, a, values in plan.b_slots:
        for b in values:
            lp = results[index].get(int(ids.b[b]))
            if lp is not None:
                log_b[(a, b)] = lp
    scored: list[ScoredCode] = []
    for p in plan.prefixes:
        key = (p.a, p.b)
        if plan.reuse_prefix_scores:
            head = p.score
        else:
            head = log_a.get(p.a, float("-inf")) + log_b.get(key, float("-inf"))
        if key in plan.single_c:
            c_scores = {plan.single_c[key]: 0.0}
        else:
            c_scores = {
                ids.index_of[t]: lp
                for t, lp in results[plan.c_slots[key]].items()
                if t in ids.index_of
            }
        for c, lp_c in c_scores.items():
            online = head + lp_c
            scored.append(
                ScoredCode((p.a, p.b, c), online + offline_weight * p.score, online, p.score)
            )
    scored.sort(key=lambda s: (-s.score, s.code))
    return scored
