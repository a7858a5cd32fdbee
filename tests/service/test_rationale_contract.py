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


def test_category_of_items_skips_rows_without_one() -> None:
    assert CATEGORY_OF == {"a": 0, "b": 1, "c": 0, "d": 2}
    # the catalog keeps the same map, built once; a catalog without categories has none
    manifest = CatalogManifest(
        catalog_version="v", codebook_size=4, num_items=5, embedding_model="t"
    )
    codes = np.array([(0, 0, i) for i in range(5)], np.int32)
    ids = ["a", "b", "c", "d", "e"]
    assert Catalog(manifest, ids, codes, np.ones(5), CATEGORIES).category_of == CATEGORY_OF
    assert Catalog(manifest, ids, codes, np.ones(5)).category_of == {}
