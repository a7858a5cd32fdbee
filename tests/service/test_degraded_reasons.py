"""Every ``degraded_reason`` the API documents, and the source that answers it, produced over
real HTTP (in-process app, fake engine, a redis-server of this module's own so it can be slowed
and killed): each answer is a full, flagged list of catalog items, never an error."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from service.contracts.manifest import SnapshotManifest
from service.contracts.snapshot import Keyspace, Prefix, UserPrefixes
from service.core import DegradedReason, Source
from tests.fake_engine import FAKE_MODEL_VERSION, FakeEngine, write_tiny_artifacts
from tests.helpers import RedisProcess, start_redis
from tests.inproc import InProc, make_settings, serve_in_process

KEYS = Keyspace("ta")
SID = "s-reasons"
MAX_AGE_S = 600


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    # DEBUG SLEEP makes Redis slow on demand
    proc = start_redis(
        tmp_path_factory.mktemp("reasons-redis"), extra_args=("--enable-debug-command", "yes")
    )
    yield proc
    proc.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def svc(
    tmp_path_factory: pytest.TempPathFactory, own_redis: RedisProcess
) -> AsyncIterator[InProc]:
    catalog_dir, model_dir = write_tiny_artifacts(tmp_path_factory.mktemp("reasons"))
    settings = make_settings(
        catalog_dir, model_dir, own_redis.url, redis={
            "url": own_redis.url, "snapshot_poll_s": 0.1, "max_snapshot_age_s": MAX_AGE_S,
        },
    )  # fmt: skip
    async with serve_in_process(settings, FakeEngine()) as inproc:
        yield inproc


def value(svc: InProc, prefixes: list[tuple[int, int]], **kw: object) -> bytes:
    args: dict = {  # type: ignore[type-arg]
        "model_version": FAKE_MODEL_VERSION,
        "catalog_version": svc.runtime.catalog.version,
        "computed_at": time.time(),
        "prefixes": tuple(Prefix(a, b, -0.1 * i) for i, (a, b) in enumerate(prefixes)),
        **kw,
    }
    return UserPrefixes(**args).encode()


async def publish(svc: InProc, own_redis: RedisProcess) -> None:
    r = own_redis.client()
    cat = svc.runtime.catalog
    manifest = SnapshotManifest(
        snapshot_id=SID, model_version=FAKE_MODEL_VERSION, catalog_version=cat.version
    )
    r.set(KEYS.manifest(SID), json.dumps(manifest.model_dump()))
    r.set(KEYS.current, SID)
    prefixes = sorted(cat.c_under_ab)[:4]
    r.set(KEYS.user(SID, "fresh"), value(svc, prefixes))
    r.set(KEYS.user(SID, "stale"), value(svc, prefixes, computed_at=time.time() - 2 * MAX_AGE_S))
    r.set(KEYS.user(SID, "foreign"), value(svc, prefixes, model_version="other-model"))
    r.set(KEYS.user(SID, "corrupt"), b"\x00\xffnot msgpack")
    r.set(KEYS.user(SID, "narrow"), value(svc, prefixes[:1]))
    r.close()
    await asyncio.sleep(0.3)  # > snapshot_poll_s


async def ask(http: httpx.AsyncClient, svc: InProc, user: str, **body: object) -> dict:  # type: ignore[type-arg]
    reply = await http.post("/v1/recommend", json={"user_id": user, "k": 5, **body})
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    items = [i["item_id"] for i in answer["items"]]
    assert len(items) == len(set(items)) == 5
    assert all(i in svc.runtime.catalog.row_of for i in items)
    return answer  # type: ignore[no-any-return]


@pytest.mark.asyncio(loop_scope="module")
async def test_every_degraded_reason_and_source(
    svc: InProc, http: httpx.AsyncClient, own_redis: RedisProcess
) -> None:
    """(degraded_reason, source) of each case; co-visitation answers, which need a table,
    are in test_recommend_covisit."""
    seen: dict[str, tuple[str | None, str]] = {}

    async def note(case: str, user: str, **body: object) -> None:
        answer = await ask(http, svc, user, **body)
        seen[case] = (answer["degraded_reason"], answer["source"])

    await note("no_snapshot", "fresh")
    await publish(svc, own_redis)
    await note("ok", "fresh", recent_item_ids=["1"])
    for user in ("stale", "foreign", "corrupt"):
        await note(user, user)
    await note("cold", "never-seen")
    # Every item under the user's only prefix excluded: nothing left to score there.
    cat = svc.runtime.catalog
    a, b = sorted(cat.c_under_ab)[0]
    under = [cat.item_ids[int(r)] for r in cat.rows_under_ab[(a, b)]]
    await note("narrow", "narrow", exclude_item_ids=under)
    svc.engine.delay_s = 0.5
    try:
        t0 = time.perf_counter()
        await note("slow_engine", "fresh", recent_item_ids=["2"], budget_ms=50)
        assert time.perf_counter() - t0 < 0.45
    finally:
        svc.engine.delay_s = 0.0
    blocker = asyncio.create_task(
        asyncio.to_thread(own_redis.client().execute_command, "DEBUG", "SLEEP", "0.4")
    )
    await asyncio.sleep(0.05)  # Redis is now busy for 0.35 s more
    await note("slow_redis", "fresh", budget_ms=50)
    await blocker
    svc.engine.down = True
    try:
        await note("engine", "fresh", recent_item_ids=["3"])
    finally:
        svc.engine.down = False
    # Everything excluded (history + exclusions cover the catalog): an empty answer that says so
    everything = list(svc.runtime.catalog.item_ids)
    reply = await http.post(
        "/v1/recommend",
        json={
            "user_id": "fresh",
            "k": 5,
            "strategy": "full_decode",
            "exclude_item_ids": everything,
        },
    )
    assert reply.status_code == 200, reply.text
    empty = reply.json()
    assert empty["items"] == [] and empty["degraded_reason"] == "all_excluded"
    await publish_for_another_model(svc, own_redis)
    await note("snapshot_mismatch", "fresh")
    own_redis.stop(kill=True)
    try:
        await note("redis", "fresh")
    finally:
        own_redis.restart()
    assert seen == {
        "no_snapshot": ("no_snapshot", "full_decode"),
        "ok": (None, "think_ahead"),
        "stale": ("stale_snapshot", "full_decode"),
        "foreign": ("version_mismatch", "full_decode"),
        "corrupt": ("corrupt_value", "full_decode"),
        "cold": ("no_prefixes", "full_decode"),
        "narrow": ("prefixes_excluded", "full_decode"),
        # the engine missed the budget: its prefixes' popular items, no second engine call
        "slow_engine": ("budget_exceeded", "fallback_prefix_popular"),
        # Redis missed it: nothing is known of the user, globally popular items
        "slow_redis": ("budget_exceeded", "fallback_global_popular"),
        "engine": ("engine_unavailable", "fallback_prefix_popular"),
        "snapshot_mismatch": ("version_mismatch", "full_decode"),
        "redis": ("redis_unavailable", "full_decode"),
    }


async def publish_for_another_model(svc: InProc, own_redis: RedisProcess) -> None:
    r = own_redis.client()
    other = SnapshotManifest(
        snapshot_id="s-other-model",
        model_version="another-model",
        catalog_version=svc.runtime.catalog.version,
    )
    r.set(KEYS.manifest(other.snapshot_id), json.dumps(other.model_dump()))
    r.set(KEYS.current, other.snapshot_id)
    r.close()
    await asyncio.sleep(0.3)  # > snapshot_poll_s


DOCUMENTED = (
    "no_snapshot", "no_prefixes", "version_mismatch", "stale_snapshot", "corrupt_value",
    "prefixes_excluded", "budget_exceeded", "redis_unavailable", "engine_unavailable",
    "all_excluded",
)  # fmt: skip


def test_reasons_match_the_documented_list() -> None:
    # the wire values (responses, the fallbacks metric's label) are the core's enum, unchanged
    assert sorted(DegradedReason) == sorted(DOCUMENTED)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for reason in DOCUMENTED:
        assert f"`{reason}`" in readme, reason


def test_every_source_has_its_own_grpc_value_and_is_documented() -> None:
    from service.api.grpc_api import _SOURCES

    assert set(_SOURCES) == {source.value for source in Source}
    assert len(set(_SOURCES.values())) == len(_SOURCES) and 0 not in _SOURCES.values()
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for source in Source:
        assert f"`{source.value}`" in readme, source
