"""Session fixtures: a real redis-server on a free loopback port, a tiny catalog and decoder
trained here on synthetic sequences, and a vLLM engine (CPU build) over that decoder; and the
rule that makes ``-m "not slow"`` the fast layer."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis

from tests.helpers import RedisProcess, random_catalog_csv, start_redis, synthetic_interactions

# vLLM's offline engine in-process starts in seconds instead of spawning an engine core.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_ITEMS = 300
TINY_USERS = 400
TINY_K = 16

# Fixtures whose set-up takes tens of seconds: training the tiny decoder, starting vLLM.
SLOW_FIXTURES = frozenset({"tiny_world", "batch_engine"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``-m "not slow"`` is the fast layer: every test that needs vLLM or the trained tiny
    model is also ``slow``, whatever its module says."""
    for item in items:
        needs = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("vllm") is not None or needs & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> Iterator[str]:
    """A clean database for one test (flushed before and after)."""
    client = redis.Redis(port=redis_server.port)
    if redis_server.process.poll() is not None:
        redis_server.restart()
    client.flushall()
    yield redis_server.url
    with contextlib.suppress(redis.ConnectionError):
        client.flushall()
    client.close()


@dataclass(frozen=True)
class TinyWorld:
    root: Path
    items_csv: Path
    interactions_csv: Path
    catalog_dir: Path
    model_dir: Path

    def cli_args(self) -> list[str]:
        """``--model --catalog --interactions`` for commands run on this world."""
        return [
            "--model", str(self.model_dir),
            "--catalog", str(self.catalog_dir),
            "--interactions", str(self.interactions_csv),
        ]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    """A 300-item catalog (K=16, random content vectors) and a 2-layer decoder trained for a
    few epochs on synthetic sequential sequences: small, real, and built once per session."""
    from offline.catalog.build import CatalogSpec, build_catalog
    from offline.train.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny")
    items = root / "items.csv"
    inter = root / "interactions.csv"
    vectors = root / "vectors.npy"
    random_catalog_csv(items, TINY_ITEMS)
    synthetic_interactions(inter, TINY_ITEMS, TINY_USERS)
    rng = np.random.default_rng(0)
    np.save(vectors, rng.normal(size=(TINY_ITEMS, 16)).astype(np.float32))
    build_catalog(
        items,
        root / "catalog",
        CatalogSpec(codebook_size=TINY_K, cf_dim=8, holdout_last=2),
        interactions=inter,
        embeddings=vectors,
        show_progress=False,
    )
    train(
        root / "catalog",
        inter,
        root / "model",
        TrainConfig(preset="tiny", epochs=4, batch_size=32, val_users=100, warmup_steps=20),
        progress=False,
    )
    return TinyWorld(root, items, inter, root / "catalog", root / "model")


@pytest.fixture(scope="session")
def batch_engine(tiny_world: TinyWorld):  # type: ignore[no-untyped-def]
    from service.engine.vllm_engine import VllmBatchEngine, VllmOptions

    engine = VllmBatchEngine(tiny_world.model_dir, VllmOptions(multiprocessing=False))
    yield engine
    engine.close()
