"""What the bench reads back from the locust mix and the processes beside it: the re-think
worker's lag and throughput (its real registry), the answers that needed no engine round (the
service's real registry), the tagged locust rows, the client-side recommend samples, Redis bytes
per user with the co-visitation table apart, and a process's CPU time."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import generate_latest

from offline.bench.load import (
    Sample,
    engine_free_after_event,
    locust_totals,
    read_samples,
    recommend_latency,
    tagged,
    transport_of,
    untagged,
)
from offline.bench.report import _mix_lines
from offline.bench.runner import RethinkWorker, cpu_seconds
from offline.bench.server_latency import engine_free_share, rethink_summary
from offline.localproc import free_ports
from offline.thinkahead.rethink import GROUP, RethinkMetrics
from offline.thinkahead.sizing import snapshot_bytes
from service.contracts.snapshot import Keyspace
from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]


def text(registry) -> str:  # type: ignore[no-untyped-def]
    return generate_latest(registry).decode()


def test_rethink_lag_users_and_rate_count_only_the_mix() -> None:
    m = RethinkMetrics()
    m.lag.observe(200.0)  # the warm-up (engine load): before the mix, must not count
    m.users.labels("written").inc()
    m.batch_users.observe(1)
    before = text(m.registry)
    for _ in range(90):
        m.lag.observe(0.3)  # bucket (0.25 s, 0.5 s]
    for _ in range(10):
        m.lag.observe(4.0)  # bucket (2 s, 5 s]
    m.users.labels("written").inc(100)
    m.users.labels("stale").inc(20)
    m.users.labels("skipped").inc(3)
    m.failures.inc(2)
    for size in (40, 60, 23):
        m.batch_users.observe(size)
    m.pending.set(7)
    got = rethink_summary(before, text(m.registry), cpu_seconds=30.0, seconds=60.0)
    assert got["users"] == {"written": 100, "stale": 20, "skipped": 3}
    assert got["lag_observations"] == 100
    assert 250 < got["lag_p50_ms"] <= 500
    assert got["lag_p50_ms"] == pytest.approx(250 + 250 * (50 / 90), abs=0.1)
    assert 2000 < got["lag_p99_ms"] <= 5000
    assert got["lag_p99_ms"] == pytest.approx(2000 + 3000 * (9 / 10), abs=0.1)
    assert got["failures"] == 2
    assert got["batches"] == 3 and got["mean_batch_users"] == pytest.approx(41.0)
    assert got["stream_backlog_at_end"] == 7  # the worker's gauge, without a Redis reading
    direct = rethink_summary(before, text(m.registry), 30.0, 60.0, backlog=40)
    assert direct["stream_backlog_at_end"] == 40
    assert got["users_per_cpu_second"] == pytest.approx(120 / 30)  # written + stale
    assert got["users_per_s"] == pytest.approx(2.0)


def test_an_idle_worker_reports_no_lag_rather_than_zero() -> None:
    m = RethinkMetrics()
    got = rethink_summary(text(m.registry), text(m.registry), cpu_seconds=0.0, seconds=60.0)
    assert got["lag_p50_ms"] is None and got["lag_p99_ms"] is None
    assert got["users"] == {"written": 0, "stale": 0, "skipped": 0}
    assert got["users_per_cpu_second"] is None and got["users_per_s"] == 0


def test_engine_free_share_is_the_difference_of_two_service_scrapes() -> None:
    metrics = Metrics()
    metrics.answers.labels("yes").inc(500)  # the load points before the mix
    metrics.answers.labels("no").inc(70)
    before = text(metrics.registry)
    metrics.answers.labels("yes").inc(30)
    metrics.answers.labels("no").inc(90)
    got = engine_free_share(before, text(metrics.registry))
    assert got == {"answers": 120, "no_engine_round": 90, "share": 0.75}
    empty = text(Metrics().registry)
    assert engine_free_share(empty, empty)["share"] is None


def test_tags_round_trip_and_never_confuse_the_two_rounds() -> None:
    assert tagged("Recommend 2s after event", 0.0) == "Recommend 2s after event (no engine round)"
    assert tagged("Recommend 2s after event", 0.01) == "Recommend 2s after event (engine round)"
    assert untagged("recommend 2s after event (no engine round)") == (
        "recommend 2s after event",
        "no",
    )
    assert untagged("recommend 2s after event (engine round)") == (
        "recommend 2s after event",
        "yes",
    )
    assert untagged("recommend after event") == ("recommend after event", None)


CSV_HEAD = "Type,Name,Request Count,Failure Count,Requests/s\n"
CSV_ROWS = """POST,recommend,1000,2,16.7
POST,recommend after event,200,0,3.3
POST,events,200,1,3.3
POST,events (recommend 2s later),40,0,0.7
POST,recommend 2s after event (no engine round),30,0,0.5
POST,recommend 2s after event (engine round),10,0,0.2
POST,recommend 2s after event,3,3,0.05
grpc,Recommend,900,0,15.0
grpc,AppendEvents,180,0,3.0
grpc,AppendEvents (Recommend 2s later),30,0,0.5
grpc,Recommend 2s after event (no engine round),15,0,0.25
grpc,Recommend 2s after event (engine round),15,0,0.25
grpc,Recommend after event (engine round),99,0,1.0
,Aggregated,2622,6,43.7
"""


def rows() -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(CSV_HEAD + CSV_ROWS)))


def test_engine_free_share_2s_after_event_from_the_tagged_rows() -> None:
    got = engine_free_after_event(rows())
    assert got["rest"] == {"recommends": 40, "no_engine_round": 30, "share": 0.75}
    assert got["grpc"] == {"recommends": 30, "no_engine_round": 15, "share": 0.5}
    assert got["all"] == {"recommends": 70, "no_engine_round": 45, "share": round(45 / 70, 4)}
    assert engine_free_after_event([]) == {
        "all": {"recommends": 0, "no_engine_round": 0, "share": None}
    }


def test_totals_event_rate_and_failures_by_transport() -> None:
    got = locust_totals(rows())
    assert got["throughput_rps"] == 43.7 and got["requests"] == 2622 and got["failures"] == 6
    assert got["failures_by_transport"] == {"grpc": 0, "rest": 6}
    assert got["events_per_s"] == pytest.approx(3.3 + 0.7 + 3.0 + 0.5)


def test_client_latency_per_transport_all_kinds_together_and_per_kind() -> None:
    samples = [Sample("rest", "recommend", float(ms), True) for ms in range(1, 101)]
    samples += [Sample("rest", "full decode", 1000.0, True) for _ in range(10)]
    samples += [Sample("rest", "recommend", 5000.0, False)]  # a failure: counted, not timed
    samples += [Sample("grpc", "Recommend", 7.0, True) for _ in range(5)]
    text_ = "".join(f"{s.line()}\n" for s in samples)
    got = recommend_latency(read_samples(text_), seconds=10.0)
    rest = got["rest"]
    assert rest["requests"] == 111 and rest["failures"] == 1
    assert rest["recommends_per_s"] == 11.1
    assert rest["p50_ms"] == pytest.approx(55.5, abs=0.1)  # 110 answered: 1..100 and 10 x 1000
    assert rest["p99_ms"] == 1000.0
    assert rest["kinds"]["recommend"] == {
        "requests": 101,
        "failures": 1,
        "p50_ms": 50.5,
        "p99_ms": pytest.approx(99.0, abs=0.1),
    }
    assert rest["kinds"]["full decode"]["p50_ms"] == 1000.0
    assert got["grpc"]["p50_ms"] == 7.0 and got["grpc"]["kinds"].keys() == {"Recommend"}


def test_the_report_shows_the_shares_and_the_worker_or_says_none_ran() -> None:
    loc = {
        **locust_totals(rows()),
        "transports": {
            "rest": {
                **recommend_latency([Sample("rest", "recommend", 4.0, True)], 1.0)["rest"],
                "server_p50_ms": 2.0,
                "server_p99_ms": 9.0,
            }
        },
        "engine_free": {
            "all_recommends": {"answers": 200, "no_engine_round": 150, "share": 0.75},
            "2s_after_event": engine_free_after_event(rows()),
        },
        "rethink": None,
    }
    md = "\n".join(_mix_lines(loc))
    assert "75.0% of 200 recommend answers" in md
    assert "REST 75.0% of 40" in md and "gRPC 50.0% of 30" in md
    assert "`--no-rethink`" in md
    m = RethinkMetrics()
    m.lag.observe(0.3)
    m.users.labels("written").inc()
    loc["rethink"] = {
        **rethink_summary(text(RethinkMetrics().registry), text(m.registry), 2.0, 1.0),
        "log": "rethink.log",
    }
    md = "\n".join(_mix_lines(loc))
    assert "Re-think worker" in md and "rethink.log" in md and "`--no-rethink`" not in md


def test_cpu_seconds_reads_a_process_and_grows_with_its_work(tmp_path: Path) -> None:
    t0, times0 = cpu_seconds(os.getpid()), os.times()
    end = time.monotonic() + 0.4
    while time.monotonic() < end:
        sum(i * i for i in range(1000))  # user time
    with open("/dev/zero", "rb", buffering=0) as zero:
        end = time.monotonic() + 0.4
        while time.monotonic() < end:
            zero.read(1 << 20)  # system time: the kernel fills the buffer
    used, times1 = cpu_seconds(os.getpid()) - t0, os.times()
    assert used >= 0.2
    assert times1.system - times0.system >= 0.1
    expected = (times1.user - times0.user) + (times1.system - times0.system)
    assert used == pytest.approx(expected, abs=0.05)
    # a process named with ") 1 2 3" in it: the fields are read after the name's last ")"
    odd = tmp_path / "x) 1 2 3 4 5"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", odd)
    proc = subprocess.Popen([str(odd), "5"])
    try:
        time.sleep(0.2)
        assert ") 1 2" in Path(f"/proc/{proc.pid}/stat").read_text()
        assert 0 <= cpu_seconds(proc.pid) < 1
    finally:
        proc.kill()
        proc.wait()


def test_redis_bytes_per_user_count_the_table_apart(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = Keyspace()
    sid = "20250101T000000Z-abc"
    for i in range(50):
        client.set(keys.user(sid, f"u{i}"), b"x" * 1000)
    for i in range(7):
        client.set(keys.covisit(sid, f"i{i}"), b"y" * 5000)
    client.set(keys.user("20240101T000000Z-old", "u1"), b"z" * 9000)  # another snapshot
    client.set(keys.history("u1"), b"h" * 9000)
    client.set(keys.manifest(sid), b"m" * 9000)
    got = snapshot_bytes(client, keys, sid, users=50)
    assert got["user_value_keys"] == 50 and got["covisit_table_keys"] == 7
    assert 1000 <= got["user_values_per_user"] < 1200
    assert 7 * 5000 <= got["covisit_table_bytes"] < 7 * 5400
    assert got["covisit_table_per_user"] == round(got["covisit_table_bytes"] / 50)


def test_the_worker_backlog_is_read_from_redis_pending_and_unread(
    redis_url: str, tmp_path: Path
) -> None:
    worker = RethinkWorker(None, 0, tmp_path / "log", redis_url)  # type: ignore[arg-type]
    assert worker.backlog() is None  # no stream, no group
    client = redis.Redis.from_url(redis_url)
    events = Keyspace().events
    client.xgroup_create(events, GROUP, id="0", mkstream=True)
    for i in range(5):
        client.xadd(events, {"u": f"u{i}"})
    read: Any = client.xreadgroup(GROUP, "c", {events: ">"}, count=2)
    assert worker.backlog() == 5  # 2 pending + 3 unread
    client.xack(events, GROUP, read[0][1][0][0])
    assert worker.backlog() == 4


class _Stub(BaseHTTPRequestHandler):
    """A loopback service for the locustfile: events acknowledged, recommends answered with an
    engine round every other time, none otherwise. (Not by user: the mix's users are Zipf, so
    a rule by user id could give every tagged recommend of a short run the same answer.)"""

    recommends = itertools.count()
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        answer: dict[str, Any]
        if self.path == "/v1/recommend":
            with self.lock:
                engine = next(self.recommends) % 2 == 1
            answer = {"items": [], "timings": {"decode_ms": 4.2 if engine else 0.0}}
        else:
            answer = {"accepted": len(body.get("item_ids", []))}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.mark.slow
def test_the_locustfile_tags_recommends_2s_after_an_event_and_records_samples(
    tmp_path: Path,
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (grpc_port,) = free_ports(1)  # nothing listens: every gRPC call fails, and is counted
    try:
        subprocess.run(
            [
                str(ROOT / "scripts" / "load_test.sh"),
                str(server.server_address[1]),
                str(grpc_port),
                str(tmp_path),
                "6",
                "16",
                "20",  # users u1..u20
            ],
            check=True,
            capture_output=True,
            env={
                **os.environ,
                "THINKAHEAD_LOAD_SAMPLES": str(tmp_path / "samples.tsv"),
                "THINKAHEAD_LOAD_STATS": str(tmp_path / "final.csv"),
            },
            timeout=300,
        )
    finally:
        server.shutdown()
    assert (tmp_path / "locust_stats.csv").exists()  # locust's own, as the run went
    with (tmp_path / "final.csv").open() as f:
        got = list(csv.DictReader(f))
    count = {(r["Type"], r["Name"]): int(r["Request Count"]) for r in got}
    tags = engine_free_after_event(got)
    assert tags["rest"]["recommends"] > 0
    assert 0 < tags["rest"]["no_engine_round"] < tags["rest"]["recommends"]  # both tags
    assert count[("POST", "events (recommend 2s later)")] >= tags["rest"]["recommends"]
    assert "grpc" not in tags  # no gRPC answer to tag
    samples = read_samples((tmp_path / "samples.tsv").read_text())
    rest = [s for s in samples if s.transport == "rest"]
    after = [s for s in rest if s.kind == "recommend 2s after event"]
    assert len(after) == tags["rest"]["recommends"] and all(s.ok for s in after)
    # every recommend of the final stats is a sample, and no other request is
    by_kind: Counter[tuple[str, str]] = Counter()
    for (kind_type, name), n in count.items():
        if name != "Aggregated" and not name.startswith(("events", "AppendEvents")):
            by_kind[(transport_of(kind_type), untagged(name)[0])] += n
    assert Counter((s.transport, s.kind) for s in samples) == by_kind
    assert {s.kind for s in rest} <= {
        "recommend",
        "recommend after event",
        "recommend excl",
        "full decode",
        "recommend 2s after event",
    }
    grpc = [s for s in samples if s.transport == "grpc"]
    assert (
        grpc
        and not any(s.ok for s in grpc)
        and {s.kind for s in grpc}
        <= {
            "Recommend",
            "Recommend after event",
            "Recommend 2s after event",
        }
    )
    assert not any(math.isnan(s.ms) for s in samples)
