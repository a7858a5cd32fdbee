"""The re-think path under faults, all real processes: ``thinkahead serve`` (vLLM), a Redis with
an append-only file, and a ``thinkahead rethink`` worker, under a stream of events and
recommends. The worker is killed mid-run and restarted, Redis is killed and restarted; then:
no acknowledged event is lost, every user who acted ends with an entry for their current
history (none was left for a stale one), and every recommend was answered."""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import redis

from offline.localproc import launch_env, start_redis, start_service
from offline.thinkahead.rethink import GROUP
from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
from service.contracts.snapshot import Keyspace, UserPrefixes, history_digest

pytestmark = pytest.mark.vllm
KEYS = Keyspace()
AOF = ("--appendonly", "yes", "--appendfsync", "always")  # an acknowledged write survives


def start_worker(world, url: str, log: Path) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    return subprocess.Popen(
        [
            sys.executable, "-m", "offline.cli", "rethink",
            "--model", str(world.model_dir), "--catalog", str(world.catalog_dir),
            "--redis", url, "--engine", "torch",
            "--batch-users", "4", "--block-ms", "100", "--claim-idle-s", "1",
        ],
        env=launch_env(None),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip


class Traffic:
    """Events and recommends for a few users until stopped; what was acknowledged."""

    def __init__(self, base: str, users: list[str], items: list[str]) -> None:
        self.base, self.users, self.items = base, users, items
        self.acked: dict[str, list[str]] = defaultdict(list)
        self.statuses: dict[str, list[int]] = defaultdict(list)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(0)
        with httpx.Client(base_url=self.base, timeout=30) as http:
            while not self.stop.is_set():
                user = rng.choice(self.users)
                item = rng.choice(self.items)
                try:
                    r = http.post("/v1/events", json={"user_id": user, "item_ids": [item]})
                    self.statuses["events"].append(r.status_code)
                    if r.status_code == 200:
                        self.acked[user].append(item)
                    r = http.post("/v1/recommend", json={"user_id": user, "k": 5})
                    self.statuses["recommend"].append(r.status_code)
                except httpx.HTTPError:
                    self.statuses["transport"].append(0)
                time.sleep(0.1)  # histories stay under the cap: nothing trimmed


def test_rethink_survives_a_killed_worker_and_a_restarted_redis(tiny_world, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from offline.decode.torch_engine import TorchBatchEngine

    redis_proc = start_redis(tmp_path / "redis", extra_args=AOF)
    url = redis_proc.url
    job = ThinkAheadJob(prefixes=6, beam=6, answer_items=10, grace_s=0, max_users=40)
    run = ThinkAheadRun(tiny_world.model_dir, tiny_world.catalog_dir, tiny_world.interactions_csv,
                        url, job)  # fmt: skip
    run.seed_histories(tiny_world.interactions_csv)
    run.run(lambda: TorchBatchEngine(tiny_world.model_dir, run.model.token_ids), progress=False)
    users = run.plan.users[:16]
    service = start_service(
        tiny_world.model_dir, tiny_world.catalog_dir, url, tmp_path / "service.log",
        wait_for="/readyz", timeout=600,
    )  # fmt: skip
    worker = start_worker(tiny_world, url, tmp_path / "rethink.log")
    killed: subprocess.Popen[bytes] | None = None
    traffic = Traffic(service.base_url, users, run.catalog.item_ids[:40])
    try:
        traffic.thread.start()
        time.sleep(8)
        worker.send_signal(signal.SIGKILL)  # mid-run: it batches continuously under this load
        # a SIGKILLed process runs no more user code, so its successor need not wait for the
        # kernel to reap it (on this 2-core VM that once took minutes while vLLM's worker spun)
        killed = worker
        time.sleep(1)
        worker = start_worker(tiny_world, url, tmp_path / "rethink.log")
        time.sleep(6)
        redis_proc.stop(kill=True)  # Redis gone: the service answers without it
        time.sleep(2)
        redis_proc.restart()
        time.sleep(8)
        traffic.stop.set()
        traffic.thread.join(timeout=60)
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            (group,) = [g for g in client.xinfo_groups(KEYS.events) if g["name"] == GROUP.encode()]
            if group["pending"] == 0 and not group.get("lag"):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the stream was not drained: {group}")
        time.sleep(1)  # the batch whose entries were acknowledged last has been written
        # every recommend was answered (fallbacks while Redis was away), nothing crashed
        assert traffic.statuses["recommend"] and set(traffic.statuses["recommend"]) == {200}
        assert set(traffic.statuses["events"]) <= {200, 503}  # Redis away: refused, not lost
        sid = client.get(KEYS.current).decode()
        catalog = run.catalog
        for user, acked in traffic.acked.items():
            history = [i.decode() for i in reversed(client.lrange(KEYS.history(user), 0, -1))]
            # no acknowledged event lost: they are the newest items, in order
            it = iter(history)
            assert all(item in it for item in acked), user
            value = UserPrefixes.decode(client.get(KEYS.user(sid, user)))
            codes = catalog.codes_of(history)[0][-run.model.max_history :]
            assert value.history_digest == history_digest(codes), user  # not a stale entry
        assert sum(len(a) for a in traffic.acked.values()) > 50
    finally:
        traffic.stop.set()
        for process in (worker, killed):
            if process is not None:
                process.kill()
                # bounded: the kernel's reaping is not what this test is about
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=60)
        service.stop(timeout=60)
        redis_proc.stop(kill=True)
