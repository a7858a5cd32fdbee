"""`thinkahead bench` end to end on the tiny world: quality rows, load points through the real
service, the locust mix with the re-think worker beside the service, and the report files
(speed is only reported, never asserted)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.vllm


def test_bench_writes_a_complete_report(tiny_world, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # the bench's service takes the engine round after an event whatever the load on this box
    # (as the other integration services do: tests.inproc); the load rule has its own tests
    monkeypatch.setenv("THINKAHEAD_RECOMMEND__FRESH_ROUND_TARGET_MS", "60000")
    out = tmp_path / "bench"
    result = run_cli(
        *[
            "bench",
            *tiny_world.cli_args(),
            "--out",
            str(out),
            "--quality-users",
            "40",
            "--speed-users",
            "60",
            "--prefixes",
            "8",
            "--beam",
            "10",
            "--concurrency",
            "1,2",
            "--seconds",
            "2",
            "--locust-seconds",
            "4",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = report["quality"]["rows"]
    names = list(rows)
    assert names[0].startswith("full decode")
    assert [n for n in names if n.startswith("think-ahead")] == [
        "think-ahead (M=8, fresh)",
        "think-ahead (M=8, stale by 1)",
        "think-ahead (M=8, stale by 3)",
    ]
    assert "co-visitation (train split)" in rows
    for name, row in rows.items():
        assert row["users"] == 40
        if not name.startswith(("co-vis", "popularity")):
            assert row["invalid_items"] == 0
    fresh = rows["think-ahead (M=8, fresh)"]
    assert 0 <= fresh["prefix_coverage"]["M=8"] <= 1
    # the candidates' coverage bounds recall
    assert fresh["recall@10"] <= fresh["prefix_coverage"]["M=8 + co-visitation"] + 1e-9
    points = report["speed"]["points"]
    assert {(p["scenario"], p["concurrency"]) for p in points} == {
        (s, c) for s in ("think-ahead", "think-ahead + 1 new event", "full decode") for c in (1, 2)
    }
    for p in points:
        assert p["requests"] > 0 and p["errors"] == {}
    by = {(p["scenario"], p["concurrency"]): p for p in points}
    assert set(by[("think-ahead", 1)]["sources"]) == {"think_ahead"}
    assert set(by[("full decode", 1)]["sources"]) == {"full_decode"}
    # unchanged histories are answered from the worker's stored answers: no engine round
    assert by[("think-ahead", 1)]["decode_p50_ms"] == 0
    assert by[("think-ahead + 1 new event", 1)]["decode_p50_ms"] > 0
    floor = {r["scenario"]: r for r in report["speed"]["floor"]}
    assert set(floor) == {
        "think-ahead, engine path (no stored answer)",
        "think-ahead + 1 new event",
        "full decode",
    }
    assert floor["full decode"]["requests_per_recommend"] > 0
    assert floor["think-ahead + 1 new event"]["requests_per_recommend"] > 0
    written = report["speed"]["snapshot"]["written"]
    assert all(r["users"] == written and r["p50_ms"] > 0 for r in floor.values())
    assert report["speed"]["redis_bytes_per_user"] > 0  # users + co-visitation table
    redis_bytes = report["speed"]["redis_bytes"]
    assert redis_bytes["user_value_keys"] == written
    assert 0 < redis_bytes["user_values_per_user"] < report["speed"]["redis_bytes_per_user"]
    assert redis_bytes["covisit_table_keys"] > 0 and redis_bytes["covisit_table_bytes"] > 0
    locust = report["speed"]["locust"]
    assert locust["rows"] and locust["throughput_rps"] > 0 and locust["events_per_s"] > 0
    for transport in ("rest", "grpc"):
        mine = locust["transports"][transport]
        assert mine["requests"] > 0 and mine["p50_ms"] > 0 and mine["p99_ms"] >= mine["p50_ms"]
        assert mine["server_p50_ms"] is not None and mine["kinds"]
    answers = locust["engine_free"]["all_recommends"]
    assert answers["answers"] > 0 and 0 <= answers["share"] <= 1
    assert "all" in locust["engine_free"]["2s_after_event"]
    # the re-think worker ran beside the service for the mix (warmed up on a user first)
    rethink = locust["rethink"]
    assert set(rethink["users"]) == {"written", "stale", "skipped"}
    assert rethink["failures"] == 0 and rethink["cpu_seconds"] > 0
    # the mix's events reached its group: re-thought, or still in its backlog at the end
    assert sum(rethink["users"].values()) + rethink["stream_backlog_at_end"] > 0
    assert (out / "rethink.log").exists()
    assert (out / "latency_throughput.png").stat().st_size > 1000
    assert (out / "locust_stats.csv").exists() and (out / "locust_recommends.tsv").exists()
    text = (out / "report.md").read_text()
    assert "## Quality" in text and "## Speed through the service" in text
    assert "### Floor" in text
    assert "#### Re-think worker beside the service" in text
    assert "Answered without an engine round" in text
