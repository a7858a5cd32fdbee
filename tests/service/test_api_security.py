"""Access, limits and reliability over real HTTP and real gRPC on loopback: the apps run
in-process over a fake engine and a real redis-server (tests/inproc.py), so every auth outcome,
the body cap, rate limits, idempotent events, the engine breaker and readiness are checked
through the same middleware and interceptor production runs, in seconds."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.access.auth import hash_key
from service.api._proto.thinkahead.v1 import recommender_pb2 as pb
from service.api._proto.thinkahead.v1 import recommender_pb2_grpc as pb_grpc
from service.contracts.manifest import SnapshotManifest
from service.contracts.snapshot import Keyspace
from service.engine.breaker import BreakerState
from tests.fake_engine import FakeEngine, write_tiny_artifacts
from tests.helpers import RedisProcess
from tests.inproc import (
    BACKEND_KEY,
    LIMITED_KEY,
    READER_KEY,
    InProc,
    bearer,
    make_settings,
    serve_in_process,
    write_keys,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")
KEYS = Keyspace("ta")
MiB = 1 << 20


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny_artifacts(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_keys(tmp_path_factory.mktemp("keys") / "keys.json")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def svc(
    artifacts: tuple[Path, Path], keys_file: Path, redis_server: RedisProcess
) -> AsyncIterator[InProc]:
    catalog_dir, model_dir = artifacts
    settings = make_settings(
        catalog_dir,
        model_dir,
        redis_server.url,
        auth={"keys_file": keys_file, "reload_s": 0.05},
    )
    async with serve_in_process(settings, FakeEngine()) as inproc:
        yield inproc


@pytest_asyncio.fixture(loop_scope="module")
async def stub(svc: InProc) -> AsyncIterator[pb_grpc.RecommenderStub]:
    async with grpc.aio.insecure_channel(svc.grpc_target) as channel:
        yield pb_grpc.RecommenderStub(channel)


def rdb(svc: InProc) -> redis.Redis:
    return redis.Redis.from_url(svc.settings.redis.url)


def metric(text: str, line_prefix: str) -> float:
    """The value of the one sample whose line starts with ``line_prefix`` (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def grpc_code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code()


# ------------------------------------------------------------------------------ authentication


@pytest.mark.parametrize(
    ("headers", "path", "status", "error_type"),
    [
        ({}, "/v1/recommend", 401, "unauthenticated"),
        ({}, "/v1/events", 401, "unauthenticated"),
        (bearer("not-a-key"), "/v1/recommend", 401, "unauthenticated"),
        ({"authorization": f"Basic {READER_KEY}"}, "/v1/recommend", 401, "unauthenticated"),
        (bearer(READER_KEY), "/v1/events", 403, "permission_denied"),
        (bearer(READER_KEY), "/v1/recommend", 200, None),
        (bearer(BACKEND_KEY), "/v1/recommend", 200, None),
        (bearer(BACKEND_KEY), "/v1/events", 200, None),
    ],
)
async def test_rest_auth_outcomes(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    path: str,
    status: int,
    error_type: str | None,
) -> None:
    body = {"user_id": "auth-user", "k": 3}
    if path == "/v1/events":
        body = {"user_id": "auth-user", "item_ids": ["1"]}
    reply = await http.post(path, json=body, headers=headers)
    assert reply.status_code == status, reply.text
    if error_type is not None:
        assert reply.json()["error"]["type"] == error_type
        assert reply.json()["error"]["code"] == status
    if status == 401:
        assert reply.headers["www-authenticate"].startswith("Bearer")


async def test_health_readiness_metrics_and_docs_stay_open(http: httpx.AsyncClient) -> None:
    assert (await http.get("/livez")).status_code == 200
    assert (await http.get("/readyz")).status_code in (200, 503)  # never 401
    assert (await http.get("/metrics")).status_code == 200
    schema = (await http.get("/openapi.json")).json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    for path in ("/v1/recommend", "/v1/events"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"401", "403", "413", "422", "429", "503"} <= set(responses)
        assert schema["paths"][path]["post"]["security"] == [{"HTTPBearer": []}]


async def test_grpc_auth_outcomes(svc: InProc, stub: pb_grpc.RecommenderStub) -> None:
    rec = pb.RecommendRequest(user_id="auth-user", k=3)
    events = pb.AppendEventsRequest(user_id="auth-user", item_ids=["1"])
    auth = lambda key: (("authorization", f"Bearer {key}"),)  # noqa: E731
    assert await grpc_code(stub.Recommend(rec)) == grpc.StatusCode.UNAUTHENTICATED
    assert await grpc_code(stub.AppendEvents(events)) == grpc.StatusCode.UNAUTHENTICATED
    bad = stub.Recommend(rec, metadata=auth("not-a-key"))
    assert await grpc_code(bad) == grpc.StatusCode.UNAUTHENTICATED
    denied = stub.AppendEvents(events, metadata=auth(READER_KEY))
    assert await grpc_code(denied) == grpc.StatusCode.PERMISSION_DENIED
    assert len((await stub.Recommend(rec, metadata=auth(READER_KEY))).items) == 3
    assert len((await stub.Recommend(rec, metadata=auth(BACKEND_KEY))).items) == 3
    assert (await stub.AppendEvents(events, metadata=auth(BACKEND_KEY))).history_length >= 1
    async with grpc.aio.insecure_channel(svc.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_keys_file_is_reloaded_on_change(http: httpx.AsyncClient, keys_file: Path) -> None:
    fresh = "fresh-key-added-later"
    body = {"user_id": "reload-user", "k": 2}
    assert (await http.post("/v1/recommend", json=body, headers=bearer(fresh))).status_code == 401
    original = keys_file.read_text()
    try:
        entry = {"name": "fresh", "sha256": hash_key(fresh), "scopes": ["recommend"]}
        write_keys(keys_file, entry)
        await asyncio.sleep(0.1)  # > reload_s
        ok = await http.post("/v1/recommend", json=body, headers=bearer(fresh))
        assert ok.status_code == 200
        keys_file.write_text("{ half written")  # a broken update keeps the last good keys
        await asyncio.sleep(0.1)
        still = await http.post("/v1/recommend", json=body, headers=bearer(fresh))
        assert still.status_code == 200
    finally:
        keys_file.write_text(original)
    await asyncio.sleep(0.1)
    gone = await http.post("/v1/recommend", json=body, headers=bearer(fresh))
    assert gone.status_code == 401


async def test_one_gate_counts_both_transports_alike(
    svc: InProc, http: httpx.AsyncClient, stub: pb_grpc.RecommenderStub
) -> None:
    before = (await http.get("/metrics")).text
    await http.post("/v1/recommend", json={"user_id": "m", "k": 2})
    await grpc_code(stub.Recommend(pb.RecommendRequest(user_id="m", k=2)))
    await http.post("/v1/recommend", json={"user_id": "m", "k": 2}, headers=bearer(BACKEND_KEY))
    auth = (("authorization", f"Bearer {BACKEND_KEY}"),)
    await stub.Recommend(pb.RecommendRequest(user_id="m", k=2), metadata=auth)
    # Invalid input, past auth: rejected over both transports the same way.
    await http.post("/v1/recommend", json={"user_id": "m", "k": -1}, headers=bearer(BACKEND_KEY))
    await grpc_code(
        stub.Recommend(
            pb.RecommendRequest(user_id="m", k=-1),
            metadata=(("authorization", f"Bearer {BACKEND_KEY}"),),
        )
    )
    after = (await http.get("/metrics")).text
    unauth = 'thinkahead_rejected_requests_total{reason="unauthenticated"}'
    invalid = 'thinkahead_rejected_requests_total{reason="invalid"}'
    assert metric(after, unauth) - metric(before, unauth) == 2
    assert metric(after, invalid) - metric(before, invalid) == 2
    for transport in ("http", "grpc"):
        # (the exposition sorts labels by name)
        ok = (
            'thinkahead_api_calls_total{key="backend",method="recommend",outcome="ok",'
            f'transport="{transport}"}}'
        )
        refused = (
            'thinkahead_api_calls_total{key="none",method="recommend",'
            f'outcome="unauthenticated",transport="{transport}"}}'
        )
        assert metric(after, ok) - metric(before, ok) == 1
        assert metric(after, refused) - metric(before, refused) == 1
        req = (
            'thinkahead_requests_total{outcome="invalid_request",source="none",'
            f'transport="{transport}"}}'
        )
        assert metric(after, req) - metric(before, req) == 1
    for secret in (BACKEND_KEY, READER_KEY, LIMITED_KEY):
        assert secret not in after


# ------------------------------------------------------------------------------ limits


async def test_body_over_the_cap_is_413_unparsed(svc: InProc, http: httpx.AsyncClient) -> None:
    big = b'{"user_id": "u", "k": 3, "pad": "' + b"x" * MiB + b'"}'
    headers = {**bearer(BACKEND_KEY), "content-type": "application/json"}
    reply = await http.post("/v1/recommend", content=big, headers=headers)
    assert reply.status_code == 413
    assert reply.json()["error"]["type"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(16):
            yield b" " * (64 * 1024)

    chunked = await http.post("/v1/events", content=chunks(), headers=headers)
    assert chunked.status_code == 413
    small = b'{"user_id": "u", "k": 3}'

    async def one_chunk() -> AsyncIterator[bytes]:
        yield small

    fine = await http.post("/v1/recommend", content=one_chunk(), headers=headers)
    assert fine.status_code == 200
    text = (await http.get("/metrics")).text
    assert metric(text, 'thinkahead_rejected_requests_total{reason="payload_too_large"}') >= 2


async def test_grpc_message_over_the_cap_is_resource_exhausted(
    svc: InProc, stub: pb_grpc.RecommenderStub
) -> None:
    request = pb.AppendEventsRequest(user_id="u", item_ids=["x" * 1024] * 1024)  # ~1 MiB
    assert request.ByteSize() > svc.settings.max_body_bytes
    call = stub.AppendEvents(request, metadata=(("authorization", f"Bearer {BACKEND_KEY}"),))
    assert await grpc_code(call) == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_per_key_rate_limit_429_and_resource_exhausted(
    http: httpx.AsyncClient, stub: pb_grpc.RecommenderStub
) -> None:
    body = {"user_id": "limited-user", "k": 2}
    codes = [
        (await http.post("/v1/recommend", json=body, headers=bearer(LIMITED_KEY))).status_code
        for _ in range(2)
    ]
    assert codes == [200, 200]  # the burst
    limited = await http.post("/v1/recommend", json=body, headers=bearer(LIMITED_KEY))
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Recommend(
            pb.RecommendRequest(user_id="limited-user", k=2),
            metadata=(("authorization", f"Bearer {LIMITED_KEY}"),),
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(info.value.trailing_metadata() or ())["retry-after"] == "1"
    # Another key is untouched by this key's limit.
    other = await http.post("/v1/recommend", json=body, headers=bearer(BACKEND_KEY))
    assert other.status_code == 200


# ------------------------------------------------------------------------------ idempotent events


async def test_retried_events_batch_is_appended_once_rest(
    svc: InProc, http: httpx.AsyncClient
) -> None:
    user = "idem-rest"
    body = {"user_id": user, "item_ids": ["1", "2", "no-such-item"], "idempotency_key": "b-1"}
    first = await http.post("/v1/events", json=body, headers=bearer(BACKEND_KEY))
    again = await http.post("/v1/events", json=body, headers=bearer(BACKEND_KEY))
    assert first.status_code == again.status_code == 200
    answer = {"history_length": 2, "unknown_item_ids": ["no-such-item"]}
    assert first.json() == again.json() == answer
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    r = rdb(svc)
    assert r.llen(KEYS.history(user)) == 2
    record = f"{KEYS.history(user)}:idem:b-1"
    assert 0 < r.pttl(record) <= svc.settings.redis.idempotency_window_s * 1000
    # Another batch under the same key is a client bug, refused; a new key appends.
    clash = {**body, "item_ids": ["3"]}
    refused = await http.post("/v1/events", json=clash, headers=bearer(BACKEND_KEY))
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "idempotency_key"
    fresh = {**body, "idempotency_key": "b-2"}
    assert (await http.post("/v1/events", json=fresh, headers=bearer(BACKEND_KEY))).json()[
        "history_length"
    ] == 4
    assert r.llen(KEYS.history(user)) == 4


async def test_concurrent_retries_append_once_grpc(
    svc: InProc, stub: pb_grpc.RecommenderStub
) -> None:
    user = "idem-grpc"
    request = pb.AppendEventsRequest(user_id=user, item_ids=["5", "6", "7"], idempotency_key="k9")
    auth = (("authorization", f"Bearer {BACKEND_KEY}"),)
    replies = await asyncio.gather(*(stub.AppendEvents(request, metadata=auth) for _ in range(10)))
    assert {r.history_length for r in replies} == {3}
    assert rdb(svc).llen(KEYS.history(user)) == 3
    call = stub.AppendEvents(request, metadata=auth)
    assert (await call).history_length == 3
    assert ("idempotent-replayed", "true") in tuple(await call.initial_metadata())
    # Without a key every call appends, as before.
    plain = pb.AppendEventsRequest(user_id=user, item_ids=["8"])
    await stub.AppendEvents(plain, metadata=auth)
    await stub.AppendEvents(plain, metadata=auth)
    assert rdb(svc).llen(KEYS.history(user)) == 5


# ------------------------------------------------------------------------------ breaker, readiness


async def test_engine_breaker_opens_then_recovers_with_no_request(
    svc: InProc, http: httpx.AsyncClient
) -> None:
    engine, breaker = svc.engine, svc.runtime.breaker
    headers = bearer(BACKEND_KEY)
    # the largest budget: a loaded machine must not turn the healthy answer into a fallback;
    # one recent item: a user with no history at all is answered from the shared cold decode
    body = {
        "user_id": "cold-breaker-user",
        "k": 3,
        "budget_ms": svc.settings.recommend.max_budget_ms,
        "recent_item_ids": [svc.runtime.catalog.item_ids[0]],
    }
    healthy = (await http.post("/v1/recommend", json=body, headers=headers)).json()
    assert healthy["source"] == "full_decode"  # no entry, engine up
    engine.down = True
    try:
        for _ in range(svc.settings.engine.breaker.failures):
            reply = (await http.post("/v1/recommend", json=body, headers=headers)).json()
            assert reply["source"].startswith("fallback_")
        assert breaker.state is BreakerState.OPEN
        calls = engine.calls
        reply = (await http.post("/v1/recommend", json=body, headers=headers)).json()
        assert reply["source"].startswith("fallback_")
        assert engine.calls - calls <= 1  # open: requests no longer call the engine (probes may)
        ready = (await http.get("/readyz")).json()
        assert ready["checks"]["engine_breaker"] is False and ready["ready"] is False
        text = (await http.get("/metrics")).text
        assert metric(text, "thinkahead_engine_breaker_state ") == 2
    finally:
        engine.down = False
    # No request: the background probe closes the breaker within its interval.
    t0 = time.monotonic()
    while breaker.state is not BreakerState.CLOSED and time.monotonic() - t0 < 5:
        await asyncio.sleep(0.05)
    waited = time.monotonic() - t0
    assert breaker.state is BreakerState.CLOSED
    assert waited < svc.settings.engine.breaker.probe_interval_s + 0.5
    again = (await http.post("/v1/recommend", json=body, headers=headers)).json()
    assert again["source"] == "full_decode"
    text = (await http.get("/metrics")).text
    assert metric(text, "thinkahead_engine_breaker_state ") == 0
    assert metric(text, 'thinkahead_engine_breaker_transitions_total{state="half_open"}') >= 1


async def test_readiness_fails_when_the_snapshot_is_for_another_model(
    svc: InProc, http: httpx.AsyncClient
) -> None:
    r = rdb(svc)
    rt = svc.runtime

    async def checks_after_poll() -> dict[str, bool]:
        await asyncio.sleep(0.35)  # > snapshot_poll_s
        return (await http.get("/readyz")).json()["checks"]

    good = SnapshotManifest(
        snapshot_id="s-good", model_version=rt.model.version, catalog_version=rt.catalog.version
    )
    foreign = SnapshotManifest(
        snapshot_id="s-foreign", model_version="another-model", catalog_version=rt.catalog.version
    )
    try:
        for manifest in (good, foreign):
            r.set(KEYS.manifest(manifest.snapshot_id), json.dumps(manifest.model_dump()))
        r.set(KEYS.current, "s-good")
        checks = await checks_after_poll()
        assert checks["snapshot"] and checks["catalog_and_model"], checks
        r.set(KEYS.current, "s-foreign")
        checks = await checks_after_poll()
        assert checks["catalog_and_model"] is False and checks["snapshot"] is False
    finally:
        r.delete(KEYS.current)
        await checks_after_poll()
