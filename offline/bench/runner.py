"""The benchmark job: quality (offline, vLLM batch engine) then speed (through the service)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from offline.bench.load import (
    engine_free_after_event,
    locust_totals,
    read_samples,
    recommend_latency,
    run_load,
)
from offline.bench.report import write_report
from offline.bench.server_latency import (
    RETHINK_USERS,
    engine_free_share,
    parse_buckets,
    rethink_summary,
    sample_values,
    scrape_text,
    server_latency,
)
from offline.eval.baselines import baseline_rows
from offline.eval.candidates import ThinkAheadEval, rank_full, rank_served
from offline.eval.examples import select_examples
from offline.eval.job import report_row
from offline.eval.metrics import TOP_K
from offline.localproc import (
    cli_command,
    free_port,
    launch_env,
    pinned_to,
    start_redis,
    start_service,
    stop_session,
)
from offline.thinkahead.entries import CovisitSource
from offline.thinkahead.sizing import snapshot_bytes
from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
from service.config import RecommendSettings
from service.contracts.catalog import Catalog
from service.contracts.manifest import utc_now
from service.contracts.model import load_model_info, load_serving_config
from service.contracts.snapshot import Keyspace, UserPrefixes


def quality(
    model_dir: Path,
    catalog_dir: Path,
    interactions: Path,
    users: int | None,
    prefixes: int,
    beam: int,
    engine: Any,
    progress: bool,
) -> dict[str, Any]:
    catalog = Catalog.load(catalog_dir)
    info = load_model_info(model_dir, catalog)
    examples, data = select_examples(interactions, "test", info.max_history, users)
    serving = load_serving_config(model_dir)
    source = CovisitSource.load(catalog_dir, catalog)
    covisit = source.neighbours if source is not None else {}
    rows: dict[str, Any] = {}
    full = rank_full(engine, info, catalog, examples, 10, beam, progress=progress)
    rows[f"full decode (3 tokens, beam {beam})"] = report_row(full, examples)
    scoring = serving.scoring(prefixes=prefixes)
    for stale in (0, 1, 3):
        spec = ThinkAheadEval(scoring, prefixes, TOP_K, stale_events=stale, progress=progress)
        ranked = rank_served(engine, info, catalog, examples, spec, covisit)
        name = f"think-ahead (M={prefixes}, " + ("fresh)" if not stale else f"stale by {stale})")
        rows[name] = report_row(ranked, examples)
    rows.update(baseline_rows(data, examples, "test", TOP_K))
    full_r10 = rows[next(iter(rows))]["recall@10"]
    for name, row in rows.items():
        if name.startswith("think-ahead"):
            row["retention_recall@10"] = round(row["recall@10"] / full_r10, 4) if full_r10 else None
    return {"users": len(examples), "serving": serving.model_dump(mode="json"), "rows": rows}


@dataclass(frozen=True)
class CpuSplit:
    """Where the service and the load generators run: apart when the machine has the cores
    (a generator sharing the service's cores measures its own contention), else together."""

    service: set[int] | None
    load: set[int] | None
    note: str

    @classmethod
    def of_this_machine(cls) -> CpuSplit:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 4:
            return cls(
                None,
                None,
                f"not pinned: {len(cpus)} CPUs; giving the load generators one of them would "
                "take a large share from the service, so both share all CPUs",
            )
        load = set(cpus[-max(1, len(cpus) // 4) :])
        service = set(cpus) - load
        return cls(service, load, f"service on CPUs {sorted(service)}, load on {sorted(load)}")

    @contextmanager
    def generating_load(self) -> Iterator[None]:
        """This process on the load CPUs for the duration (the in-process generator)."""
        if self.load is None:
            yield
            return
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self.load)
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)


def speed(
    model_dir: Path,
    catalog_dir: Path,
    interactions: Path,
    work: Path,
    users: int,
    prefixes: int,
    concurrency: list[int],
    seconds: float,
    engine: Any,
    progress: bool,
    locust_seconds: float = 0,
    floor_users: int = 200,
    rethink: bool = False,
) -> dict[str, Any]:
    """Snapshot for ``users`` users from their test-time history (everything but the last
    event), histories seeded the same way, then load through the running service, then the
    floor (the same scoring in-process with plain PyTorch) once the service is down.
    ``rethink``: the locust mix runs with ``thinkahead rethink`` beside the service."""
    redis_proc = start_redis(work / "redis")
    url = redis_proc.url
    service = None
    try:
        job = ThinkAheadJob(prefixes=prefixes, beam=prefixes, holdout_last=1, max_users=users)
        run = ThinkAheadRun(model_dir, catalog_dir, interactions, url, job)
        run.seed_histories(interactions)
        client = redis_proc.client()
        before = int(client.info("memory")["used_memory"])
        snapshot = run.run(lambda: engine, progress=progress)
        per_user = (int(client.info("memory")["used_memory"]) - before) / max(snapshot.written, 1)
        keys = Keyspace(run.job.key_prefix, run.job.history_prefix)
        redis_bytes = snapshot_bytes(client, keys, snapshot.snapshot_id, snapshot.written)
        env = {
            "THINKAHEAD_RECOMMEND__MAX_IN_FLIGHT": "1024",
            "THINKAHEAD_RECOMMEND__DEFAULT_BUDGET_MS": "2000",
            "THINKAHEAD_RECOMMEND__MAX_PREFIXES": str(prefixes),
        }
        cpus = CpuSplit.of_this_machine()
        service = start_service(
            model_dir,
            catalog_dir,
            url,
            work / "service.log",
            env=env,
            wait_for="/readyz",
            timeout=600,
            cpus=cpus.service,
        )
        base, grpc_port = service.base_url, service.grpc_port
        catalog = run.catalog
        fresh_item = catalog.item_ids[len(catalog) // 2]
        scenarios = {
            "think-ahead": [{"user_id": u, "k": 10} for u in run.plan.users],
            "think-ahead + 1 new event": [
                {"user_id": u, "k": 10, "recent_item_ids": [fresh_item]} for u in run.plan.users
            ],
            "full decode": [
                {"user_id": u, "k": 10, "strategy": "full_decode"} for u in run.plan.users
            ],
        }
        results = []
        plan = [(s, c) for c in concurrency for s in scenarios]
        for scenario, c in tqdm(plan, desc="load", disable=not progress):
            with cpus.generating_load():
                result = asyncio.run(run_load(base, scenario, scenarios[scenario], c, seconds))
            results.append(result.summary())
        locust = None
        if locust_seconds > 0:
            # the re-think worker beside the service, on its CPUs, for the mix only
            worker = (
                partial(
                    start_rethink, model_dir, catalog_dir, url, work / "rethink.log", cpus.service
                )
                if rethink
                else None
            )
            locust = run_locust(
                base,
                grpc_port,
                work,
                locust_seconds,
                run.plan.users,
                catalog.item_ids,
                cpus=cpus.load,
                rethink=worker,
            )
        service.stop(timeout=120)
        service = None
        floor = None
        if floor_users > 0:
            floor = measure_floor(
                model_dir, run, client, snapshot.snapshot_id, fresh_item, prefixes, floor_users
            )
        return {
            "floor": floor,
            "locust": locust,
            "snapshot": snapshot.as_dict(),
            "seconds_per_point": seconds,
            "points": results,
            "service_settings": env,
            "cpu_pinning": cpus.note,
            # users + co-visitation table (+ manifest): Redis's used_memory over the publish
            "redis_bytes_per_user": round(per_user),
            "redis_bytes": {**redis_bytes, "users_and_table_per_user": round(per_user)},
        }
    finally:
        if service is not None:
            service.stop(timeout=120)
        redis_proc.stop()


def measure_floor(
    model_dir: Path,
    run: ThinkAheadRun,
    client: Any,
    snapshot_id: str,
    fresh_item: str,
    prefixes: int,
    users: int,
) -> list[dict[str, Any]]:
    from offline.bench.floor import floor_rows
    from offline.decode.torch_engine import TorchBatchEngine

    keys = Keyspace(run.job.key_prefix, run.job.history_prefix)
    chosen = list(zip(run.plan.users, run.plan.histories, strict=True))[:users]
    raws = client.mget([keys.user(snapshot_id, u) for u, _ in chosen])
    values = [(h, UserPrefixes.decode(raw)) for (_, h), raw in zip(chosen, raws, strict=True)]
    engine = TorchBatchEngine(model_dir, run.model.token_ids)
    served = RecommendSettings(max_prefixes=prefixes)
    return floor_rows(
        engine,
        run.model,
        run.catalog,
        served.scoring(load_serving_config(model_dir)),
        run.covisit,
        values,
        fresh_item,
        full_decode_beam=served.full_decode_beam,
    )


def run_bench(
    model_dir: Path,
    catalog_dir: Path,
    interactions: Path,
    out: Path,
    *,
    quality_users: int | None,
    speed_users: int,
    prefixes: int,
    beam: int,
    concurrency: list[int],
    seconds: float,
    skip_quality: bool = False,
    progress: bool = True,
    locust_seconds: float = 0,
    floor_users: int = 200,
    rethink: bool = False,
) -> dict[str, Any]:
    """``rethink``: run ``thinkahead rethink`` (torch engine) beside the service during the
    locust mix (and during nothing else), and report its lag and throughput."""
    from service.engine.vllm_engine import VllmBatchEngine, VllmOptions

    out.mkdir(parents=True, exist_ok=True)
    engine = VllmBatchEngine(model_dir, VllmOptions(multiprocessing=False))
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "created_at": utc_now(),
        "command": " ".join(["thinkahead", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "model_manifest": json.loads((model_dir / "manifest.json").read_text()),
    }
    report["model_manifest"].get("metrics", {}).pop("history", None)
    if not skip_quality:
        report["quality"] = quality(
            model_dir, catalog_dir, interactions, quality_users, prefixes, beam, engine, progress
        )
        (out / "report.json").write_text(json.dumps(report, indent=2))
    report["speed"] = speed(
        model_dir,
        catalog_dir,
        interactions,
        out,
        speed_users,
        prefixes,
        concurrency,
        seconds,
        engine,
        progress,
        locust_seconds,
        floor_users,
        rethink,
    )
    report["seconds"] = round(time.monotonic() - t0, 1)
    write_report(report, out)
    return report


SERVER_TRANSPORTS = {"http": "rest"}  # the service's transport label -> the mix's name
WARM_UP_ITEMS = 10  # the re-think worker's warm-up user: a history this long


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # from field 3 (state): the name may hold ") "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class RethinkWorker:
    """``thinkahead rethink`` as a real process, its metrics on a loopback port."""

    process: subprocess.Popen[bytes]
    metrics_port: int
    log_path: Path
    redis_url: str
    keys: Keyspace = field(default_factory=Keyspace)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def scrape(self) -> str:
        return scrape_text(self.metrics_url)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def backlog(self) -> int | None:
        """Stream entries its group has not handled yet (pending + unread), read from Redis
        now (the worker's own gauge is set between batches only)."""
        import redis

        from offline.thinkahead.rethink import GROUP

        client = redis.Redis.from_url(self.redis_url)
        try:
            for group in client.xinfo_groups(self.keys.events):
                if group.get("name") in (GROUP, GROUP.encode()):
                    return int(group.get("pending") or 0) + int(group.get("lag") or 0)
        except redis.ResponseError:  # no stream yet
            pass
        finally:
            client.close()
        return None

    def wait_until(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"thinkahead rethink exited with {self.process.returncode} waiting for "
                    f"{what}:\n{self.log()[-4000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if done():
                    return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"thinkahead rethink: no {what} in {timeout}s:\n{self.log()[-4000:]}")

    def warm_up(self, base_url: str, items: list[str], timeout: float = 600) -> None:
        """One event through the service for a user of its own (``items``: a history of a
        usual length), and wait until the worker has handled it: its engine is loaded (on its
        first batch) and has run once before the measurement."""
        self.wait_until(lambda: bool(self.scrape()), "metrics endpoint", timeout)
        reply = httpx.post(
            f"{base_url}/v1/events",
            json={"user_id": "bench-rethink-warm-up", "item_ids": items},
            timeout=30,
        )
        reply.raise_for_status()

        def handled() -> bool:
            return sum(sample_values(self.scrape(), RETHINK_USERS, "outcome").values()) >= 1

        self.wait_until(handled, "warm-up user re-thought", timeout)

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM (the worker finishes its batch), SIGKILL after ``timeout``."""
        return stop_session(self.process, timeout)


RETHINK_NICE = 10


def start_rethink(
    model_dir: Path,
    catalog_dir: Path,
    redis_url: str,
    log_path: Path,
    cpus: set[int] | None = None,
) -> RethinkWorker:
    """``thinkahead rethink --engine torch`` on ``cpus``, its output to ``log_path``."""
    port = free_port()
    args = [
        *cli_command("rethink", model_dir, catalog_dir, redis_url),
        "--engine",
        "torch",
        "--metrics-port",
        str(port),
        # near-line work on the service's cores: requests go first, the lag shows the cost
        "--nice",
        str(RETHINK_NICE),
    ]
    proc = subprocess.Popen(
        args,
        # one thread: on cores it shares with the service, more would only spin against it
        env=launch_env({"OMP_NUM_THREADS": "1"}),
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=pinned_to(cpus),
        start_new_session=True,  # its own process group: stop() takes what it started along
    )
    return RethinkWorker(proc, port, log_path, redis_url)


def run_locust(
    base: str,
    grpc_port: int,
    work: Path,
    seconds: float,
    users: list[str],
    items: list[str],
    clients: int = 16,
    cpus: set[int] | None = None,
    rethink: Callable[[], RethinkWorker] | None = None,
) -> dict[str, Any]:
    """tests/load/locustfile.py headless against the bench's service; its CSV and recommend
    samples into the report, with the service's metrics over the mix (server-side latency, the
    answers that needed no engine round). ``rethink``: starts the re-think worker, which runs
    beside the service for the mix (warmed up first) and is stopped after it."""
    import csv

    root = Path(__file__).resolve().parent.parent.parent
    (work / "load_users.txt").write_text("\n".join(users))
    (work / "load_items.txt").write_text("\n".join(items))
    samples_path = work / "locust_recommends.tsv"
    stats_path = work / "locust_final_stats.csv"
    port = int(base.rsplit(":", 1)[1])
    worker = None
    worker_before, cpu_before = "", 0.0
    try:
        if rethink is not None:
            worker = rethink()
            worker.warm_up(base, items[:WARM_UP_ITEMS])
            worker_before, cpu_before = worker.scrape(), worker.cpu_seconds()
        before = scrape_text(base)
        t0 = time.monotonic()
        subprocess.run(
            [
                str(root / "scripts" / "load_test.sh"),
                str(port),
                str(grpc_port),
                str(work),
                str(int(seconds)),
                str(clients),
                str(work / "load_users.txt"),
                str(work / "load_items.txt"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=pinned_to(cpus),
            env={
                **os.environ,
                "THINKAHEAD_LOAD_SAMPLES": str(samples_path),
                "THINKAHEAD_LOAD_STATS": str(stats_path),
            },
        )
        wall = time.monotonic() - t0
        worker_summary = None
        if worker is not None:
            cpu_after, worker_after = worker.cpu_seconds(), worker.scrape()
            worker_summary = rethink_summary(
                worker_before, worker_after, cpu_after - cpu_before, seconds, worker.backlog()
            )
            worker_summary["mix_wall_seconds"] = round(wall, 1)
            worker_summary["log"] = worker.log_path.name
            worker_summary["nice"] = RETHINK_NICE
        after = scrape_text(base)
    finally:
        if worker is not None:
            worker.stop()
    server = server_latency(parse_buckets(before), parse_buckets(after))
    with stats_path.open() as f:  # locust's request stats once every user has stopped
        rows = list(csv.DictReader(f))
    client = recommend_latency(read_samples(samples_path.read_text()), seconds)
    # the service labels REST "http"
    by_transport = {SERVER_TRANSPORTS.get(t, t): v for t, v in server.items()}
    transports = {
        t: {
            **client.get(t, {}),
            "server_p50_ms": by_transport.get(t, {}).get("p50_ms"),
            "server_p99_ms": by_transport.get(t, {}).get("p99_ms"),
            "server_recommends": by_transport.get(t, {}).get("requests"),
        }
        for t in sorted(set(client) | set(by_transport))
    }
    keep = (
        "Type",
        "Name",
        "Request Count",
        "Failure Count",
        "Median Response Time",
        "95%",
        "99%",
        "Requests/s",
    )
    return {
        "clients": clients,
        "seconds": seconds,
        "csv": stats_path.name,
        "samples": samples_path.name,
        "rows": [{k: r[k] for k in keep if k in r} for r in rows],
        "server": server,
        "transports": transports,
        **locust_totals(rows),
        "engine_free": {
            "all_recommends": engine_free_share(before, after),
            "2s_after_event": engine_free_after_event(rows),
        },
        "rethink": worker_summary,
    }
