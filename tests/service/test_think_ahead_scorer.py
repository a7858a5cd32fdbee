"""The think-ahead scorer's own logic, in memory: when a history counts as unchanged, what a
damaged field does to a plan, and the no-engine re-rank of a stored answer after fresh events."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from service.contracts.affinity import Affinity
from service.contracts.answers import pack_answer
from service.contracts.catalog import Catalog
from service.contracts.fusion import FusionWeights
from service.contracts.manifest import CatalogManifest
from service.contracts.model import ServingConfig, load_serving_config
from service.contracts.snapshot import Prefix, UserPrefixes, history_digest
from service.contracts.think_ahead import (
    RerankSettings,
    ScoringSettings,
    ThinkAheadScorer,
    entry_history,
)
from service.contracts.tokens import TokenIds, all_item_tokens

# six items over K=4: i0 (0,0,0) i1 (0,0,1) i2 (0,1,0) i3 (1,0,0) i4 (1,0,2) i5 (2,1,1)
CODES = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 0, 2), (2, 1, 1)]


def catalog() -> Catalog:
    manifest = CatalogManifest(
        catalog_version="v", codebook_size=4, num_items=6, embedding_model="t"
    )
    return Catalog(manifest, [f"i{i}" for i in range(6)], np.array(CODES, np.int32), np.ones(6))


def scorer(**weights: float) -> ThinkAheadScorer:
    vocab = {t: i for i, t in enumerate(["<|sid_begin|>", "<|sid_end|>", *all_item_tokens(4)])}
    # the re-rank with the served weights and whole stored terms: the arithmetic stays legible
    rerank = RerankSettings(weights=None, stored=1.0)
    settings = ScoringSettings(
        weights=FusionWeights(**weights), covisit_candidates=5, rerank=rerank
    )
    return ThinkAheadScorer(catalog(), TokenIds.from_vocab(vocab, 4), settings)


def entry(history: list[tuple[int, int, int]], answer: list) -> UserPrefixes:  # type: ignore[type-arg]
    return UserPrefixes(
        "m", "v", 0.0, (Prefix(0, 0, -0.5), Prefix(1, 0, -1.0)),
        history_digest=history_digest(history), answer=pack_answer(answer),
    )  # fmt: skip


def test_unchanged_is_judged_by_the_entry_history_digest() -> None:
    s = scorer()
    old = [CODES[5]]
    value = entry(old, [])
    same = s.plan(value, old, {}, k=3)
    moved = s.plan(value, [*old, CODES[2]], {}, k=3)
    # unchanged: the snapshot's prefix scores are the heads, no a/b requests are planned
    assert all(p.head is not None for p in same.scoring.prefixes)
    assert all(p.head is None for p in moved.scoring.prefixes)
    assert entry_history(value, [*old, CODES[2]]) == old
    assert entry_history(value, [CODES[3], CODES[2]]) is None


def test_a_damaged_field_is_told_and_left_out() -> None:
    told: list[str] = []
    value = entry([CODES[5]], [])
    damaged = UserPrefixes(**{**value.__dict__, "affinity": b"\x01\x02\x03"})
    plan = scorer(affinity=1.0).plan(
        damaged, [CODES[5]], {}, 3, on_corrupt=lambda f, e: told.append(f)
    )
    assert told == ["snapshot_affinity"] and not plan.empty


def test_the_stored_answer_is_re_ranked_for_the_fresh_co_visitation() -> None:
    s = scorer(covisit=1.0)
    old = [CODES[5]]
    # stored under the old history: i0 first, lifted by its old co-visitation (score 2 + log 11)
    stale_cov = {"i0": 10.0}
    answer = [(CODES[0], -1.0 + math.log1p(10.0)), (CODES[1], -1.5), (CODES[2], -3.0)]
    value = entry(old, answer)
    fresh_history = [*old, CODES[2]]  # the user just took i2
    fresh_cov = {"i1": 20.0, "i3": 50.0}  # i3 was not in the stored answer
    ranked = s.rerank(value, fresh_history, fresh_cov, stale_cov)
    assert ranked is not None
    codes = [c for c, _ in ranked]
    assert CODES[2] not in codes  # the fresh event is history now
    assert codes == [CODES[1], CODES[3], CODES[0]]  # the fresh neighbours lead
    scores = dict(ranked)
    # i0 lost its stale bonus; i3 took the lowest stored decoder term (-3.0) plus its own
    assert abs(scores[CODES[0]] - (-1.0)) < 1e-5  # stored as float32
    assert abs(scores[CODES[3]] - (-3.0 + math.log1p(50.0))) < 1e-5
    assert s.rerank(entry(old, []), fresh_history, fresh_cov, stale_cov) is None


def test_the_fresh_item_level_scores_replace_the_stored_ones_and_add_candidates() -> None:
    """With the fresh history encoded (the service's item-level model), a stored item's stale
    item-level score is swapped for the fresh one, and the fresh history's best items join
    even when neither the stored answer nor the co-visitation had them."""
    base = scorer(affinity=1.0)
    old = [CODES[5]]
    stored_affinity = Affinity.of_items([(CODES[0], 4.0), (CODES[1], 1.0)])
    # the worker's fused scores: decoder -1 / -1.2 plus the stored item-level terms
    answer = [(CODES[0], -1.0 + 4.0), (CODES[1], -1.2 + 1.0)]
    value = UserPrefixes(**{**entry(old, answer).__dict__, "affinity": stored_affinity.pack()})
    fresh_history = [*old, CODES[2]]
    fresh = Affinity.of_items([(CODES[4], 6.0), (CODES[1], 5.0), (CODES[0], 0.5)])
    stale_only = base.rerank(value, fresh_history, {}, {})
    assert stale_only is not None
    assert [c for c, _ in stale_only] == [CODES[0], CODES[1]]  # nothing fresh is known
    ranked = base.rerank(value, fresh_history, {}, {}, fresh_affinity=fresh)
    assert ranked is not None
    scores = dict(ranked)
    assert [c for c, _ in ranked] == [CODES[4], CODES[1], CODES[0]]
    assert abs(scores[CODES[1]] - (-1.2 + 5.0)) < 1e-5  # its stored decoder term, fresh score
    assert abs(scores[CODES[4]] - (-1.2 + 6.0)) < 1e-5  # new: the lowest stored decoder term
    none_added = base.settings.model_copy(
        update={"rerank": RerankSettings(weights=None, stored=1.0, affinity_candidates=0)}
    )
    kept = ThinkAheadScorer(base.catalog, base.ids, none_added).rerank(
        value, fresh_history, {}, {}, fresh_affinity=fresh
    )
    assert kept is not None and CODES[4] not in dict(kept)
    # stored terms scaled to 0: the fresh item-level scores alone decide
    fresh_only = base.settings.model_copy(
        update={"rerank": RerankSettings(weights=None, stored=0.0)}
    )
    alone = ThinkAheadScorer(base.catalog, base.ids, fresh_only).rerank(
        value, fresh_history, {}, {}, fresh_affinity=fresh
    )
    assert alone is not None and [c for c, _ in alone] == [CODES[4], CODES[1], CODES[0]]
    assert abs(dict(alone)[CODES[0]] - 0.5) < 1e-5
    # the constraint still rules: an excluded fresh item never appears
    blocked = base.rerank(
        value, fresh_history, {}, {}, base.constraint(fresh_history, [CODES[4]]),
        fresh_affinity=fresh,
    )  # fmt: skip
    assert blocked is not None and CODES[4] not in dict(blocked)


def test_the_re_rank_settings_come_from_serving_json_and_never_key_stored_answers(
    tmp_path: Path,
) -> None:
    """tune-rerank records them in serving.json; they shape only the fresh-event answer, so a
    snapshot's stored answers stay servable whatever they are."""
    tuned = RerankSettings(weights=FusionWeights(covisit=1.0), stored=0.5, affinity_candidates=7)
    ServingConfig(weights=FusionWeights(covisit=2.0), rerank=tuned).write(tmp_path)
    settings = load_serving_config(tmp_path).scoring()
    assert settings.rerank == tuned
    assert ServingConfig(weights=FusionWeights(covisit=2.0)).scoring().rerank == RerankSettings()
    assert settings.key() == settings.model_copy(update={"rerank": RerankSettings()}).key()
