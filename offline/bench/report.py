"""report.json, report.md and the latency-throughput plot of a benchmark run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QUALITY_COLS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")


def _weights(quality: dict[str, Any]) -> str:
    serving = quality.get("serving") or {}
    weights = serving.get("weights") or {"offline": quality.get("offline_weight", 0.0)}
    parts = [f"{name} {value:g}" for name, value in weights.items()]
    parts.append(f"co-visitation candidates {serving.get('covisit_candidates', 0)}")
    return ", ".join(parts)


def _quality_table(quality: dict[str, Any]) -> list[str]:
    lines = [
        f"Beauty test split, {quality['users']} users, full ranking over the catalog, history "
        f"items excluded; think-ahead ranks by the fused score with the weights learned on "
        f"validation ({_weights(quality)}).",
        "",
        "| ranking | R@5 | R@10 | N@5 | N@10 | R@10 vs full | invalid items "
        "| target (a,b) in C_u |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in quality["rows"].items():
        cells = [f"{row[c]:.4f}" for c in QUALITY_COLS]
        retention = row.get("retention_recall@10")
        lines.append(
            f"| {name} | {' | '.join(cells)} | "
            f"{'' if retention is None else f'{retention:.1%}'} | {row.get('invalid_items', '')} | "
            + ", ".join(f"{m} {v:.1%}" for m, v in row.get("prefix_coverage", {}).items())
            + " |"
        )
    return lines


def _speed_table(speed: dict[str, Any]) -> list[str]:
    lines = [
        "| scenario | conc. | req/s | p50 ms | p95 ms | p99 ms | redis p50 | decode p50 | "
        "server overhead p50 | e2e − decode p50 | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in speed["points"]:
        lines.append(
            f"| {p['scenario']} | {p['concurrency']} | {p['throughput_rps']} | {p['p50_ms']} | "
            f"{p['p95_ms']} | {p['p99_ms']} | {p['redis_p50_ms']} | {p['decode_p50_ms']} | "
            f"{p['server_overhead_p50_ms']} | {p['end_to_end_minus_decode_p50_ms']} | "
            f"{sum(p['errors'].values())} |"
        )
    return lines


def _redis_bytes(speed: dict[str, Any]) -> str:
    total = f"Redis {speed.get('redis_bytes_per_user', '?')} bytes per user, users + table"
    rb = speed.get("redis_bytes")
    if not rb:
        return total
    return (
        f"{total}; `MEMORY USAGE`: user values {rb['user_values_per_user']} bytes per user "
        f"({rb['user_value_keys']} keys), co-visitation table {rb['covisit_table_bytes']} "
        f"bytes in {rb['covisit_table_keys']} keys, shared ({rb['covisit_table_per_user']} "
        "per user)"
    )


def _na(value: Any) -> str:
    return "n/a" if value is None else str(value)


def _share(v: dict[str, Any] | None, count: str = "recommends") -> str:
    if not v or v.get("share") is None:
        return "n/a"
    return f"{v['share']:.1%} of {int(v[count])}"


def _mix_lines(loc: dict[str, Any]) -> list[str]:
    """The mix's recommends per transport (client and server side), the answers that needed no
    engine round, and the re-think worker beside the service."""
    if "transports" not in loc:
        return []
    lines = [
        f"Whole mix: {loc['throughput_rps']} req/s, {loc['requests']} requests, "
        f"{loc['failures']} failures "
        f"({', '.join(f'{t} {n}' for t, n in loc['failures_by_transport'].items()) or 'none'}); "
        f"events {loc['events_per_s']}/s.",
        "",
        "Recommends by transport, every kind together: client side (locust's clock, answered "
        "requests; `locust_recommends.tsv`) and server side (the histogram above).",
        "",
        "| transport | recommends | failures | req/s | client p50 ms | client p99 ms | "
        "server p50 ms | server p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {t} | {v.get('requests', 0)} | {v.get('failures', 0)} | "
            f"{v.get('recommends_per_s')} | {v.get('p50_ms')} | {v.get('p99_ms')} | "
            f"{v.get('server_p50_ms')} | {v.get('server_p99_ms')} |"
            for t, v in loc["transports"].items()
        ],
        "",
        "| transport | recommend kind | requests | failures | client p50 ms | client p99 ms |",
        "| --- | --- | --- | --- | --- | --- |",
        *[
            f"| {t} | {kind} | {k['requests']} | {k['failures']} | {k['p50_ms']} | {k['p99_ms']} |"
            for t, v in loc["transports"].items()
            for kind, k in v.get("kinds", {}).items()
        ],
        "",
    ]
    free = loc.get("engine_free") or {}
    after = free.get("2s_after_event") or {}
    lines += [
        "Answered without an engine round: "
        f"{_share(free.get('all_recommends'), 'answers')} recommend answers of the mix "
        '(`thinkahead_answers_total{engine_round="no"}`, difference of two scrapes); '
        f"recommends 2 s after their event: {_share(after.get('all'))} "
        f"(REST {_share(after.get('rest'))}, gRPC {_share(after.get('grpc'))}; "
        "the tagged locust names).",
        "",
    ]
    rt = loc.get("rethink")
    if rt is None:
        lines += ["No re-think worker ran during the mix (`--no-rethink`).", ""]
        return lines
    users = rt["users"]
    lines += [
        "#### Re-think worker beside the service",
        "",
        f"`thinkahead rethink --engine torch --nice {rt.get('nice', 0)}` on the service's "
        "CPUs for the mix only (warmed up "
        "on one user first; its registry scraped before and after the mix; CPU time from "
        f"/proc/<pid>/stat; log `{rt['log']}`).",
        "",
        "| lag p50 ms | lag p99 ms | written | stale | skipped | failed batches | batches "
        "| mean users / batch | backlog at end | users/s | CPU s | users per CPU-second |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| "
        + " | ".join(
            _na(v)
            for v in (
                rt["lag_p50_ms"],
                rt["lag_p99_ms"],
                users["written"],
                users["stale"],
                users["skipped"],
                rt["failures"],
                rt["batches"],
                rt["mean_batch_users"],
                rt["stream_backlog_at_end"],
                rt["users_per_s"],
                rt["cpu_seconds"],
                rt["users_per_cpu_second"],
            )
        )
        + " |",
        "",
        f"Lag: from the event's stream entry to its user's entry written "
        f"(`thinkahead_rethink_lag_seconds`, within-bucket interpolation, "
        f"{rt['lag_observations']} entries written; users still in the backlog at the end "
        "have none yet); stale: the user acted again before the entry was written; the mix "
        f"sent {loc['events_per_s']} events/s.",
        "",
    ]
    return lines


def ratios(speed: dict[str, Any]) -> list[dict[str, Any]]:
    by = {(p["scenario"], p["concurrency"]): p for p in speed["points"]}
    out = []
    for (scenario, c), p in by.items():
        full = by.get(("full decode", c))
        if scenario.startswith("think-ahead") and full:
            out.append(
                {
                    "scenario": scenario,
                    "concurrency": c,
                    "p50_ratio": round(full["p50_ms"] / p["p50_ms"], 2),
                    "p99_ratio": round(full["p99_ms"] / p["p99_ms"], 2),
                    "throughput_ratio": round(p["throughput_rps"] / full["throughput_rps"], 2),
                }
            )
    return out


def plot(speed: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    scenarios = sorted({p["scenario"] for p in speed["points"]})
    for scenario in scenarios:
        pts = sorted(
            (p for p in speed["points"] if p["scenario"] == scenario),
            key=lambda p: p["concurrency"],
        )
        xs = [p["throughput_rps"] for p in pts]
        for q, style in (("p50_ms", "-o"), ("p99_ms", "--^")):
            ax.plot(xs, [p[q] for p in pts], style, label=f"{scenario} {q[:3]}")
        for p in pts:
            ax.annotate(
                f"c={p['concurrency']}",
                (p["throughput_rps"], p["p99_ms"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("think-ahead vs full decode through the service")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    if "speed" in report:
        report["speed"]["ratios"] = ratios(report["speed"])
        plot(report["speed"], out / "latency_throughput.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# thinkahead benchmark",
        "",
        f"Created {report['created_at']} on {report['machine']['platform']} "
        f"({report['machine']['cpus']} CPUs). Command: `{report['command']}`.",
        "",
    ]
    if "quality" in report:
        lines += ["## Quality", "", *_quality_table(report["quality"]), ""]
    if "speed" in report:
        speed = report["speed"]
        snap = speed["snapshot"]
        lines += [
            "## Speed through the service",
            "",
            f"Real HTTP to `thinkahead serve` (vLLM AsyncLLM in-process, real redis-server), "
            f"closed-loop clients, {speed['seconds_per_point']} s per point after a warm-up; "
            f"snapshot of {snap['written']} users (think-ahead worker: {snap['users_per_s']} "
            f"users/s; {_redis_bytes(speed)}). Times in "
            "ms; server overhead = server time − decode time. CPU pinning: "
            f"{speed.get('cpu_pinning', 'not recorded')}.",
            "",
            *_speed_table(speed),
            "",
            "| scenario | conc. | full/think-ahead p50 | full/think-ahead p99 | throughput × |",
            "| --- | --- | --- | --- | --- |",
            *[
                f"| {r['scenario']} | {r['concurrency']} | {r['p50_ratio']} | {r['p99_ratio']} | "
                f"{r['throughput_ratio']} |"
                for r in speed["ratios"]
            ],
            "",
            "![latency vs throughput](latency_throughput.png)",
            "",
        ]
        if speed.get("floor"):
            lines += [
                "### Floor: the same scoring in-process with plain PyTorch",
                "",
                "One user at a time, the service's own planning and ranking, one batched "
                "`TorchBatchEngine` call per engine round (`offline/bench/floor.py`): what this "
                "machine does without an engine round trip. A measurement, not a serving path.",
                "",
                "| scenario | users | p50 ms | p99 ms | engine requests per recommend |",
                "| --- | --- | --- | --- | --- |",
                *[
                    f"| {r['scenario']} | {r['users']} | {r['p50_ms']} | {r['p99_ms']} | "
                    f"{r['requests_per_recommend']} |"
                    for r in speed["floor"]
                ],
                "",
            ]
        if speed.get("locust"):
            loc = speed["locust"]
            lines += [
                f"### Locust mix ({loc['clients']} clients, {loc['seconds']} s, REST + gRPC, "
                "Zipf users, 10% cold, events, recommends 2 s after an event; "
                "`tests/load/locustfile.py`)",
                "",
                "| type | name | requests | failures | p50 ms | p95 ms | p99 ms | req/s |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
                *[
                    f"| {r.get('Type')} | {r.get('Name')} | {r.get('Request Count')} | "
                    f"{r.get('Failure Count')} | {r.get('Median Response Time')} | "
                    f"{r.get('95%')} | {r.get('99%')} | {float(r.get('Requests/s') or 0):.1f} |"
                    for r in loc["rows"]
                ],
                "",
            ]
            if loc.get("server"):
                lines += [
                    "The service's own recommend latency during the same run, by transport "
                    "(`thinkahead_request_duration_seconds`, difference of two scrapes; "
                    "within-bucket interpolation): what the server spends, without the load "
                    "generator's share.",
                    "",
                    "| transport | recommends | server p50 ms | server p99 ms |",
                    "| --- | --- | --- | --- |",
                    *[
                        f"| {t} | {int(v['requests'] or 0)} | {v['p50_ms']} | {v['p99_ms']} |"
                        for t, v in loc["server"].items()
                    ],
                    "",
                ]
            lines += _mix_lines(loc)
    (out / "report.md").write_text("\n".join(lines))
