from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from offline.catalog.build import CatalogSpec, build_catalog
from offline.catalog.words import KEYWORDS_FILE, Keywords
from offline.cli import app
from offline.errors import InputError
from service.contracts.catalog import CODES_FILE, POPULARITY_FILE, REPORT_FILE, TRIE_FILE, Catalog
from service.contracts.manifest import MANIFEST_FILE, CatalogManifest
from service.contracts.rationale import CATEGORIES_FILE, Categories

K = 4  # 4^3 = 64 codes
N = 60
WORDS = ["lipstick", "shampoo", "nail polish", "mascara", "serum", "perfume", "brush", "soap"]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def item_rows(n: int = N) -> list[list[str]]:
    return [
        [f"i{i}", f"{WORDS[i % len(WORDS)]} no. {i}", f"Beauty > {WORDS[i % 3]}"] for i in range(n)
    ]


@pytest.fixture
def items_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "items.csv", ["item_id", "title", "categories"], item_rows())


@pytest.fixture
def vectors_npy(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    x = centers[np.arange(N) % 5] + 0.3 * rng.normal(size=(N, 16))
    np.save(tmp_path / "vectors.npy", x.astype(np.float32))
    return tmp_path / "vectors.npy"


@pytest.fixture
def interactions_csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    rows = []
    for u in range(40):
        for t, i in enumerate(rng.choice(N, size=6, replace=False).tolist()):
            rows.append([f"u{u}", f"i{i}", str(t)])
    rows.append(["u0", "not-in-catalog", "99"])  # the user's last item: held out with -2
    rows.append(["u1", "also-unknown", "-1"])  # the user's first item: used
    return write_csv(tmp_path / "interactions.csv", ["user_id", "item_id", "timestamp"], rows)


def leftovers(parent: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}")))


def test_build_with_supplied_vectors(tmp_path: Path, items_csv: Path, vectors_npy: Path) -> None:
    out = tmp_path / "out"
    report = build_catalog(
        items_csv, out, CatalogSpec(codebook_size=K, iters=5), embeddings=vectors_npy
    )
    assert leftovers(tmp_path) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            CODES_FILE,
            TRIE_FILE,
            POPULARITY_FILE,
            MANIFEST_FILE,
            REPORT_FILE,
            CATEGORIES_FILE,
            KEYWORDS_FILE,
        ]
    )
    # the catalog's words: "Beauty > x" shares its root, so a category is x alone
    categories = Categories.load_optional(out, N)
    assert categories is not None and report["categories"] == 3
    assert sorted(categories.paths) == [("lipstick",), ("nail polish",), ("shampoo",)]
    assert categories.text(int(categories.of_row[1])) == "shampoo"
    keywords = Keywords.load_optional(out)
    assert keywords is not None and report["keywords"] == len(keywords.vocab) == 9
    assert "no" not in keywords.vocab  # two letters: not a word that names anything
    assert keywords.of_row[2] == ("nail", "polish")
    assert report["items"] == N
    assert report["collisions_after"] == 0
    assert report["moved"] + report["spilled"] == report["collisions_before"]
    assert set(report["levels"]) == {"a", "b", "c"}
    for level in report["levels"].values():
        assert 0 < level["utilisation"] <= 1
        assert level["max_cluster_size"] >= level["mean_cluster_size"] > 0
    assert report["levels"]["a"]["max_cluster_size"] <= -(-N // K)  # balanced first level
    assert 0 <= report["single_item_prefix_share"] <= 1
    assert report["prefixes"] <= K * K
    assert report["unknown_item_interactions"] == 0
    assert set(report["seconds"]) >= {"embed", "cf", "quantize", "write", "total"}
    assert json.loads((out / REPORT_FILE).read_text()) == report

    manifest = CatalogManifest.load(out)
    assert manifest.num_items == N and manifest.codebook_size == K
    assert manifest.embedding_model == "user-vectors:vectors.npy"
    assert manifest.catalog_version == report["catalog_version"]
    assert manifest.parameters["seed"] == 0
    assert manifest.parameters["inputs"]["items"]["sha256"]
    assert manifest.parameters["inputs"]["interactions"] is None
    # what the codes depend on beyond inputs and settings, to explain a rebuild that differs
    environment = manifest.parameters["environment"]
    assert environment["numpy"] == np.__version__
    assert environment["torch"] == torch.__version__
    assert isinstance(environment["cpu_native_bf16"], bool)

    catalog = Catalog.load(out)
    assert catalog.version == manifest.catalog_version
    assert catalog.item_ids == [f"i{i}" for i in range(N)]  # input order
    codes = {catalog.code_of(f"i{i}") for i in range(N)}
    assert len(codes) == N  # unique
    for i in range(N):
        a, b, c = catalog.code_of(f"i{i}")  # type: ignore[misc]
        assert all(0 <= t < K for t in (a, b, c))
        assert catalog.item_at((a, b, c)) == f"i{i}"
        assert b in catalog.valid_b(a).tolist()
        assert c in catalog.valid_c(a, b).tolist()
        assert catalog.tokens(f"i{i}") == [
            "<|sid_begin|>",
            f"<s_a_{a}>",
            f"<s_b_{b}>",
            f"<s_c_{c}>",
            "<|sid_end|>",
        ]
    assert (catalog.popularity == 0).all()


def test_same_inputs_same_version_and_rebuild_replaces(
    tmp_path: Path, items_csv: Path, vectors_npy: Path
) -> None:
    r1 = build_catalog(
        items_csv, tmp_path / "out", CatalogSpec(codebook_size=K), embeddings=vectors_npy
    )
    r2 = build_catalog(
        items_csv, tmp_path / "out2", CatalogSpec(codebook_size=K), embeddings=vectors_npy
    )
    assert r1["catalog_version"] == r2["catalog_version"]
    r3 = build_catalog(
        items_csv, tmp_path / "out", CatalogSpec(codebook_size=8), embeddings=vectors_npy
    )
    assert Catalog.load(tmp_path / "out").version == r3["catalog_version"] != r1["catalog_version"]
    assert leftovers(tmp_path) == ["out", "out2"]


def test_interactions_give_cf_popularity_and_unknown_counts(
    tmp_path: Path, items_csv: Path, vectors_npy: Path, interactions_csv: Path
) -> None:
    out = tmp_path / "out"
    report = build_catalog(
        items_csv,
        out,
        CatalogSpec(codebook_size=K, cf_dim=8, holdout_last=2),
        embeddings=vectors_npy,
        interactions=interactions_csv,
    )
    assert report["unknown_item_interactions"] == 2
    assert report["unknown_items"] == 2
    assert report["interactions_used"] == 40 * 6 - 2 * 40 + 1  # u0's last two: 1 known, 1 not
    catalog = Catalog.load(out)
    assert catalog.popularity.sum() == report["interactions_used"]
    assert catalog.manifest.embedding_model == "user-vectors:vectors.npy+seq8"
    assert catalog.manifest.parameters["holdout_last"] == 2
    assert report["vector_dim"] == 16 + 8
    assert len({catalog.code_at(r) for r in range(N)}) == N


def test_refuses_to_replace_a_directory_that_is_not_a_catalog(
    tmp_path: Path, items_csv: Path, vectors_npy: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a catalog"):
        build_catalog(items_csv, out, CatalogSpec(codebook_size=K), embeddings=vectors_npy)
    assert (out / "precious.txt").read_text() == "keep me"


def test_failed_write_keeps_the_previous_catalog_and_no_temp_dir(
    tmp_path: Path, items_csv: Path, vectors_npy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import offline.catalog.build as build_mod
    from offline import fsutil

    out = tmp_path / "out"
    first = build_catalog(items_csv, out, CatalogSpec(codebook_size=K), embeddings=vectors_npy)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(build_mod, "build_trie", broken)
    with pytest.raises(OSError, match="disk full"):
        build_catalog(items_csv, out, CatalogSpec(codebook_size=8), embeddings=vectors_npy)
    monkeypatch.undo()
    real_rename = fsutil.os.rename

    def rename_fails_for_new(src: object, dst: object) -> None:
        if Path(str(src)).name.startswith(".out.tmp-"):
            raise OSError("rename failed")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(fsutil.os, "rename", rename_fails_for_new)
    with pytest.raises(OSError, match="rename failed"):
        build_catalog(items_csv, out, CatalogSpec(codebook_size=8), embeddings=vectors_npy)
    monkeypatch.undo()
    assert Catalog.load(out).version == first["catalog_version"]
    assert leftovers(tmp_path) == ["out"]


CF_OPTIONS = {
    # transitions is the default kind
    "transitions": ({}, "+seq4", {"cf_kind": "transitions", "cf_weight": 1.0}),
    "idf-weighted user-item": (
        {"cf_kind": "user-item", "cf_idf": True, "cf_weight": 0.5},
        "+cf4",
        {"cf_kind": "user-item", "cf_idf": True, "cf_weight": 0.5},
    ),
}


@pytest.mark.parametrize("case", sorted(CF_OPTIONS))
def test_cf_options_are_built_and_recorded(
    tmp_path: Path, items_csv: Path, vectors_npy: Path, interactions_csv: Path, case: str
) -> None:
    options, suffix, recorded = CF_OPTIONS[case]
    report = build_catalog(
        items_csv,
        tmp_path / "out",
        CatalogSpec(codebook_size=K, cf_dim=4, **options),
        embeddings=vectors_npy,
        interactions=interactions_csv,
    )
    assert report["embedding_model"].endswith(suffix) and report["collisions_after"] == 0
    params = CatalogManifest.load(tmp_path / "out").parameters
    assert {key: params[key] for key in recorded} == recorded


BAD_SPEC = {
    "kind": ({"cf_kind": "bought-together"}, r"cf_kind\n.*'transitions' or 'user-item'"),
    "dim": ({"cf_dim": 0}, r"cf_dim\n.*greater than or equal to 1"),
    "idf without user-item": ({"cf_idf": True}, "use it with cf_kind user-item, not transitions"),
    "negative weight": ({"cf_weight": -1.0}, r"cf_weight\n.*greater than or equal to 0"),
    "nan weight": ({"cf_weight": float("nan")}, r"cf_weight\n.*finite number"),
    "codebook": ({"codebook_size": 1}, r"codebook_size\n.*greater than or equal to 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPEC))
def test_bad_build_settings_are_refused_with_the_field(case: str) -> None:
    options, message = BAD_SPEC[case]
    with pytest.raises(ValidationError, match=message):
        CatalogSpec(**options)


BAD_ITEMS = {
    "missing column": (b"item_id,name\n1,a\n", r"items\.csv:1: missing column\(s\) title"),
    "duplicate id": (
        b"item_id,title\n1,a\n2,b\n1,c\n",
        r"items\.csv:4: duplicate item_id '1' \(first on line 2\)",
    ),
    "empty text": (
        b"item_id,title,categories\n1,a,x\n2, ,\n",
        r"items\.csv:3: item '2' has no text",
    ),
    "undecodable": (b"item_id,title\n1,a\n2,caf\xe9\n", r"items\.csv:3: undecodable bytes"),
    "wrong field count": (b"item_id,title\n1,a\n2,b,extra\n", r"items\.csv:3: wrong number of"),
    "no rows": (b"item_id,title\n", r"items\.csv: no items"),
}


@pytest.mark.parametrize("case", sorted(BAD_ITEMS))
def test_bad_items_file(tmp_path: Path, case: str) -> None:
    content, message = BAD_ITEMS[case]
    items = tmp_path / "items.csv"
    items.write_bytes(content)
    with pytest.raises(InputError, match=message):
        build_catalog(items, tmp_path / "out", CatalogSpec(codebook_size=K), show_progress=False)
    assert leftovers(tmp_path) == []


def test_codebook_too_small(tmp_path: Path, items_csv: Path, vectors_npy: Path) -> None:
    with pytest.raises(InputError, match=r"items\.csv: 60 items do not fit .*\(3\^3 = 27 codes\)"):
        build_catalog(
            items_csv, tmp_path / "out", CatalogSpec(codebook_size=3), embeddings=vectors_npy
        )
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((N - 1, 4), np.float32), rf"bad\.npy: {N - 1} rows but the items file has {N}"),
        (np.zeros(N, np.float32), r"bad\.npy: expected a 2-D array"),
        (np.zeros((N, 4), np.int64), r"bad\.npy: expected float vectors"),
        (np.full((N, 4), np.nan, np.float32), rf"bad\.npy: {N} rows contain NaN or inf"),
    ],
)
def test_bad_vectors(tmp_path: Path, items_csv: Path, array: np.ndarray, message: str) -> None:
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(InputError, match=message):
        build_catalog(
            items_csv,
            tmp_path / "out",
            CatalogSpec(codebook_size=K),
            embeddings=tmp_path / "bad.npy",
        )
    assert leftovers(tmp_path) == []


def test_malformed_interactions(tmp_path: Path, items_csv: Path, vectors_npy: Path) -> None:
    bad = tmp_path / "inter.csv"
    bad.write_text("user_id,item_id,timestamp\nu1,i1,0\nu1,i2,soon\n")
    with pytest.raises(InputError, match=r"inter\.csv:3: timestamp 'soon' is not a number"):
        build_catalog(
            items_csv,
            tmp_path / "out",
            CatalogSpec(codebook_size=K),
            embeddings=vectors_npy,
            interactions=bad,
        )
    assert leftovers(tmp_path) == []


def test_cli_build_and_errors(tmp_path: Path, items_csv: Path, vectors_npy: Path) -> None:
    runner = CliRunner()
    args = ["catalog", "build", "--items", str(items_csv), "--embeddings", str(vectors_npy)]
    ok = runner.invoke(app, [*args, "--out", str(tmp_path / "out"), "--codebook-size", "4"])
    assert ok.exit_code == 0, ok.output
    assert "items 60" in ok.stdout and "after 0" in ok.stdout
    assert Catalog.load(tmp_path / "out").codebook_size == 4

    small = runner.invoke(app, [*args, "--out", str(tmp_path / "o2"), "--codebook-size", "3"])
    assert small.exit_code == 2
    assert small.stderr.startswith("error: ") and "60 items do not fit" in small.stderr
    assert "Traceback" not in small.output

    dup = write_csv(tmp_path / "dup.csv", ["item_id", "title"], [["1", "a"], ["1", "b"]])
    bad = runner.invoke(
        app, ["catalog", "build", "--items", str(dup), "--out", str(tmp_path / "o3")]
    )
    assert bad.exit_code == 2
    assert "dup.csv:3: duplicate item_id '1' (first on line 2)" in bad.stderr
    assert leftovers(tmp_path, "o") == ["out"]


@pytest.mark.slow
def test_minilm_embeddings_end_to_end(tmp_path: Path) -> None:
    from offline.catalog.embed import embed_texts

    rows = item_rows(50)
    texts = [f"{title} | {cat}" for _, title, cat in rows]
    x = embed_texts(texts, batch_size=16, show_progress=False, precision="float32")
    assert x.shape == (50, 384) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-4)
    sims = x @ x.T
    # Same product word ("lipstick no. 0" vs "lipstick no. 8") is nearer than another word.
    assert sims[0, 8] > sims[0, 1]

    items = write_csv(tmp_path / "items.csv", ["item_id", "title", "categories"], rows)
    report = build_catalog(
        items, tmp_path / "out", CatalogSpec(codebook_size=K), show_progress=False
    )
    assert report["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert report["vector_dim"] == 384
    assert len(Catalog.load(tmp_path / "out")) == 50
