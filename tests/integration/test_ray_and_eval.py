"""The think-ahead job on Ray (local mode) and the eval command, on the tiny world."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from offline.eval.job import COVISIT_TABLE_ROW
from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
from service.contracts.model import ServingConfig
from service.contracts.snapshot import Keyspace, UserPrefixes
from tests.helpers import run_cli

pytestmark = pytest.mark.vllm
KEYS = Keyspace("ta")


@pytest.mark.ray
def test_ray_publishes_the_same_snapshot_as_in_process(tiny_world, redis_url, batch_engine):  # type: ignore[no-untyped-def]
    ray = pytest.importorskip("ray")
    from offline.thinkahead.ray_runner import run_on_ray

    job = ThinkAheadJob(prefixes=4, beam=4, shard_size=50, key_prefix="ray")
    run = ThinkAheadRun(
        tiny_world.model_dir, tiny_world.catalog_dir, tiny_world.interactions_csv, redis_url, job
    )
    # Ray 2.60 dropped local_mode: a real local Ray instance (2 worker processes, each actor
    # with its own in-process vLLM engine) runs the same code as a cluster would.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}},
    )
    try:
        summary = run_on_ray(run, workers=2, progress=False)
    finally:
        ray.shutdown()
    assert summary.written == len(run.plan.users) and summary.shards == len(run.shards) > 1
    r = redis.Redis.from_url(redis_url)
    keys = Keyspace("ray")
    assert r.get(keys.current).decode() == summary.snapshot_id
    assert r.scard(keys.done_shards(summary.snapshot_id)) == len(run.shards)

    local = ThinkAheadRun(
        tiny_world.model_dir,
        tiny_world.catalog_dir,
        tiny_world.interactions_csv,
        redis_url,
        job.model_copy(update={"key_prefix": "local"}),
    )
    local_summary = local.run(lambda: batch_engine, progress=False)
    for user in run.plan.users[:40]:
        a = UserPrefixes.decode(r.get(keys.user(summary.snapshot_id, user)))
        b = UserPrefixes.decode(r.get(Keyspace("local").user(local_summary.snapshot_id, user)))
        assert [(p.a, p.b) for p in a.prefixes] == [(p.a, p.b) for p in b.prefixes]


def test_eval_command_reports_metrics_beside_covisitation(tiny_world, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "report.json"
    for engine in ("torch", "vllm"):
        result = run_cli(
            *[
                "eval",
                *tiny_world.cli_args(),
                "--out",
                str(out),
                "--split",
                "test",
                "--mode",
                "full",
                "--engine",
                engine,
                "--limit",
                "60",
                "--no-progress",
            ],
        )
        assert result.exit_code == 0, result.output
        report = json.loads(out.read_text())
        rows = report["rows"]
        decoder = next(v for k, v in rows.items() if k.startswith("decoder"))
        covis = rows["co-visitation (train split)"]
        assert decoder["users"] == covis["users"] == 60
        assert decoder["invalid_items"] == 0
        assert 0 <= decoder["recall@5"] <= decoder["recall@10"] <= 1
        # what it scored with, and how that was built
        built = report["provenance"]
        assert built["catalog"]["version"] == report["catalog_version"]
        assert built["catalog"]["holdout_last"] == 2 and built["covisit"]["holdout_last"] == 2
        assert built["model"] == {
            "version": report["model_version"],
            "refit": False,
            "data_hash": built["model"]["data_hash"],
        }
        if engine == "torch":
            torch_row = decoder
    assert decoder["recall@10"] == pytest.approx(torch_row["recall@10"], abs=0.02)


def test_eval_refuses_bad_options(tiny_world, tmp_path):  # type: ignore[no-untyped-def]
    result = run_cli(
        *[
            "eval",
            *tiny_world.cli_args(),
            "--out",
            str(tmp_path / "r.json"),
            "--beam",
            "5",
        ],
    )
    assert result.exit_code == 2 and "beam (5) must be >= k (10)" in result.output
    assert "Traceback" not in result.output


def test_think_ahead_eval_and_blend_tuning_on_validation(tiny_world, tmp_path):  # type: ignore[no-untyped-def]
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_world.model_dir, model)
    common = [
        "--catalog",
        str(tiny_world.catalog_dir),
        "--interactions",
        str(tiny_world.interactions_csv),
        "--no-progress",
    ]
    # an item-level model in the model directory: its candidates and weight are tuned too
    result = run_cli(
        *["train-items", *common, "--out", str(model / "items"), "--epochs", "3", "--dim", "16"]
    )
    assert result.exit_code == 0, result.output
    result = run_cli(
        *[
            "tune-blend",
            "--model",
            str(model),
            *common,
            "--limit",
            "60",
            "--prefixes",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    serving = ServingConfig.model_validate_json((model / "serving.json").read_text())
    assert serving.item_model_version is not None
    assert {"affinity", "affinity_candidates"} <= set(serving.tuning["best"])
    tuning = serving.tuning
    # the recorded choice is within 1% of the grid's best on validation, no worse than the decoder
    assert tuning["best"]["ndcg@10"] >= 0.99 * tuning["grid_best_ndcg@10"]
    assert tuning["best"]["ndcg@10"] >= tuning["decoder_only"]["ndcg@10"]
    # with an item-level model the service answers users one event past their entry without
    # the engine (tune-rerank's path): the weights are judged on the stored answers alone
    assert "one event behind ndcg@10" not in tuning["best"]
    assert serving.chosen_on is not None and "engine round" not in serving.chosen_on
    assert serving.weights.covisit == tuning["best"]["covisit"]
    assert serving.covisit_version is not None  # the catalog carries its co-visitation table
    # the catalog has categories: the answer rationale's mix is learned on the same users,
    # never worse than the answer alone, and it is what the scoring settings carry
    assert serving.rationale is not None
    picked = serving.rationale_tuning
    top1 = "accuracy: rationale top-1"
    assert picked["best"][top1] >= picked["answer_alone"][top1]
    assert picked["best"]["users"] == 60
    assert serving.scoring().rationale == serving.rationale

    label, row, rows = served_row(model, common, tmp_path / "ta.json")
    assert row["invalid_items"] == 0 and row["users"] == 60
    assert "item-level candidates" in label
    assert any("item-level" in m for m in row["prefix_coverage"])
    assert {"co-visitation (train split)", "popularity (train split)"} <= set(rows)
    assert rows[COVISIT_TABLE_ROW]["users"] == 60  # what the co-visitation fallback serves

    # one event behind the snapshot: what the worker stored (the extras' too) reused, real vLLM
    label, row, _ = served_row(model, common, tmp_path / "stale.json", "--stale-events", "1")
    assert "reused" in label and row["invalid_items"] == 0 and row["users"] == 60

    # the no-engine answer after an event, tuned on validation users one event behind; the
    # eval of that path on the same users with the recorded settings finds the tune's own
    # figure (the same code; the plain-PyTorch engine on both sides, deterministic)
    result = run_cli(
        *["tune-rerank", "--model", str(model), *common, "--limit", "60", "--prefixes", "8"],
        *["--engine", "torch"],
    )
    assert result.exit_code == 0, result.output
    tuned = ServingConfig.model_validate_json((model / "serving.json").read_text())
    assert tuned.weights == serving.weights and tuned.rerank is not None
    record = tuned.rerank_tuning
    # tuned with the encode the service runs: the ensemble's first member (fresh_members),
    # while the stored answers' weights were learned with the whole ensemble
    from offline.items.config import DEFAULT_MEMBERS
    from service.contracts.catalog import Catalog
    from service.contracts.item_model import ItemModel

    items = ItemModel.load(model / "items", Catalog.load(tiny_world.catalog_dir))
    assert len(items.members) == DEFAULT_MEMBERS > 1 and items.version == serving.item_model_version
    assert record["fresh_item_model"] == items.for_fresh().version != items.version
    assert record["best"]["ndcg@10"] == max(r["ndcg@10"] for r in record["top"])
    assert record["best"]["ndcg@10"] >= record["without_encode"]["ndcg@10"]
    assert set(record["item_level_alone"]) == {"recall@10", "ndcg@10"}  # it has an item model
    label, row, _ = served_row(
        model, common, tmp_path / "rerank.json", "--stale-events", "1", "--fresh-path", "rerank",
        "--engine", "torch", "--split", "valid",
    )  # fmt: skip
    assert "re-ranked with the fresh item-level scores" in label and row["invalid_items"] == 0
    assert abs(row["ndcg@10"] - record["best"]["ndcg@10"]) < 1e-4


def served_row(
    model: Path, common: list[str], out: Path, *extra: str
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``thinkahead eval --mode think-ahead`` on 60 sampled users (M = 8): the served row's
    label and metrics, and every row."""
    result = run_cli(
        *["eval", "--model", str(model), *common, "--out", str(out), "--mode", "think-ahead"],
        *["--prefixes", "8", "--limit", "60", *extra],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    label, row = next((k, v) for k, v in rows.items() if k.startswith("served answer"))
    return label, row, rows
