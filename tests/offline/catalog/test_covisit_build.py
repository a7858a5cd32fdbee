"""The co-visitation table built offline matches the afternoon baseline's counts."""

from __future__ import annotations

import numpy as np
import pytest

from offline.catalog.covisit import build_covisit
from offline.data import Example, Sequences
from offline.eval.baselines import CoVisitation, covisit_table_ranking
from service.contracts.catalog import Catalog
from service.contracts.covisit import CovisitError, CovisitTable, covisit_scores, top_scored
from service.contracts.manifest import CatalogManifest


def catalog(n: int = 8) -> Catalog:
    codes = np.array([(i // 4, i % 4, 0) for i in range(n)], dtype=np.int32)
    manifest = CatalogManifest(
        catalog_version="cv", codebook_size=4, num_items=n, embedding_model="test"
    )
    return Catalog(manifest, [f"i{i}" for i in range(n)], codes, np.ones(n))


SEQS = Sequences(
    ["u1", "u2", "u3", "u4"],
    [
        ["i0", "i1", "i2", "i3"],
        ["i1", "i2", "i5", "i6", "i7"],
        ["i0", "i2", "i2", "i1", "unknown", "i4"],
        ["i3", "i1", "i2", "i6"],
    ],
)


def test_table_counts_successors_and_half_weighted_predecessors() -> None:
    cat = catalog()
    table = build_covisit(cat, SEQS, top_n=50, window=1, predecessor_weight=0.5)
    lookup = table.as_mapping()
    # i1 -> i2 three times; i2 -> i1 once (half weight); i1 is never its own neighbour
    n1 = dict(zip(lookup["i1"].item_ids, lookup["i1"].scores, strict=True))
    assert n1["i2"] == pytest.approx(3.0 + 0.5 * 1.0)
    assert "i1" not in n1
    # same ranking as the baseline on every user's history
    baseline = CoVisitation(SEQS)
    for seq in SEQS.items:
        history = [i for i in seq[:2] if i != "unknown"]
        ours = covisit_scores(history, lookup, set(history))
        assert set(top_scored(ours, 3)) <= set(baseline.recommend(history, 8))


def test_items_further_apart_count_less_and_beyond_the_window_not_at_all() -> None:
    seqs = Sequences(["u"], [["i0", "i1", "i2", "i3"]])
    lookup = build_covisit(
        catalog(), seqs, top_n=50, window=2, distance_decay=0.5, predecessor_weight=0.5
    ).as_mapping()
    n0 = dict(zip(lookup["i0"].item_ids, lookup["i0"].scores, strict=True))
    assert n0 == {"i1": 1.0, "i2": 0.5}  # i3 is 3 steps on: outside the window
    n3 = dict(zip(lookup["i3"].item_ids, lookup["i3"].scores, strict=True))
    assert n3 == {"i2": 0.5, "i1": 0.25}  # predecessors at half weight, decayed the same
    # the defaults count further than direct successors
    wide = build_covisit(catalog(), seqs, top_n=50).as_mapping()
    assert "i3" in wide["i0"].item_ids
    with pytest.raises(ValueError, match="window"):
        build_covisit(catalog(), seqs, window=0)


def test_top_n_truncates_holdout_drops_the_last_items_and_versions_differ() -> None:
    cat = catalog()
    full = build_covisit(cat, SEQS, top_n=50)
    one = build_covisit(cat, SEQS, top_n=1)
    assert all(len(v.item_ids) <= 1 for v in one.as_mapping().values())
    held = build_covisit(cat, SEQS, top_n=50, holdout_last=2)
    assert held.parameters["pairs"] < full.parameters["pairs"]
    assert len({full.version, one.version, held.version}) == 3


def test_table_file_round_trip_refuses_another_catalog(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cat = catalog()
    table = build_covisit(cat, SEQS)
    table.save(tmp_path)
    loaded = CovisitTable.load(tmp_path, cat.item_ids, cat.version)
    assert loaded.version == table.version and loaded.as_mapping() == table.as_mapping()
    with pytest.raises(CovisitError, match="built for catalog cv"):
        CovisitTable.load(tmp_path, cat.item_ids, "other")


def test_the_tables_ranking_is_what_the_fallback_serves_topped_up_by_popularity() -> None:
    cat = catalog()
    lookup = build_covisit(cat, SEQS, top_n=50, window=1).as_mapping()
    history = ["i6", "i7"]
    ours = covisit_scores(history, lookup, set(history))
    best = top_scored(ours, 8)
    # the target is the table's best item: a hit at rank 1
    hit = covisit_table_ranking(cat, lookup, [Example("u", history, best[0])], 10)
    assert hit["recall@10"] == 1.0 and hit["ndcg@10"] == 1.0
    # an item the table never reaches is found among the popular fill, never in the history
    outside = next(i for i in cat.item_ids if i not in ours and i not in history)
    found = covisit_table_ranking(cat, lookup, [Example("u", history, outside)], 8)
    assert found["recall@10"] == 1.0 and found["ndcg@10"] < 1.0
    missing = covisit_table_ranking(cat, lookup, [Example("u", history, "i6")], 10)
    assert missing["recall@10"] == 0.0  # history items are never recommended
