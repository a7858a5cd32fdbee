from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest

from offline.catalog.items import read_items
from offline.data import Sequences, leave_one_out, read_interactions, withhold_last
from offline.errors import InputError
from offline.eval.baselines import CoVisitation
from offline.eval.metrics import ranking_metrics


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_sequences_follow_timestamps_not_file_order(tmp_path: Path) -> None:
    p = write(tmp_path / "i.csv", "user_id,item_id,timestamp\nu1,b,2\nu1,a,1\nu2,c,0\nu1,c,3\n")
    seqs = read_interactions(p)
    assert seqs.users == ["u1", "u2"]
    assert seqs.items == [["a", "b", "c"], ["c"]]


def test_gzipped_files_read_like_plain_ones(tmp_path: Path) -> None:
    text = "user_id,item_id,timestamp\nu1,b,2\nu1,a,1\nu2,c,0\n"
    plain = read_interactions(write(tmp_path / "i.csv", text))
    packed = read_interactions(write(tmp_path / "i.csv.gz", gzip.compress(text.encode())))
    assert (packed.users, packed.items) == (plain.users, plain.items)
    items = write(tmp_path / "items.csv.gz", gzip.compress(b"item_id,title\n1,Red lipstick\n"))
    assert read_items(items).texts == ["Red lipstick"]
    with pytest.raises(InputError, match="not a readable gzip file"):
        read_interactions(write(tmp_path / "truncated.csv.gz", gzip.compress(text.encode())[:20]))


def test_shipped_beauty_copy_is_what_its_readme_says() -> None:
    """data/beauty (the demo's data in a fresh clone): byte-for-byte the benchmark's CSVs."""
    data = Path(__file__).resolve().parents[2] / "data" / "beauty"
    readme = (data / "README.md").read_text()
    for name in ("items.csv.gz", "interactions.csv.gz"):
        digest = hashlib.sha256(gzip.decompress((data / name).read_bytes())).hexdigest()
        assert f"| `{name}` | `{digest}` |" in readme, name
    header = gzip.decompress((data / "interactions.csv.gz").read_bytes())[:40].decode()
    assert header.startswith("user_id,item_id,timestamp\n")


def test_leave_one_out_protocol() -> None:
    seqs = Sequences(["u", "short"], [[str(i) for i in range(60)], ["x", "y"]])
    split = leave_one_out(seqs, max_history=50)
    assert split.train.items[0] == [str(i) for i in range(58)]
    assert split.train.items[1] == ["x", "y"]  # too short to hold out anything
    (valid,) = split.valid
    (test,) = split.test
    assert valid.target == "58" and valid.history == [str(i) for i in range(8, 58)]
    assert test.target == "59" and test.history == [str(i) for i in range(9, 59)]


def test_withheld_last_items_make_validation_test_shaped() -> None:
    seqs = Sequences(["u", "v"], [list("abcde"), list("fghij")])
    split = leave_one_out(seqs)
    train = withhold_last(split.train, {"u"})
    assert train.items == [list("ab"), list("fgh")]  # u's "c" is withheld, v untouched
    valid_u = split.valid[0]
    # u's validation history ends in the withheld item, as a test history ends in the
    # validation item: never seen followed in training
    assert valid_u.history == list("abc") and valid_u.history[-1] not in train.items[0]
    assert split.test[0].history == list("abcd")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("user,item\nu,1\n", "missing column"),
        ("user_id,item_id,timestamp\nu,1,yesterday\n", ":2: timestamp"),
        ("user_id,item_id\nu,\n", ":2: empty"),
        ("user_id,item_id\n", "no interactions"),
        (b"user_id,item_id\nu,\xff\xfe\n", ":2: undecodable"),
    ],
)
def test_bad_interaction_files_name_file_and_line(tmp_path: Path, content, needle: str) -> None:  # type: ignore[no-untyped-def]
    p = write(tmp_path / "bad.csv", content)
    with pytest.raises(InputError, match=needle) as info:
        read_interactions(p)
    assert str(p) in str(info.value)


def test_ranking_metrics() -> None:
    m = ranking_metrics([["a", "b", "c"], ["x", "y"], ["q"]], ["b", "z", "q"], ks=(1, 5))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@5"] == pytest.approx(2 / 3)
    assert m["ndcg@5"] == pytest.approx((1 / 1.5849625 + 1.0) / 3, rel=1e-6)


def test_covisitation_prefers_recent_successors_and_skips_history() -> None:
    train = Sequences(["1", "2", "3"], [["a", "b", "c"], ["a", "b", "d"], ["x", "c", "e"]])
    model = CoVisitation(train)
    ranked = model.recommend(["q", "a", "b"], k=3)
    assert ranked[0] in {"c", "d"} and "a" not in ranked and "b" not in ranked
    assert len(ranked) == 3  # popular items fill the rest
