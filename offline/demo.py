"""``thinkahead demo``: the whole product on one machine, end to end, in a few minutes.

A sample of real users (Amazon Beauty, when ``../shared/data/beauty`` is there; otherwise a
generated catalog) -> catalog build -> a short decoder training -> think-ahead snapshot in a
local redis-server -> ``thinkahead serve`` answering real REST and gRPC requests.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import httpx
import numpy as np
import typer

from offline.localproc import start_redis, start_service

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "beauty"


def say(text: str) -> None:
    typer.secho(f"\n== {text}", bold=True)


def sample_beauty(data: Path, out: Path, users: int) -> tuple[Path, Path, dict[str, str]]:
    """The first ``users`` users of the benchmark and the items they touched (not a copy of the
    data set: a demo-sized sample generated into the work directory)."""
    keep: set[str] = set()
    rows = []
    with (data / "interactions.csv").open() as f:
        for row in csv.DictReader(f):
            if row["user_id"] not in keep and len(keep) >= users:
                continue
            keep.add(row["user_id"])
            rows.append(row)
    items = {r["item_id"] for r in rows}
    titles: dict[str, str] = {}
    inter, item_csv = out / "interactions.csv", out / "items.csv"
    with inter.open("w", newline="") as f:
        w = csv.DictWriter(f, ["user_id", "item_id", "timestamp"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("user_id", "item_id", "timestamp")} for r in rows)
    with (data / "items.csv").open() as f, item_csv.open("w", newline="") as g:
        reader = csv.DictReader(f)
        w = csv.DictWriter(g, ["item_id", "title", "categories"])
        w.writeheader()
        for r in reader:
            if r["item_id"] in items:
                w.writerow(
                    {"item_id": r["item_id"], "title": r["title"], "categories": r["categories"]}
                )
                titles[r["item_id"]] = r["title"] or r["categories"]
    return item_csv, inter, titles


def synthetic(out: Path, n_items: int = 2000, n_users: int = 3000) -> tuple[Path, Path, dict]:
    rng = np.random.default_rng(0)
    kinds = ["lipstick", "mascara", "shampoo", "conditioner", "nail polish", "serum", "perfume"]
    shades = ["red", "nude", "black", "rose", "gold", "clear", "coral", "plum"]
    titles = {}
    item_csv, inter = out / "items.csv", out / "interactions.csv"
    with item_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "categories"])
        for i in range(1, n_items + 1):
            kind = kinds[(i * 7) % len(kinds)]
            titles[str(i)] = f"{shades[i % len(shades)]} {kind} #{i}"
            w.writerow([i, titles[str(i)], f"Beauty > {kind}"])
    with inter.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for u in range(1, n_users + 1):
            item = int(rng.integers(1, n_items + 1))
            seen: list[int] = []
            while len(seen) < int(rng.integers(5, 15)):
                if item not in seen:
                    seen.append(item)
                item = (item + int(rng.integers(1, 8))) % n_items + 1
            w.writerows([u, it, t] for t, it in enumerate(seen))
    return item_csv, inter, titles


def show(titles: dict[str, str], body: dict) -> None:  # type: ignore[type-arg]
    flag = f" (degraded: {body['degraded_reason']})" if body["degraded"] else ""
    typer.echo(
        f"   source={body['source']}{flag} total={body['timings']['total_ms']:.1f} ms "
        f"(redis {body['timings']['redis_ms']:.1f}, decode {body['timings']['decode_ms']:.1f})"
    )
    for item in body["items"]:
        sid = item["semantic_id"]
        typer.echo(
            f"   {item['score']:8.3f}  <{sid['a']},{sid['b']},{sid['c']}>  "
            f"{titles.get(item['item_id'], item['item_id'])[:70]}"
        )


def run_demo(work: Path, data: Path | None, users: int, minutes: float, keep_running: bool) -> None:
    from offline.catalog.build import build_catalog
    from offline.data import read_interactions
    from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
    from offline.train.trainer import TrainConfig, train
    from service.engine.vllm_engine import VllmBatchEngine, VllmOptions

    work.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else (DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
    if data is not None:
        say(f"1/5 sample of {users} real users from {data}")
        items, inter, titles = sample_beauty(data, work, users)
    else:
        say("1/5 no benchmark data beside the project: generating a synthetic catalog")
        items, inter, titles = synthetic(work)
    say("2/5 catalog: MiniLM + CF embeddings -> balanced residual k-means semantic IDs")
    report = build_catalog(
        items, work / "catalog", codebook_size=64, interactions=inter, holdout_last=2
    )
    typer.echo(
        f"   {report['items']} items, collisions {report['collisions_before']} -> "
        f"{report['collisions_after']}, {report['seconds']['total']:.0f}s"
    )
    say(f"3/5 decoder: Llama-style, item tokens in its vocabulary, ~{minutes:g} min of training")
    manifest = train(
        work / "catalog",
        inter,
        work / "model",
        TrainConfig(preset="small", epochs=50, max_minutes=minutes, val_users=500),
    )
    typer.echo(
        f"   model {manifest.model_version}, val R@10 "
        f"{manifest.metrics['validation']['recall@10']:.3f}"
    )
    say("4/5 think-ahead: 2-token prefix beam search for every user -> Redis snapshot")
    redis_proc = start_redis(work / "redis")
    url = redis_proc.url
    service = None
    try:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        run = ThinkAheadRun(
            work / "model", work / "catalog", inter, url, ThinkAheadJob(prefixes=16, beam=16)
        )
        run.seed_histories(inter)
        summary = run.run(
            lambda: VllmBatchEngine(work / "model", VllmOptions(multiprocessing=False))
        )
        typer.echo(
            f"   snapshot {summary.snapshot_id}: {summary.written} users, "
            f"{summary.users_per_s} users/s"
        )
        say("5/5 service: REST + gRPC, vLLM in-process, answering real requests")
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        service = start_service(
            work / "model",
            work / "catalog",
            url,
            work / "service.log",
            env=env,
            wait_for="/readyz",
            timeout=600,
        )
        base = service.base_url
        http = httpx.Client(base_url=base, timeout=60)
        user = run.plan.users[0]
        seqs = read_interactions(inter)
        history = seqs.items[seqs.users.index(user)]  # the first planned user's own history
        typer.echo(f"   user {user} recently bought:")
        for item in history[-3:]:
            typer.echo(f"     - {titles.get(item, item)[:70]}")
        typer.echo(f"\n   POST {base}/v1/recommend {{user_id: {user}, k: 5}}")
        show(titles, http.post("/v1/recommend", json={"user_id": user, "k": 5}).json())
        fresh = [i for i in titles if i not in history][:2]
        typer.echo(f"\n   POST /v1/events: the user just bought {[titles[i][:40] for i in fresh]}")
        http.post("/v1/events", json={"user_id": user, "item_ids": fresh})
        show(titles, http.post("/v1/recommend", json={"user_id": user, "k": 5}).json())
        typer.echo("\n   a user the worker never saw (cold start):")
        show(titles, http.post("/v1/recommend", json={"user_id": "new-visitor", "k": 5}).json())
        typer.echo("\n   gRPC thinkahead.v1.Recommender/Recommend:")
        show(titles, grpc_recommend(service.grpc_port, user))
        metrics = [
            line
            for line in http.get("/metrics").text.splitlines()
            if line.startswith("thinkahead_requests_total")
        ]
        typer.echo("\n   " + "\n   ".join(metrics))
        if keep_running:
            typer.secho(
                f"\nserving on {base} (docs: {base}/docs) and gRPC "
                f"{service.grpc_target}; Ctrl-C to stop",
                bold=True,
            )
            service.process.wait()
    finally:
        if service is not None:
            service.stop(timeout=60)
        redis_proc.stop()


def grpc_recommend(port: int, user: str) -> dict:  # type: ignore[type-arg]
    import grpc
    from google.protobuf.json_format import MessageToDict
    from service.api._proto.thinkahead.v1 import recommender_pb2 as pb
    from service.api._proto.thinkahead.v1 import recommender_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = pb_grpc.RecommenderStub(channel).Recommend(pb.RecommendRequest(user_id=user, k=5))
    body = MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    body["source"] = body["source"].removeprefix("SOURCE_").lower()
    for item in body["items"]:
        item["semantic_id"] = {k: item["semantic_id"].get(k, 0) for k in "abc"}
    body["timings"] = {
        k: body["timings"].get(k, 0.0) for k in ("total_ms", "redis_ms", "decode_ms")
    }
    return body
