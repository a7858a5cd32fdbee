"""Shared test building blocks: real redis-server processes, a tiny trained world, free ports."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from offline.localproc import (
    RedisProcess,
    ServiceProcess,
    free_port,
    free_ports,
    port_is_free,
    redis_server_binary,
    start_redis,
)
from offline.localproc import start_service as _start_service
from service.contracts.catalog import Catalog
from service.contracts.manifest import CatalogManifest

# the fallback tier: co-visitation of recent items, else popular under prefixes, else popular
FALLBACK_SOURCES = (
    "fallback_item_level",
    "fallback_covisitation",
    "fallback_prefix_popular",
    "fallback_global_popular",
)

__all__ = [
    "RedisProcess",
    "ServiceProcess",
    "free_port",
    "free_ports",
    "redis_server_binary",
    "start_redis",
]


def start_service(*args, env: dict[str, str] | None = None, **kwargs) -> ServiceProcess:  # type: ignore[no-untyped-def]
    """The service with a fast snapshot poll, so flips show within a test's patience, and the
    largest default budget: which source answers must not hang on how loaded the test machine is
    (a full decode on a busy CI box took over the 250 ms default). Budget tests pass their own."""
    defaults = {
        "THINKAHEAD_REDIS__SNAPSHOT_POLL_S": "0.2",
        "THINKAHEAD_RECOMMEND__DEFAULT_BUDGET_MS": "2000",
        # likewise whether a fresh user gets the engine round: the budget alone decides here
        # (the load rule has its own tests, tests/service/test_fresh_paths.py)
        "THINKAHEAD_RECOMMEND__FRESH_ROUND_TARGET_MS": "60000",
    }
    return _start_service(*args, env={**defaults, **(env or {})}, **kwargs)


def tiny_catalog() -> Catalog:
    """Five items over K=4, in memory: (0,0,0) (0,0,1) (0,1,0) (1,0,0) (1,0,2)."""
    codes = np.array([(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 0, 2)], dtype=np.int32)
    ids = [f"i{i}" for i in range(len(codes))]
    manifest = CatalogManifest(
        catalog_version="v", codebook_size=4, num_items=5, embedding_model="test"
    )
    return Catalog(manifest, ids, codes, np.array([5.0, 1, 3, 2, 4]))


def random_catalog_csv(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "soft", "matte", "gloss", "nail", "hair", "skin", "oil", "cream"]
    with path.open("w") as f:
        f.write("item_id,title,categories\n")
        for i in range(1, n + 1):
            title = " ".join(rng.choice(words, size=3))
            f.write(f"{i},{title} {i},Beauty > {rng.choice(words)}\n")


def synthetic_interactions(path: Path, n_items: int, n_users: int, seed: int = 0) -> None:
    """Users walk through neighbouring item ids: sequential structure a model can learn."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        f.write("user_id,item_id,timestamp\n")
        for u in range(1, n_users + 1):
            start = int(rng.integers(0, n_items))
            length = int(rng.integers(5, 12))
            seen: set[int] = set()
            t = 0
            item = start
            while len(seen) < length:
                if item not in seen:
                    seen.add(item)
                    f.write(f"u{u},{item + 1},{t}\n")
                    t += 1
                item = (item + int(rng.integers(1, 4))) % n_items


def redis_cli_binary() -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        raise RuntimeError("redis-cli not found: `apt-get install redis-tools` (or redis-server)")
    return binary


def free_cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        (port,) = free_ports(1, taken | {p - 10000 for p in taken})
        if port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class RedisClusterProcess:
    """A real Redis Cluster of local redis-server processes, masters only (no replicas)."""

    nodes: list[RedisProcess]

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def url(self) -> str:
        """One node's URL: a cluster client discovers the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def node_clients(self) -> list[redis.Redis]:
        """Plain (non-cluster) clients, one per node, to see where keys really live."""
        return [redis.Redis(port=p) for p in self.ports]

    def flush(self) -> None:
        for client in self.node_clients():
            client.flushall()
            client.close()

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every running node reports ``cluster_state:ok`` and knows every node."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.process.poll() is not None:
                continue
            while True:
                client = node.client()
                try:
                    text = client.execute_command("CLUSTER", "INFO").decode()
                except redis.ConnectionError:
                    text = ""
                finally:
                    client.close()
                if "cluster_state:ok" in text and f"cluster_known_nodes:{len(self.nodes)}" in text:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster not ok on port {node.port} in {timeout}s:\n{text}")
                time.sleep(0.1)

    def restart_node(self, index: int, timeout: float = 30) -> None:
        """Start a stopped node again on its port and node config (it rejoins, empty)."""
        self.nodes[index].restart()
        self.wait_ok(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            try:
                node.stop()
            except subprocess.TimeoutExpired:
                node.stop(kill=True)


def start_redis_cluster(
    workdir: Path, masters: int = 3, timeout: float = 30
) -> RedisClusterProcess:
    """Start ``masters`` cluster-enabled redis-servers, join them with ``redis-cli --cluster
    create`` (no replicas) and wait for ``cluster_state:ok`` on every node. On any failure the
    started processes are stopped before the error propagates."""
    workdir.mkdir(parents=True, exist_ok=True)
    nodes: list[RedisProcess] = []
    taken: set[int] = set()
    try:
        for _ in range(masters):
            port = free_cluster_port(taken)
            taken.update((port, port + 10000))
            args = (
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(workdir / f"nodes-{port}.conf"),
                "--cluster-node-timeout",
                "5000",
            )
            nodes.append(start_redis(workdir / f"node-{port}", port, args))
        create = subprocess.run(
            [
                redis_cli_binary(),
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=timeout,
        )
        if create.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({create.returncode}):\n"
                + create.stdout.decode(errors="replace")[-2000:]
                + create.stderr.decode(errors="replace")[-2000:]
            )
        cluster = RedisClusterProcess(nodes)
        cluster.wait_ok(timeout)
    except BaseException:
        for node in nodes:
            node.stop(kill=True)
        raise
    return cluster


def vllm_serve_command(model_dir: Path, port: int) -> list[str]:
    """A CPU-sized ``vllm serve`` (OpenAI server) for the remote engine, with the flags the
    remote engine needs (processed log-probs, prefix caching, 256 log-probs)."""
    import sys

    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--skip-tokenizer-init",
        "--port", str(port), "--host", "127.0.0.1",
        "--logprobs-mode", "processed_logprobs", "--enable-prefix-caching",
        "--max-logprobs", "256", "--block-size", "32", "--dtype", "float32",
        "--max-model-len", "512", "--kv-cache-memory-bytes", str(256 << 20),
    ]  # fmt: skip


@dataclass
class CliResult:
    exit_code: int
    output: str


def run_cli(*args: str, timeout: float = 1800) -> CliResult:
    """``thinkahead ARGS`` in a child process: commands that build a vLLM engine must not share
    this process with the session's in-process engine (vLLM keeps process-global state)."""
    import os
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "offline.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ},
    )
    return CliResult(proc.returncode, proc.stdout + proc.stderr)
