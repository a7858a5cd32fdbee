"""``thinkahead demo``: the whole product on one machine, end to end, in a few minutes.

A sample of real users (Amazon Beauty: ``../shared/data/beauty`` when it is beside the checkout,
else the copy shipped in ``data/beauty``; ``--synthetic`` generates a catalog instead) -> catalog
build -> a short decoder training -> think-ahead snapshot in a local redis-server -> ``thinkahead
serve`` answering real REST and gRPC requests.

The terminal shows only the demo's own progress and results; everything else the process and
its children write (vLLM's and uvicorn's logs, library warnings, native prints) goes to one log
file named at the start.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx
import numpy as np
import typer

from offline.data import iter_csv_rows
from offline.errors import InputError
from offline.localproc import ServiceProcess, start_redis, start_service

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "beauty"
SHIPPED_DATA = ROOT / "data" / "beauty"
LOG_NAME = "demo.log"
# A fixed amount of training, not a time budget: the demo's model is the same on a busy box as
# on an idle one, only slower to come.
DEMO_EPOCHS = 8
DEMO_ITEM_EPOCHS = 12
DEMO_VAL_USERS = 500


class Screen:
    """Our lines on the terminal; the process's stdout and stderr (file descriptors 1 and 2,
    so native code and child processes too) in the log while the demo runs."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.console: TextIO = sys.stdout
        self._saved: tuple[int, int] | None = None

    def __enter__(self) -> Screen:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("")  # this run's log only; everyone appends from here on
        sys.stdout.flush()
        sys.stderr.flush()
        self.console = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        self._saved = (os.dup(1), os.dup(2))
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        assert self._saved is not None
        for fd, saved in zip((1, 2), self._saved, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        if kind is not None and kind is not KeyboardInterrupt:
            self.echo(f"\nthe demo failed; the log may say why: {self.log_path}")
        self.console.close()

    @contextlib.contextmanager
    def progress(self) -> Iterator[None]:
        """Progress bars of our own jobs (catalog embedding, training) on the terminal."""
        with contextlib.redirect_stdout(self.console), contextlib.redirect_stderr(self.console):
            yield

    def echo(self, text: str = "") -> None:
        typer.echo(text, file=self.console)

    def say(self, text: str) -> None:
        typer.secho(f"\n== {text}", bold=True, file=self.console)

    def show(self, titles: dict[str, str], body: dict[str, Any]) -> None:
        flag = f" (degraded: {body['degraded_reason']})" if body["degraded"] else ""
        timings = body["timings"]
        self.echo(
            f"   source={body['source']}{flag} total={timings['total_ms']:.1f} ms "
            f"(redis {timings['redis_ms']:.1f}, decode {timings['decode_ms']:.1f})"
        )
        for item in body["items"]:
            sid = item["semantic_id"]
            self.echo(
                f"   {item['score']:8.3f}  <{sid['a']},{sid['b']},{sid['c']}>  "
                f"{titles.get(item['item_id'], item['item_id'])[:70]}"
            )
        if body.get("reasoning"):
            self.echo(f"   why: {body['reasoning']} ({body['rationale']['basis']})")
            for item in body["rationale"]["evidence_item_ids"]:
                self.echo(f"        - {titles.get(item, item)[:70]}")
        elif body.get("reasoning_absent"):
            self.echo(f"   why: no rationale ({body['reasoning_absent']})")


def default_data() -> Path:
    """The benchmark beside the checkout, else the copy shipped with it."""
    return SHARED_DATA if SHARED_DATA.is_dir() else SHIPPED_DATA


def csv_in(directory: Path, stem: str) -> Path:
    """``stem.csv`` or ``stem.csv.gz`` in ``directory``."""
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        if (directory / name).is_file():
            return directory / name
    raise InputError(directory, f"has neither {stem}.csv nor {stem}.csv.gz")


def sample_beauty(data: Path, out: Path, users: int) -> tuple[Path, Path, dict[str, str]]:
    """The first ``users`` users of the benchmark and the items they touched (not a copy of the
    data set: a demo-sized sample generated into the work directory)."""
    keep: set[str] = set()
    rows = []
    for _, row in iter_csv_rows(csv_in(data, "interactions"), ("user_id", "item_id")):
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
    with item_csv.open("w", newline="") as g:
        w = csv.DictWriter(g, ["item_id", "title", "categories"])
        w.writeheader()
        for _, r in iter_csv_rows(csv_in(data, "items"), ("item_id", "title", "categories")):
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


def run_demo(
    work: Path,
    data: Path | None,
    users: int,
    epochs: int,
    keep_running: bool,
    synthetic_data: bool = False,
    item_epochs: int = DEMO_ITEM_EPOCHS,
) -> None:
    work.mkdir(parents=True, exist_ok=True)
    data = None if synthetic_data else (data or default_data())
    screen = Screen(work / LOG_NAME)
    typer.secho(
        f"thinkahead demo: progress and answers here; vLLM, uvicorn and library logs in "
        f"{screen.log_path}",
        bold=True,
    )
    with screen:
        _tour(screen, work, data, users, epochs, item_epochs, keep_running)


def _tour(
    screen: Screen,
    work: Path,
    data: Path | None,
    users: int,
    epochs: int,
    item_epochs: int,
    keep_running: bool,
) -> None:
    import logging

    logging.captureWarnings(True)  # library warnings: to the log, like the rest
    if data is not None:
        screen.say(f"1/5 sample of {users} real users from {data}")
        items, inter, titles = sample_beauty(data, work, users)
    else:
        screen.say("1/5 a generated catalog (--synthetic)")
        items, inter, titles = synthetic(work)
    from transformers.utils import logging as hf_logging

    from offline.catalog.build import CatalogSpec, build_catalog
    from offline.data import read_interactions
    from offline.items.config import ItemTrainConfig
    from offline.items.train import train_item_model
    from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
    from offline.train.trainer import TrainConfig, train
    from service.contracts.catalog import Catalog
    from service.contracts.item_model import ITEMS_DIR
    from service.engine.vllm_engine import VllmBatchEngine, VllmOptions

    hf_logging.disable_progress_bar()  # transformers' loading / saving bars are not our steps
    screen.say("2/5 catalog: MiniLM + CF embeddings -> balanced residual k-means semantic IDs")
    with screen.progress():
        report = build_catalog(
            items,
            work / "catalog",
            CatalogSpec(codebook_size=64, holdout_last=2),
            interactions=inter,
        )
    screen.echo(
        f"   {report['items']} items, collisions {report['collisions_before']} -> "
        f"{report['collisions_after']}, {report['seconds']['total']:.0f}s"
    )
    screen.say(
        f"3/5 decoder: a small Llama with the item tokens, {epochs} epochs; then the item-level "
        f"model, {item_epochs} epochs (a fixed amount of training: the same model on any box)"
    )
    decoder_cfg = TrainConfig(
        preset="small", epochs=epochs, patience=epochs, val_users=DEMO_VAL_USERS
    )
    with screen.progress():
        manifest = train(work / "catalog", inter, work / "model", decoder_cfg)
        items_manifest = train_item_model(
            Catalog.load(work / "catalog"),
            inter,
            work / "model" / ITEMS_DIR,
            ItemTrainConfig(epochs=item_epochs, patience=item_epochs),
        )
    quality = _validation_quality(work, inter, decoder_cfg, manifest.metrics["validation"])
    screen.echo(
        f"   validation R@10 on {DEMO_VAL_USERS} users: decoder {quality['decoder']:.3f}, "
        f"item-level model {quality['items']:.3f}, co-visitation {quality['covisit']:.3f} "
        f"(the baseline every quality report shows; Beauty's full figures are in the README)\n"
        f"   decoder {manifest.model_version}, item-level model {items_manifest.version}"
    )
    screen.say("4/5 think-ahead: 2-token prefix beam search for every user -> Redis snapshot")
    redis_proc = start_redis(work / "redis")
    service = None
    try:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        run = ThinkAheadRun(
            work / "model",
            work / "catalog",
            inter,
            redis_proc.url,
            ThinkAheadJob(prefixes=16, beam=16),
        )
        run.seed_histories(inter)
        # the engine starts outside the progress block: its logs stay in the log file, only
        # the worker's progress bar reaches the terminal
        engine = VllmBatchEngine(work / "model", VllmOptions(multiprocessing=False))
        with screen.progress():
            summary = run.run(lambda: engine)
        screen.echo(
            f"   snapshot {summary.snapshot_id}: {summary.written} users, "
            f"{summary.users_per_s} users/s"
        )
        screen.say("5/5 service: REST + gRPC, vLLM in-process, answering real requests")
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        service = start_service(
            work / "model",
            work / "catalog",
            redis_proc.url,
            screen.log_path,
            env=env,
            wait_for="/readyz",
            timeout=600,
            append=True,
        )
        user = run.plan.users[0]
        seqs = read_interactions(inter)
        history = seqs.items[seqs.users.index(user)]  # the first planned user's own history
        fresh = [i for i in titles if i not in history][:2]
        _requests(screen, service, titles, user, history, fresh)
        _next_steps(screen, service, work, user, fresh, keep_running)
        if keep_running:
            service.process.wait()
    finally:
        if service is not None:
            service.stop(timeout=60)
        redis_proc.stop()


def _validation_quality(
    work: Path, interactions: Path, cfg: Any, decoder: dict[str, float]
) -> dict[str, float]:
    """Validation R@10 of the decoder (its own selection sample), and of the item-level model
    and co-visitation on the same users: what the trained demo is worth, beside the baseline."""
    from offline.data import leave_one_out, read_interactions
    from offline.eval.baselines import covisitation_baseline
    from offline.items.train import evaluate_item_model
    from offline.train.trainer import validation_sample
    from service.contracts.catalog import Catalog
    from service.contracts.item_model import ItemModel

    split = leave_one_out(read_interactions(interactions), cfg.max_history)
    sample = validation_sample(split.valid, cfg.val_users, cfg.seed)
    catalog = Catalog.load(work / "catalog")
    items = ItemModel.load(work / "model" / "items", catalog)
    return {
        "decoder": decoder["recall@10"],
        "items": evaluate_item_model(items, catalog, sample)["recall@10"],
        "covisit": covisitation_baseline(split.train, sample, 10)["recall@10"],
    }


def _requests(
    screen: Screen,
    service: ServiceProcess,
    titles: dict[str, str],
    user: str,
    history: list[str],
    fresh: list[str],
) -> None:
    base = service.base_url
    with httpx.Client(base_url=base, timeout=60) as http:
        screen.echo(f"   user {user} recently bought:")
        for item in history[-3:]:
            screen.echo(f"     - {titles.get(item, item)[:70]}")
        screen.echo(
            f"\n   POST {base}/v1/recommend {{user_id: {user}, k: 5, include_reasoning: true}}"
        )
        asked = {"user_id": user, "k": 5, "include_reasoning": True}
        screen.show(titles, http.post("/v1/recommend", json=asked).json())
        screen.echo(f"\n   POST /v1/events: the user just bought {[titles[i][:40] for i in fresh]}")
        http.post("/v1/events", json={"user_id": user, "item_ids": fresh})
        screen.show(titles, http.post("/v1/recommend", json={"user_id": user, "k": 5}).json())
        screen.echo("\n   a user the worker never saw (cold start):")
        cold = http.post("/v1/recommend", json={"user_id": "new-visitor", "k": 5})
        screen.show(titles, cold.json())
        screen.echo("\n   gRPC thinkahead.v1.Recommender/Recommend:")
        screen.show(titles, grpc_recommend(service.grpc_port, user))
        metrics = [
            line
            for line in http.get("/metrics").text.splitlines()
            if line.startswith("thinkahead_requests_total")
        ]
        screen.echo("\n   " + "\n   ".join(metrics))


def _next_steps(
    screen: Screen,
    service: ServiceProcess,
    work: Path,
    user: str,
    fresh: list[str],
    keep_running: bool,
) -> None:
    recommend = json.dumps({"user_id": user, "k": 5})
    events = json.dumps({"user_id": user, "item_ids": fresh})
    json_type = "-H 'content-type: application/json'"
    if keep_running:
        screen.say("Try it: the service stays up until Ctrl-C")
    else:
        screen.say("What to try next")
        screen.echo(
            "   keep the service up after the tour: scripts/demo.sh --keep-running\n"
            "   (it prints these with its own ports)"
        )
    screen.echo(
        f"   HTTP={service.base_url} GRPC={service.grpc_target}\n"
        f"   curl -s $HTTP/v1/recommend {json_type} -d '{recommend}'\n"
        f"   curl -s $HTTP/v1/events {json_type} -d '{events}'\n"
        f"   grpcurl -plaintext -d '{recommend}' $GRPC thinkahead.v1.Recommender/Recommend"
        "   # reflection is on\n"
        "   curl -s $HTTP/metrics | grep ^thinkahead_      # Prometheus metrics\n"
        "   $HTTP/docs in a browser: the OpenAPI page\n"
        f"   the same model in containers (deploy/README.md): deploy/compose-secrets.sh && "
        f"THINKAHEAD_ARTIFACTS={_for_compose(work)} THINKAHEAD_DATA={_for_compose(work)} "
        "docker compose up -d --build"
    )


def _for_compose(path: Path) -> str:
    """``path`` as compose resolves it (relative to the checkout, where its file is)."""
    try:
        return f"./{path.resolve().relative_to(ROOT)}"
    except ValueError:
        return str(path.resolve())


def grpc_recommend(port: int, user: str) -> dict[str, Any]:
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
