"""Online whole-item scoring under the fresh history, in ONE engine round.

An item's score is log P(a) + log P(b | a) + log P(c | a, b) under the fresh history, each
log-prob renormalised over what the constraint allows at that step (exactly as constrained
beam search scores it), fused with the offline prefix score and the request's other features
(``service.contracts.fusion``) by weights learned on the validation split. Scoring only the last
token cannot reorder prefixes that hold a single item: P(c | a, b) = 1 there.

All requests go to the engine at once, so the prefix cache serves the shared history:
- one request for log P(a) of the candidates' distinct a's, and one per distinct a for
  log P(b | a) — skipped when the history is exactly the one the snapshot was computed from
  (then the offline prefix score *is* log P(a, b) under the fresh history);
- one request per prefix for the top log P(c | a, b) — skipped where the constraint leaves a
  single choice, whose renormalised log-prob is exactly 0 (most prefixes: 70-80% of (a, b) hold
  one item at K = 256 on Beauty). The same holds for a single allowed b. Also skipped where the
  snapshot stored log P(c | a, b) under its history for every c the constraint allows
  (``known_c_scores``): those are renormalised over the allowed c's instead.

Candidates are the snapshot's prefixes plus the prefixes of the co-visitation neighbours of the
fresh history; a prefix the snapshot lacks gets the lowest snapshot score as its offline score
(it ranked below all of them offline) and always needs its a and b steps.

Where a prefix's head log P(a, b) is known without the engine (reused snapshot scores), its
items are bounded before any request is sent: an item scores at most head + w_offline * offline
+ its largest feature bonus (log P(c | a, b) <= 0), and the prefix's best item at least
head + w_offline * offline - log(n_c) + its smallest bonus (the largest of n_c probabilities is
>= 1/n_c); with its c's known both bounds use them (the lower one is then the best item's
score). A prefix with an unknown head is bounded above with head <= 0. A prefix whose upper
bound is below the k-th best lower bound cannot place an item in the top k, so its request is
never sent: exact top-k, fewer requests (often none).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.contracts.constraint import Constraint
from service.contracts.snapshot import Prefix
from service.contracts.tokens import Code, TokenIds
from service.engine.base import ScoreRequest, TokenLogprobs

# c's asked per prefix: all of them in catalogs like Beauty (<= 31 items per prefix at K = 256),
# the best this many where a prefix holds more.
MIN_TOP_C = 32


@dataclass(frozen=True)
class CandidatePrefix:
    a: int
    b: int
    offline: float  # the snapshot's prefix score, or the fill for a prefix the snapshot lacks
    head: float | None = None  # log P(a, b) under the fresh history, when known already
    # log P(b | a) reused from the snapshot when the head is not known: only the a step runs
    tail: float | None = None
    # log P(c | a, b) of the prefix's items under the snapshot's history, renormalised over the
    # c's allowed then: no c step where they cover every c allowed now (``known_c_scores``)
    c_scores: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class ScoredCode:
    code: Code
    decoder: float  # log P(a, b, c) under the fresh history
    offline: float  # the prefix's offline score


def candidate_prefixes(
    snapshot: Sequence[Prefix],
    extra: Iterable[tuple[int, int]] = (),
    reuse_prefix_scores: bool = False,
    extra_heads: Sequence[Prefix] = (),
    first_tokens: Sequence[tuple[int, float]] = (),
    c_tails: Sequence[tuple[Code, float]] = (),
) -> list[CandidatePrefix]:
    """The snapshot's prefixes, then the extra (co-visitation, item-level) prefixes it lacks.

    ``reuse_prefix_scores``: the history is the one the snapshot was computed from, so its
    prefix scores, and the ``extra_heads`` the worker computed for the extra prefixes it knew,
    are log P(a, b) under the fresh history. Otherwise, ``first_tokens`` (the snapshot's
    log P(a) under its history) let a prefix with a stored score reuse
    log P(b | a) = score - log P(a): the fresh history then costs one a step instead of a b
    step per first token (an approximation: new events move P(b | a) far less than P(a);
    measured in the README). ``c_tails``: the snapshot's log P(c | a, b) of the items under
    its multi-item prefixes, snapshot and extra (exact for an unchanged history, the same
    approximation as P(b | a) otherwise). Extras the worker did not know (neighbours of a
    fresh event) keep every step."""
    first = dict(first_tokens) if not reuse_prefix_scores else {}
    stored = _by_prefix(c_tails)

    def candidate(a: int, b: int, offline: float, head: float | None) -> CandidatePrefix:
        """One rule for the snapshot's prefixes and the extras: ``head`` is the stored
        log P(a, b) under the snapshot's history (None: the worker did not score it)."""
        return CandidatePrefix(
            a,
            b,
            offline,
            head if reuse_prefix_scores else None,
            min(head - first[a], 0.0) if head is not None and a in first else None,
            stored.get((a, b)),
        )

    out = [candidate(p.a, p.b, p.score, p.score) for p in snapshot]
    seen = {(p.a, p.b) for p in snapshot}
    fill = min((p.score for p in snapshot), default=0.0)
    heads = {(p.a, p.b): p.score for p in extra_heads}
    for a, b in extra:
        if (a, b) not in seen:
            seen.add((a, b))
            out.append(candidate(a, b, fill, heads.get((a, b))))
    return out


def _by_prefix(
    scored: Sequence[tuple[Code, float]],
) -> dict[tuple[int, int], tuple[tuple[int, float], ...]]:
    grouped: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for (a, b, c), score in scored:
        grouped.setdefault((a, b), []).append((c, score))
    return {ab: tuple(cs) for ab, cs in grouped.items()}


def known_c_scores(
    p: CandidatePrefix, c_values: Sequence[int] | np.ndarray
) -> dict[int, float] | None:
    """log P(c | a, b) of every allowed c from the prefix's stored scores, renormalised over the
    allowed c's; None when none are stored, when the constraint allows a c that was not stored
    (an item back in the trie, e.g. one that left the history window: its c step runs), or when
    the stored values are not usable numbers.

    Renormalising is exact for the stored history, not a further approximation: the stored
    log-probs are a softmax over the c's allowed then, and a softmax restricted to a subset and
    renormalised is the softmax over that subset, which is what the engine returns for the c's
    allowed now (fresh events and exclusions only remove c's)."""
    if p.c_scores is None:
        return None
    stored = dict(p.c_scores)
    allowed = [int(c) for c in c_values]
    if any(c not in stored for c in allowed):
        return None
    values = [stored[c] for c in allowed]
    top = max(values)
    norm = top + math.log(sum(math.exp(v - top) for v in values))
    if not math.isfinite(norm):  # NaN or infinite values from a damaged blob
        return None
    return {c: v - norm for c, v in zip(allowed, values, strict=True)}


@dataclass(frozen=True)
class Pruning:
    """Bound prefixes out of the top ``k`` of the fused score before asking the engine."""

    k: int
    offline_weight: float
    bonus: Callable[[Code], float]  # the fused score's terms besides decoder and offline


@dataclass
class ScoringPlan:
    requests: list[ScoreRequest] = field(default_factory=list)
    prefixes: list[CandidatePrefix] = field(default_factory=list)
    a_slots: list[tuple[int, list[int]]] = field(default_factory=list)
    b_slots: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (request, a, b's)
    single_b: set[tuple[int, int]] = field(default_factory=set)  # log P(b | a) = 0
    c_slots: dict[tuple[int, int], int] = field(default_factory=dict)  # prefix -> request
    single_c: dict[tuple[int, int], int] = field(default_factory=dict)  # prefix -> its only c
    # prefix -> log P(c | a, b) of its allowed c's, known from the snapshot: no request
    known_c: dict[tuple[int, int], dict[int, float]] = field(default_factory=dict)
    pruned: int = 0  # prefixes bounded out of the top k without a request


def plan_item_scoring(
    prompt: Sequence[int],
    candidates: Sequence[CandidatePrefix],
    constraint: Constraint,
    ids: TokenIds,
    top_c: int,
    prune: Pruning | None = None,
    heads_only: bool = False,
) -> ScoringPlan:
    """Requests for every usable candidate; prefixes left empty by exclusions are dropped.
    ``heads_only``: only the a and b steps (the worker's log P(a, b) of extra prefixes)."""
    prompt = tuple(prompt)
    plan = ScoringPlan()
    plan.prefixes = [p for p in candidates if constraint.has_prefix(p.a, p.b)]
    if prune is not None:
        kept = bounded_prefixes(plan.prefixes, constraint, prune)
        plan.pruned = len(plan.prefixes) - len(kept)
        plan.prefixes = kept
    if not plan.prefixes:
        return plan
    unknown = [p for p in plan.prefixes if p.head is None]
    if unknown:
        distinct_a = sorted({p.a for p in unknown})
        plan.a_slots.append((len(plan.requests), distinct_a))
        plan.requests.append(
            ScoreRequest(
                prompt,
                tuple(ids.level_ids("a", constraint.a_values())),
                want=tuple(ids.level_ids("a", distinct_a)),
            )
        )
        for a in sorted({p.a for p in unknown if p.tail is None}):
            b_values = constraint.b_values(a)
            wanted = sorted({p.b for p in unknown if p.a == a and p.tail is None})
            if len(b_values) == 1:
                plan.single_b.add((a, wanted[0]))
                continue
            plan.b_slots.append((len(plan.requests), a, wanted))
            plan.requests.append(
                ScoreRequest(
                    (*prompt, int(ids.a[a])),
                    tuple(ids.level_ids("b", b_values)),
                    want=tuple(ids.level_ids("b", wanted)),
                )
            )
    for p in [] if heads_only else plan.prefixes:
        c_values = constraint.c_values(p.a, p.b)
        if len(c_values) == 1:
            plan.single_c[(p.a, p.b)] = int(c_values[0])
            continue
        known = known_c_scores(p, c_values)
        if known is not None:
            plan.known_c[(p.a, p.b)] = known
            continue
        plan.c_slots[(p.a, p.b)] = len(plan.requests)
        plan.requests.append(
            ScoreRequest(
                (*prompt, int(ids.a[p.a]), int(ids.b[p.b])),
                tuple(ids.level_ids("c", c_values)),
                top_n=max(top_c, MIN_TOP_C),
            )
        )
    return plan


def bounded_prefixes(
    prefixes: Sequence[CandidatePrefix], constraint: Constraint, prune: Pruning
) -> list[CandidatePrefix]:
    """The prefixes that can still hold a top-k item, in their original order."""
    if len(prefixes) <= prune.k:
        return list(prefixes)
    upper: list[float] = []
    lower: list[float] = []
    for p in prefixes:
        most, least_best = _item_terms(p, constraint.c_values(p.a, p.b), prune.bonus)
        # an unknown head is at most log P(b | a) when that is reused (log P(a) <= 0), else 0
        known = p.head if p.head is not None else p.tail
        base = prune.offline_weight * p.offline + (known if known is not None else 0.0)
        upper.append(base + most)
        lower.append(base + least_best if p.head is not None else -math.inf)
    kth_best = sorted(lower, reverse=True)[prune.k - 1]
    # the tolerance keeps ties that float rounding of the bounds could split
    return [p for p, u in zip(prefixes, upper, strict=True) if u >= kth_best - 1e-6]


def _item_terms(
    p: CandidatePrefix, c_values: Sequence[int] | np.ndarray, bonus: Callable[[Code], float]
) -> tuple[float, float]:
    """log P(c | a, b) + bonus: the most any of the prefix's items adds, and the least its
    best item adds. Exact when the c's are known (a single c has log-prob 0); otherwise
    log P(c | a, b) <= 0 and the best of n_c is >= -log(n_c)."""
    known = {int(c_values[0]): 0.0} if len(c_values) == 1 else known_c_scores(p, c_values)
    if known is not None:
        best = max(lp + bonus((p.a, p.b, c)) for c, lp in known.items())
        return best, best
    bonuses = [bonus((p.a, p.b, int(c))) for c in c_values]
    return max(bonuses), min(bonuses) - math.log(len(c_values))


def first_token_logprobs(
    plan: ScoringPlan, results: Sequence[TokenLogprobs], ids: TokenIds
) -> dict[int, float]:
    """log P(a) of the first tokens the plan asked for, as the engine returned them."""
    log_a: dict[int, float] = {}
    for index, values in plan.a_slots:
        for a in values:
            lp = results[index].get(int(ids.a[a]))
            if lp is not None:
                log_a[a] = lp
    return log_a


def prefix_heads(
    plan: ScoringPlan, results: Sequence[TokenLogprobs], ids: TokenIds
) -> dict[tuple[int, int], float]:
    """log P(a, b) of every planned prefix: known ones as given, the others from the a and b
    answers (-inf where the engine did not return a token)."""
    log_a = first_token_logprobs(plan, results, ids)
    log_b: dict[tuple[int, int], float] = dict.fromkeys(plan.single_b, 0.0)
    for index, a, values in plan.b_slots:
        for b in values:
            lp = results[index].get(int(ids.b[b]))
            if lp is not None:
                log_b[(a, b)] = lp
    return {
        (p.a, p.b): p.head
        if p.head is not None
        else log_a.get(p.a, -math.inf)
        + (p.tail if p.tail is not None else log_b.get((p.a, p.b), -math.inf))
        for p in plan.prefixes
    }


def combine(plan: ScoringPlan, results: Sequence[TokenLogprobs], ids: TokenIds) -> list[ScoredCode]:
    """Every scored candidate item with its decoder log-prob and offline score, in plan order."""
    heads = prefix_heads(plan, results, ids)
    scored: list[ScoredCode] = []
    for p in plan.prefixes:
        key = (p.a, p.b)
        c_scores: Mapping[int, float]
        if key in plan.single_c:
            c_scores = {plan.single_c[key]: 0.0}
        elif key in plan.known_c:
            c_scores = plan.known_c[key]
        else:
            c_scores = {
                ids.index_of[t]: lp
                for t, lp in results[plan.c_slots[key]].items()
                if t in ids.index_of
            }
        for c, lp_c in c_scores.items():
            scored.append(ScoredCode((p.a, p.b, c), heads[key] + lp_c, p.offline))
    return scored
