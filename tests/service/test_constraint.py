from __future__ import annotations

from service.contracts.constraint import Constraint
from tests.helpers import tiny_catalog


def test_no_exclusions_is_the_catalog_trie() -> None:
    cat = tiny_catalog()
    con = Constraint(cat)
    assert con.a_values().tolist() == [0, 1]
    assert con.b_values(0).tolist() == [0, 1]
    assert con.c_values(1, 0).tolist() == [0, 2]
    assert con.c_values(3, 3).tolist() == []


def test_excluding_every_item_of_a_prefix_removes_it_and_empty_parents() -> None:
    cat = tiny_catalog()
    con = Constraint(cat, [(0, 1, 0), (1, 0, 0), (1, 0, 2)])
    assert not con.has_prefix(0, 1)
    assert con.b_values(0).tolist() == [0]
    assert con.a_values().tolist() == [0]
    assert con.allows((0, 0, 1))
    assert not con.allows((1, 0, 2))
    assert not con.allows((2, 0, 0))  # not in the catalog at all


def test_partial_exclusion_keeps_the_prefix() -> None:
    con = Constraint(tiny_catalog(), [(0, 0, 0)])
    assert con.has_prefix(0, 0)
    assert con.c_values(0, 0).tolist() == [1]


def test_catalog_lookups() -> None:
    cat = tiny_catalog()
    assert cat.code_of("i4") == (1, 0, 2)
    assert cat.item_at((0, 1, 0)) == "i2"
    assert cat.item_at((3, 3, 3)) is None
    assert cat.rows_by_popularity.tolist() == [0, 4, 2, 3, 1]
