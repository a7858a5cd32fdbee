"""A category reasoning model in the worker, in seconds: the real worker and redis-server, the
fake engine (a softmax over whatever each step allows). Every user is thought about in their G
likeliest categories: the stored rationales are real categories, best first, resting on the
user's own history, and the stored prefixes come from inside those categories only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import redis

from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
from offline.train.reasoning import ReasoningVocab
from service.contracts.catalog import Catalog
from service.contracts.manifest import ModelManifest, ReasoningTemplate
from service.contracts.rationale import (
    RATIONALES_KEPT,
    Categories,
    Rationale,
    evidence_for,
    pack_rationales,
    unpack_rationales,
)
from service.contracts.snapshot import Keyspace, UserPrefixes
from service.contracts.tokens import SPECIAL_TOKENS, all_item_tokens
from tests.fake_engine import FAKE_MODEL_VERSION, FakeEngine, write_tiny_artifacts

CATEGORIES = 6
G = 2


def reasoning_world(root: Path) -> tuple[Path, Path, Path]:
    catalog_dir, model_dir = write_tiny_artifacts(root)
    catalog = Catalog.load(catalog_dir)
    paths = [("Makeup", f"Shade {c}") for c in range(CATEGORIES)]
    Categories.from_paths([paths[r % CATEGORIES] for r in range(len(catalog))]).save(catalog_dir)
    categories = Categories.load_optional(catalog_dir, len(catalog))
    assert categories is not None
    tokens = [*SPECIAL_TOKENS, *all_item_tokens(4), *ReasoningVocab.tokens(categories, ())]
    vocab = {t: i for i, t in enumerate(tokens)}
    (model_dir / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    ModelManifest(
        model_version=FAKE_MODEL_VERSION,
        catalog_version=catalog.version,
        codebook_size=4,
        reasoning=ReasoningTemplate(kind="categories", paths=G, max_tokens=1),
    ).write(model_dir)
    inter = root / "interactions.csv"
    rng = np.random.default_rng(0)
    rows = [
        f"u{u},{i},{t}"
        for u in range(12)
        for t, i in enumerate(rng.choice(np.arange(1, 61), size=5, replace=False))
    ]
    inter.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    return catalog_dir, model_dir, inter


def test_the_worker_thinks_in_the_likeliest_categories(tmp_path: Path, redis_url: str) -> None:
    catalog_dir, model_dir, inter = reasoning_world(tmp_path)
    job = ThinkAheadJob(prefixes=6, beam=6, answer_items=0, grace_s=0)
    run = ThinkAheadRun(model_dir, catalog_dir, inter, redis_url, job)
    summary = run.run(FakeEngine, progress=False)
    assert summary.written == 12
    client = redis.Redis.from_url(redis_url)
    keys = Keyspace()
    sid = client.get(keys.current).decode()
    manifest = json.loads(client.get(keys.manifest(sid)))
    assert manifest["paths"] == G and "P(category)" in manifest["aggregation"]
    catalog = run.catalog
    categories = Categories.load_optional(catalog_dir, len(catalog))
    assert categories is not None

    def category(code: tuple[int, int, int]) -> int:
        return int(categories.of_row[catalog.row_by_code[code]])

    for user, history in zip(run.plan.users, run.plan.histories, strict=True):
        value = UserPrefixes.decode(client.get(keys.user(sid, user)))
        rationales = unpack_rationales(value.rationales)
        assert len(rationales) == RATIONALES_KEPT
        logprobs = [r.logprob for r in rationales]
        assert logprobs == sorted(logprobs, reverse=True) and logprobs[0] <= 0
        items = [catalog.item_at(c) for c in history]
        for r in rationales:
            assert 0 <= r.category < CATEGORIES
            assert set(r.evidence) <= set(items)
            assert all(category(catalog.code_of(i)) == r.category for i in r.evidence)
        # every stored prefix holds an unseen item of one of the G categories searched
        searched = {r.category for r in rationales[:G]}
        for p in value.prefixes:
            under = [catalog.code_at(int(row)) for row in catalog.rows_under_ab[(p.a, p.b)]]
            assert any(category(c) in searched and c not in history for c in under)
            assert p.score <= 1e-9  # a mixture of probabilities under 1


def test_rationales_round_trip_and_refuse_garbage() -> None:
    stored = (Rationale(3, -0.25, ("17", "4")), Rationale(0, -1.5))
    assert unpack_rationales(pack_rationales(stored)) == stored
    assert len(pack_rationales(stored)) < 40
    with pytest.raises(ValueError, match="do not decode"):
        unpack_rationales(b"\x93\x01")


def test_evidence_is_the_newest_history_items_of_the_category() -> None:
    history = ["a", "b", "c", "b", "d"]
    cats = [1, 2, 1, 2, 1]
    assert evidence_for(1, history, cats) == ("d", "c")
    assert evidence_for(2, history, cats) == ("b",)
    assert evidence_for(5, history, cats) == ()


def test_categories_load_checks_the_catalog_size(tmp_path: Path) -> None:
    Categories.from_paths([("A",), ("B",), ()]).save(tmp_path)
    loaded = Categories.load_optional(tmp_path, 3)
    assert loaded is not None and loaded.of_row.tolist() == [0, 1, -1]
    with pytest.raises(ValueError, match="does not match a catalog of 4 items"):
        Categories.load_optional(tmp_path, 4)
    assert Categories.load_optional(tmp_path / "none", 3) is None


def test_with_no_paths_the_rationale_is_stored_and_the_search_runs_plainly(
    tmp_path: Path, redis_url: str
) -> None:
    """G = 0: the worker states each user's rationale (one request) and searches the same
    prefixes as for a model without one."""
    catalog_dir, model_dir, inter = reasoning_world(tmp_path)
    client = redis.Redis.from_url(redis_url)
    keys = Keyspace()
    found = {}
    for paths in (0, None):
        job = ThinkAheadJob(prefixes=6, beam=6, answer_items=0, grace_s=0, paths=paths)
        run = ThinkAheadRun(model_dir, catalog_dir, inter, redis_url, job)
        if paths is None:  # the same model without its reasoning template
            run.reasoner = None
        run.run(FakeEngine, progress=False)
        sid = client.get(keys.current).decode()
        found[paths] = {
            u: UserPrefixes.decode(client.get(keys.user(sid, u))) for u in run.plan.users
        }
    for user, value in found[0].items():
        assert value.prefixes == found[None][user].prefixes
        assert len(unpack_rationales(value.rationales)) == RATIONALES_KEPT
        assert found[None][user].rationales == b""
