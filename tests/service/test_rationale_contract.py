"""The rationale contract: an answer's own rationale is the probability its ranked items put
on each category; stored rationales round-trip, and values written before ``basis`` existed
still read."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from service.contracts.catalog import Catalog
from service.contracts.manifest import CatalogManifest
from service.contracts.rationale import (
    Categories,
    Rationale,
    RationaleError,
    answer_rationales,
    pack_rationales,
    unpack_rationales,
)

CATEGORIES = Categories.from_paths([("Nails",), ("Hair",), ("Nails",), ("Skin",), ()])
CATEGORY_OF = CATEGORIES.of_items(["a", "b", "c", "d", "e"])


def test_the_answers_probability_is_summed_by_category() -> None:
    ranked = [
        ("a", math.log(0.4)),
        ("b", math.log(0.3)),
        ("c", math.log(0.2)),
        ("e", math.log(0.1)),
    ]
    found = answer_rationales(ranked, CATEGORIES, CATEGORY_OF, history=["c", "x", "b", "a"])
    nails, hair = CATEGORIES.paths.index(("Nails",)), CATEGORIES.paths.index(("Hair",))
    assert [r.category for r in found] == [nails, hair]  # "e" has no category: not shown
    assert math.exp(found[0].logprob) == pytest.approx(0.6)
    assert math.exp(found[1].logprob) == pytest.approx(0.3)
    assert found[0].evidence == ("a", "c")  # its history items, newest first
    assert found[1].evidence == ("b",)
    assert {r.basis for r in found} == {"answer"}


def test_scores_are_normalised_as_log_scores_and_the_top_three_kept() -> None:
    shifted = [("a", 10.0), ("b", 10.0), ("d", 10.0 + math.log(2.0))]
    found = answer_rationales(shifted, CATEGORIES, CATEGORY_OF, history=[])
    assert [round(math.exp(r.logprob), 6) for r in found] == [0.5, 0.25, 0.25]
    many = Categories.from_paths([(f"c{i}",) for i in range(6)])
    ids = [f"i{i}" for i in range(6)]
    top = answer_rationales(
        [(i, -float(n)) for n, i in enumerate(ids)], many, many.of_items(ids), []
    )
    assert len(top) == 3 and top[0].category == many.of_items(ids)["i0"]


def test_nothing_to_explain_gives_no_rationale() -> None:
    assert answer_rationales([], CATEGORIES, CATEGORY_OF, ["a"]) == ()
    assert answer_rationales([("e", 0.0), ("zz", -1.0)], CATEGORIES, CATEGORY_OF, []) == ()
    assert answer_rationales([("a", -math.inf)], CATEGORIES, CATEGORY_OF, []) == ()


def test_stored_rationales_round_trip_and_old_values_read_as_stated() -> None:
    both = (Rationale(0, -0.5, ("a",)), Rationale(1, -1.25, (), "answer"))
    assert unpack_rationales(pack_rationales(both)) == both
    written_before_basis = msgpack.packb([[2, -0.1, ["x", "y"]]], use_bin_type=True)
    assert unpack_rationales(written_before_basis) == (Rationale(2, -0.1, ("x", "y"), "stated"),)


@pytest.mark.parametrize(
    "body",
    [[[0, -0.1, ["a"], 7]], [[0, -0.1, "a"]], [[0]], [["x", -0.1, []]], "not a list of lists"],
)
def test_damaged_rationales_are_an_error_not_a_crash(body: object) -> None:
    with pytest.raises(RationaleError):
        unpack_rationales(msgpack.packb(body, use_bin_type=True))


def catalog_with_categories(categories: Categories | None = CATEGORIES) -> Catalog:
    manifest = CatalogManifest(
        catalog_version="v", codebook_size=4, num_items=5, embedding_model="t"
    )
    codes = np.array([(0, 0, i) for i in range(5)], np.int32)
    return Catalog(manifest, ["a", "b", "c", "d", "e"], codes, np.ones(5), categories)


def test_category_of_items_skips_rows_without_one() -> None:
    assert CATEGORY_OF == {"a": 0, "b": 1, "c": 0, "d": 2}
    # the catalog keeps the same map, built once; a catalog without categories has none
    assert catalog_with_categories().category_of == CATEGORY_OF
    assert catalog_with_categories(None).category_of == {}


def test_the_history_mix_moves_the_rationale_toward_the_users_recent_categories() -> None:
    from service.contracts.rationale import RationaleSettings, history_shares

    nails, hair = CATEGORIES.paths.index(("Nails",)), CATEGORIES.paths.index(("Hair",))
    skin = CATEGORIES.paths.index(("Skin",))
    ranked = [("a", math.log(0.6)), ("b", math.log(0.4))]  # the answer: Nails 60%, Hair 40%
    history = ["d", "d", "b", "b"]  # oldest first: Skin, Skin, then Hair twice
    alone = answer_rationales(ranked, CATEGORIES, CATEGORY_OF, history)
    assert [r.category for r in alone] == [nails, hair]
    # equal weights: Hair 0.5 * 0.4 + 0.5 * 0.5; Nails 0.3; Skin 0.25 (the history's half)
    mixed = answer_rationales(
        ranked, CATEGORIES, CATEGORY_OF, history, settings=RationaleSettings(history_weight=0.5)
    )
    assert [r.category for r in mixed] == [hair, nails, skin]
    assert math.exp(mixed[0].logprob) == pytest.approx(0.45)
    assert mixed[2].evidence == ("d",) and mixed[0].evidence == ("b",)
    # the newest items weigh more with a decay: Hair's share of this history grows
    assert history_shares([skin, skin, hair, hair], 1.0)[hair] == pytest.approx(0.5)
    assert history_shares([skin, skin, hair, hair], 0.5)[hair] == pytest.approx(1.5 / 1.875)
    assert history_shares([-1, -1], 0.8) == {}
    # a high temperature flattens the answer: with the answer alone, shares approach 1 / n
    flat = answer_rationales(
        ranked, CATEGORIES, CATEGORY_OF, [], settings=RationaleSettings(temperature=100.0)
    )
    assert math.exp(flat[0].logprob) == pytest.approx(0.5, abs=0.01)


def test_the_mix_is_learned_on_the_users_next_categories() -> None:
    from offline.eval.tune_rationale import Answered, tune_rationale

    catalog = catalog_with_categories()
    nails, hair = CATEGORIES.paths.index(("Nails",)), CATEGORIES.paths.index(("Hair",))
    ranked = [("a", 0.0), ("b", -0.5)]  # the answer leans to Nails
    # users whose next item is in the category their history keeps to (Hair), against the
    # answer's lean: a history weight wins, and the answer alone is recorded beside it
    hair_users = [Answered(ranked, ["a", "b"], ["b", "b", "a"], "b") for _ in range(4)]
    best, record = tune_rationale(hair_users, CATEGORIES, catalog)
    assert best.history_weight > 0
    assert record["best"]["accuracy: rationale top-1"] == 1.0
    assert record["answer_alone"]["accuracy: rationale top-1"] == 0.0
    shown = answer_rationales(ranked, CATEGORIES, CATEGORY_OF, ["b", "b", "a"], settings=best)
    assert shown[0].category == hair
    # users whose next item is where the answer leans: the answer alone (ties: least history)
    nails_users = [Answered(ranked, ["a", "b"], ["b", "b", "a"], "c") for _ in range(4)]
    best, record = tune_rationale(nails_users, CATEGORIES, catalog)
    assert best.history_weight == 0.0
    assert record["best"]["accuracy: rationale top-1"] == 1.0
    assert (
        answer_rationales(ranked, CATEGORIES, CATEGORY_OF, [], settings=best)[0].category == nails
    )
