"""The item-level model: it learns sequential structure, round-trips through its directory,
and the worker stores each user's best items, which the service then uses as candidates and as
a feature (real worker, real redis-server, fake decoder engine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis
from typer.testing import CliRunner

from offline.cli import app
from offline.data import leave_one_out, read_interactions
from offline.eval.baselines import popularity_baseline
from offline.items.config import ItemTrainConfig
from offline.items.train import train_item_model
from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
from service.contracts.affinity import Affinity
from service.contracts.catalog import Catalog
from service.contracts.fusion import FusionWeights
from service.contracts.item_index import ExactIndex
from service.contracts.item_model import ItemModel, ItemModelError
from service.contracts.model import ServingConfig
from service.contracts.snapshot import Keyspace, UserPrefixes
from service.core import RecommendQuery, Source
from service.runtime import open_runtime
from tests.fake_engine import FakeEngine, write_tiny_artifacts
from tests.helpers import synthetic_interactions
from tests.inproc import make_settings

N_ITEMS = 60


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(catalog, model with an item model in items/, interactions)."""
    root = tmp_path_factory.mktemp("items")
    catalog_dir, model_dir = write_tiny_artifacts(root, n_items=N_ITEMS)
    interactions = root / "interactions.csv"
    synthetic_interactions(interactions, N_ITEMS, 300)
    cfg = ItemTrainConfig(dim=16, negatives=20, epochs=12, patience=12, max_len=20)
    train_item_model(
        Catalog.load(catalog_dir), interactions, model_dir / "items", cfg, False, False
    )
    return catalog_dir, model_dir, interactions


def test_it_learns_the_walk_far_beyond_popularity(world: tuple[Path, Path, Path]) -> None:
    catalog_dir, model_dir, interactions = world
    catalog = Catalog.load(catalog_dir)
    model = ItemModel.load(model_dir / "items", catalog)
    best = model.members[0].manifest.training["best"]
    split = leave_one_out(read_interactions(interactions))
    popular_hits = popularity_baseline(split.train, split.valid, 10)["recall@10"]
    # users step 1-3 items ahead: the next item is one of three, popularity cannot know which
    assert best["recall@10"] > max(0.6, 2 * popular_hits), (best, popular_hits)
    assert model.members[0].manifest.best_epoch >= 1 and model.version


def test_only_the_runs_last_third_is_validated_and_the_best_epoch_is_among_it(
    world: tuple[Path, Path, Path],
) -> None:
    catalog_dir, model_dir, _ = world
    manifest = ItemModel.load(model_dir / "items", Catalog.load(catalog_dir)).members[0].manifest
    rows = manifest.training["epochs"]
    assert [row["epoch"] for row in rows] == list(range(1, 13))  # every epoch trained
    scored = [row for row in rows if "ndcg@10" in row]
    assert [row["epoch"] for row in scored] == [9, 10, 11, 12]  # 12 epochs, val_tail 1/3
    best = max(scored, key=lambda row: row["ndcg@10"])
    assert manifest.best_epoch == best["epoch"] and manifest.training["best"] == best


def test_a_run_cut_by_its_time_limit_validates_the_epoch_it_ends_on(
    world: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    catalog_dir, _, interactions = world
    cfg = ItemTrainConfig(dim=16, epochs=12, max_len=20, max_minutes=1e-6)
    manifest = train_item_model(
        Catalog.load(catalog_dir), interactions, tmp_path / "items", cfg, False, False
    )
    (row,) = manifest.training["epochs"]  # epoch 1 of 12, long before the validated tail
    assert row["epoch"] == 1 and "ndcg@10" in row
    assert manifest.best_epoch == 1 and manifest.training["best"] == row


def test_the_sampled_softmax_of_large_catalogs_learns_the_walk_too(
    world: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    catalog_dir, model_dir, interactions = world
    catalog = Catalog.load(catalog_dir)
    assert ItemModel.load(model_dir / "items", catalog).members[0].manifest.training["loss"] == (
        "full softmax"
    )
    cfg = ItemTrainConfig(
        dim=16,
        negatives=20,
        full_softmax_items=0,
        epochs=12,
        patience=12,
        max_len=20,
        dropout=0.2,  # (the tiny world's 300 users learn slowly under 0.5)
    )
    manifest = train_item_model(catalog, interactions, tmp_path / "items", cfg, False, False)
    assert manifest.training["loss"] == "sampled softmax, 20 negatives"
    assert manifest.training["best"]["recall@10"] > 0.6


def test_a_refit_trains_on_validation_too_for_exactly_its_epochs(
    world: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    catalog_dir, _, interactions = world
    out = tmp_path / "refit"
    result = CliRunner().invoke(
        app,
        [
            *("train-items", "--catalog", str(catalog_dir), "--interactions", str(interactions)),
            *("--out", str(out), "--refit", "--epochs", "3", "--dim", "16", "--no-progress"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "refit on train + validation" in result.output and "nan" not in result.output
    training = ItemModel.load(out, Catalog.load(catalog_dir)).members[0].manifest.training
    split = leave_one_out(read_interactions(interactions))
    assert training["refit"] is True
    assert training["train_sequences"] == sum(len(s) > 1 for s in split.train_and_valid.items)
    assert [row["epoch"] for row in training["epochs"]] == [1, 2, 3]  # no early stop
    assert not any("recall@10" in row for row in training["epochs"])  # validation is trained on


def test_top_items_exclude_the_history_and_rank_best_first(world: tuple[Path, Path, Path]) -> None:
    catalog_dir, model_dir, _ = world
    catalog = Catalog.load(catalog_dir)
    model = ItemModel.load(model_dir / "items", catalog)
    history = [catalog.code_of(str(i)) for i in (10, 12, 14)]
    (ranked,) = model.top_items(catalog, [history], 8, exclude_history=True)  # type: ignore[list-item]
    assert len(ranked) == 8
    assert not {code for code, _ in ranked} & set(history)
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True)
    after = {catalog.item_at(code) for code, _ in ranked[:3]}
    assert after & {"15", "16", "17"}  # what the walk does next


def test_a_users_vector_does_not_depend_on_the_rest_of_its_batch(
    world: tuple[Path, Path, Path],
) -> None:
    """The worker batches users of every length: a short history padded to a long one's width
    must score exactly as alone (padding is masked out of attention, not just zeroed)."""
    catalog_dir, model_dir, _ = world
    model = ItemModel.load(model_dir / "items", Catalog.load(catalog_dir))
    short, long = [3, 4, 5], list(range(1, 19))
    together = model.user_vectors([short, long])
    alone = np.concatenate([model.user_vectors([short]), model.user_vectors([long])])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    assert not np.allclose(together[0], together[1])


def test_a_model_for_another_catalog_is_refused(
    world: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, model_dir, _ = world
    other_catalog, _ = write_tiny_artifacts(tmp_path, n_items=N_ITEMS - 1)
    with pytest.raises(ItemModelError, match="retrain"):
        ItemModel.load(model_dir / "items", Catalog.load(other_catalog))
    with pytest.raises(ItemModelError, match="not an item model"):
        ItemModel.load(tmp_path, Catalog.load(other_catalog))


def test_exact_index_excludes_and_pads() -> None:
    vectors = np.eye(3, dtype=np.float32)
    rows, scores = ExactIndex(vectors).search(np.array([[3.0, 2.0, 1.0]]), 4, [[0]])
    assert rows.tolist() == [[1, 2, -1, -1]]
    assert scores[0, :2].tolist() == [2.0, 1.0] and np.isneginf(scores[0, 2:]).all()


def test_affinity_round_trips_and_fills_below_its_list() -> None:
    affinity = Affinity.of_items([((1, 2, 3), 5.0), ((1, 2, 0), 4.0), ((0, 1, 1), 1.5)])
    assert Affinity.unpack(affinity.pack()) == affinity
    assert affinity.of((1, 2, 0)) == 4.0 and affinity.of((3, 3, 3)) == 1.5  # the lowest stored
    assert affinity.prefixes(2) == [(1, 2)] and affinity.prefixes(3) == [(1, 2), (0, 1)]
    with pytest.raises(ValueError, match="whole"):
        Affinity.unpack(affinity.pack()[:-1])


async def test_the_worker_stores_best_items_and_the_service_ranks_with_them(
    world: tuple[Path, Path, Path], redis_url: str
) -> None:
    catalog_dir, model_dir, interactions = world
    # the item-level score dominates: the top k must be the stored list's best (fresh history
    # excluded), although none of those items needs to be under a snapshot prefix
    ServingConfig(
        weights=FusionWeights(affinity=1e4), covisit_candidates=0, affinity_candidates=10
    ).write(model_dir)
    job = ThinkAheadJob(prefixes=2, beam=2, answer_items=0, affinity_items=20, grace_s=0)
    run = ThinkAheadRun(model_dir, catalog_dir, interactions, redis_url, job)
    run.seed_histories(interactions)
    sid = run.run(FakeEngine, progress=False).snapshot_id
    client = redis.Redis.from_url(redis_url)
    value = UserPrefixes.decode(client.get(Keyspace().user(sid, "u7")))  # type: ignore[arg-type]
    affinity = Affinity.unpack(value.affinity)
    assert len(affinity.ranked) == 20
    catalog = Catalog.load(catalog_dir)
    history = run.plan.histories[run.plan.users.index("u7")]
    assert not {code for code, _ in affinity.ranked} & set(history)
    fresh = catalog.item_at(affinity.ranked[0][0])
    assert fresh is not None
    expected = [item for code, _ in affinity.ranked if (item := catalog.item_at(code)) != fresh][:5]
    engine = FakeEngine()
    async with open_runtime(make_settings(catalog_dir, model_dir, redis_url), engine) as rt:
        await rt.watcher.refresh()
        rec = await rt.core.recommend(RecommendQuery("u7", k=5, recent_item_ids=(fresh,)))
        assert rec.source is Source.THINK_AHEAD and rec.degraded_reason is None
        assert [i.item_id for i in rec.items] == expected
        # a damaged list is counted and ignored: the answer still comes, from the decoder
        damaged = UserPrefixes(**{**value.__dict__, "affinity": value.affinity[:-3]})
        client.set(Keyspace().user(sid, "u7"), damaged.encode(), keepttl=True)
        rec = await rt.core.recommend(RecommendQuery("u7", k=5, recent_item_ids=(fresh,)))
        assert rec.source is Source.THINK_AHEAD and len(rec.items) == 5
        assert rt.metrics.corrupt_values.labels("snapshot_affinity")._value.get() == 1  # type: ignore[attr-defined]


def test_eval_reports_the_item_level_model_alone(
    world: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from offline.eval.job import ITEM_MODEL_ROW, EvalJob, run_eval

    catalog_dir, model_dir, interactions = world
    job = EvalJob(split="valid", mode="items")
    report = run_eval(model_dir, catalog_dir, interactions, tmp_path / "items.json", job)
    row = report["rows"][ITEM_MODEL_ROW]
    assert row["recall@10"] > 0.6 and row["recall@5"] <= row["recall@10"]
    assert report["item_model"]["version"] and row["users"] == report["users"]
