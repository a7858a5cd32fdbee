"""Learning the fused score's weights: the grid's arithmetic and the choice it records."""

from __future__ import annotations

from offline.eval.candidates import UserCandidates
from offline.eval.tune import CandidateMatrix, grid_search
from service.contracts.affinity import Affinity
from service.contracts.fusion import FusionWeights, ItemFeatures
from service.contracts.scoring import ScoredCode
from tests.helpers import tiny_catalog

# tiny catalog: i0 (0,0,0) i1 (0,0,1) i2 (0,1,0) i3 (1,0,0) i4 (1,0,2)


def user(target: str, covisit: dict[str, float] | None = None) -> UserCandidates:
    """``covisit``: the co-visitation scores of the history's neighbours (default: i4's)."""
    catalog = tiny_catalog()
    scored = [
        ScoredCode((0, 0, 0), -0.5, -0.5),
        ScoredCode((0, 0, 1), -0.9, -0.5),
        ScoredCode((0, 1, 0), -1.0, -0.7),
        ScoredCode((1, 0, 2), -4.0, -0.7),  # under a co-visitation prefix only
    ]
    return UserCandidates(
        target=target,
        scored=scored,
        features=ItemFeatures(catalog, {"i4": 50.0} if covisit is None else covisit),
        snapshot_ab={(0, 0), (0, 1)},
        covisit_ab=[(1, 0)],
    )


def test_matrix_ranks_like_the_fused_score() -> None:
    users = [user("i4"), user("i0")]
    matrix = CandidateMatrix(users)
    decoder_only = matrix.metrics(FusionWeights(), covisit_candidates=0, k=1)
    assert decoder_only.recall == 0.5  # i0 is first, i4 is not even a candidate
    with_covisit = matrix.metrics(FusionWeights(covisit=1.0), covisit_candidates=10, k=1)
    assert with_covisit.recall == 0.5  # now i4 is first: the other user's i0 is second
    both = matrix.metrics(FusionWeights(covisit=1.0), covisit_candidates=10, k=2)
    assert both.recall == 1.0
    for u in users:
        assert u.ranked(FusionWeights(covisit=1.0), 1, 10)[0] == (1, 0, 2)


def test_grid_picks_the_fewest_candidates_that_keep_the_best_ndcg() -> None:
    trials = grid_search([user("i4")] * 3, k=1)
    chosen = trials[0]
    assert chosen.recall == 1.0 and chosen.weights.covisit > 0
    assert chosen.covisit_candidates == 10  # 20 and 40 rank the same: more engine work


def test_item_level_scores_are_searched_when_users_carry_them() -> None:
    """The target sits under a prefix only the item-level list proposes: the grid must find
    the affinity weight and candidates that reach it, and count those candidates as cost."""
    catalog = tiny_catalog()
    scored = [
        ScoredCode((0, 0, 0), -0.5, -0.5),
        ScoredCode((0, 1, 0), -1.0, -0.7),
        ScoredCode((1, 0, 0), -3.0, -0.7),  # under an item-level prefix only
    ]
    affinity = Affinity.of_items([((1, 0, 0), 4.0), ((0, 1, 0), 1.0)])
    users = [
        UserCandidates("i3", scored, ItemFeatures(catalog, {}, affinity), {(0, 0), (0, 1)}, [])
    ] * 3
    matrix = CandidateMatrix(users)
    assert matrix.metrics(FusionWeights(affinity=4.0), 0, 0, k=1).recall == 0.0  # unreachable
    assert matrix.metrics(FusionWeights(affinity=4.0), 0, 10, k=1).recall == 1.0
    chosen = grid_search(users, k=1)[0]
    assert chosen.recall == 1.0 and chosen.weights.affinity > 0
    assert chosen.affinity_candidates == 10 and chosen.covisit_candidates == 0
    assert users[0].ranked(chosen.weights, 1, 0, 10)[0] == (1, 0, 0)


def test_the_fresh_event_path_prices_the_co_visitation_candidates() -> None:
    """Scored with its snapshot's own history, the target sits under a snapshot prefix and the
    grid needs no co-visitation candidate; one event past the snapshot it is reachable only
    through the event's neighbours, so judged on both paths the grid takes them, and reports
    each path's NDCG."""
    unchanged = [user("i0", covisit={})] * 3  # the snapshot's history: no fresh neighbours
    assert grid_search(unchanged, k=1)[0].covisit_candidates == 0
    trials = grid_search(unchanged, k=1, fresh=[user("i4")] * 3)
    chosen = trials[0]
    assert chosen.covisit_candidates == 10 and chosen.weights.covisit > 0
    assert chosen.recall == 1.0
    row = chosen.row()
    assert row["unchanged ndcg@10"] == 1.0 and row["one event behind ndcg@10"] == 1.0
    without = next(t for t in trials if t.covisit_candidates == 0 and t.weights == chosen.weights)
    assert dict((p, r) for p, r, _ in without.paths) == {"unchanged": 1.0, "one event behind": 0.0}
