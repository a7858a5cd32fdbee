"""End to end: `thinkahead serve` as a real process (AsyncLLM engine on CPU), a real
redis-server, a real think-ahead snapshot, real HTTP and real gRPC over loopback.

The service and Redis are shared by the module (starting vLLM takes a while); every test starts
from the same state whatever ran before it (``as_published``: Redis up, the published snapshot
current, histories as seeded), and the one that stops the service gets a process of its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
from service.api._proto.thinkahead.v1 import recommender_pb2 as pb
from service.api._proto.thinkahead.v1 import recommender_pb2_grpc as pb_grpc
from service.contracts.catalog import Catalog
from service.contracts.snapshot import Keyspace, Prefix, UserPrefixes
from tests.helpers import FALLBACK_SOURCES, RedisProcess, ServiceProcess, start_redis, start_service

pytestmark = pytest.mark.vllm
KEYS = Keyspace("ta")


@dataclass
class Stack:
    service: ServiceProcess
    redis: RedisProcess
    catalog: Catalog
    run: ThinkAheadRun
    ready_before_snapshot: httpx.Response
    http: httpx.Client
    grpc_channel: grpc.Channel
    snapshot_id: str = ""

    def recommend(self, **body: Any) -> httpx.Response:
        return self.http.post("/v1/recommend", json=body)

    def stub(self) -> pb_grpc.RecommenderStub:
        return pb_grpc.RecommenderStub(self.grpc_channel)

    def user_with_prefixes(self, i: int = 0) -> tuple[str, list[str]]:
        user = self.run.plan.users[i]
        history = [
            self.catalog.item_ids[self.catalog.row_by_code[c]] for c in self.run.plan.histories[i]
        ]
        return user, history


def publish(stack_run: ThinkAheadRun, engine: Any) -> str:
    return stack_run.run(lambda: engine, progress=False).snapshot_id


def metric(text: str, series: str) -> float:
    """The value of one exposition line (``name{labels}``), 0 when absent."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until_serving(stack: Stack, snapshot_id: str, timeout_s: float = 30) -> None:
    user = stack.run.plan.users[0]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = stack.recommend(user_id=user, k=1)
        current = reply.status_code == 200 and reply.json()["snapshot_id"] == snapshot_id
        if current and stack.http.get("/readyz").status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"the service did not come back to snapshot {snapshot_id}")


@pytest.fixture(scope="module")
def stack(tiny_world, batch_engine, tmp_path_factory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("svc")
    redis_proc = start_redis(root / "redis")
    service = start_service(
        tiny_world.model_dir,
        tiny_world.catalog_dir,
        redis_proc.url,
        root / "service.log",
        env={"THINKAHEAD_RECOMMEND__MAX_IN_FLIGHT": "4"},
    )
    http = httpx.Client(base_url=service.base_url, timeout=30)
    channel = grpc.insecure_channel(service.grpc_target)
    try:
        ready_before = http.get("/readyz")
        run = ThinkAheadRun(
            tiny_world.model_dir,
            tiny_world.catalog_dir,
            tiny_world.interactions_csv,
            redis_proc.url,
            ThinkAheadJob(prefixes=8, beam=8),
        )
        run.seed_histories(tiny_world.interactions_csv)
        stack = Stack(service, redis_proc, run.catalog, run, ready_before, http, channel)
        stack.snapshot_id = publish(run, batch_engine)
        wait_until_serving(stack, stack.snapshot_id)
        yield stack
    finally:
        channel.close()
        http.close()
        service.stop()
        redis_proc.stop()


@pytest.fixture(autouse=True)
def as_published(stack: Stack, batch_engine, tiny_world) -> None:  # type: ignore[no-untyped-def]
    """Undo what an earlier test changed: a stopped or emptied Redis, another current
    snapshot, appended events."""
    if stack.redis.process.poll() is not None:
        stack.redis.restart()
    r = redis.Redis(port=stack.redis.port)
    try:
        stack.run.seed_histories(tiny_world.interactions_csv)
        if r.get(KEYS.manifest(stack.snapshot_id)) is None:  # Redis lost its data
            stack.snapshot_id = publish(stack.run, batch_engine)
        elif r.get(KEYS.current) != stack.snapshot_id.encode():
            r.set(KEYS.current, stack.snapshot_id)
        else:
            return
    finally:
        r.close()
    wait_until_serving(stack, stack.snapshot_id)


def test_readiness_waits_for_a_matching_snapshot(stack: Stack) -> None:
    assert stack.ready_before_snapshot.status_code == 503
    assert stack.ready_before_snapshot.json()["checks"]["snapshot"] is False
    ready = stack.http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {
        "redis": True,
        "engine": True,
        "engine_breaker": True,
        "catalog_and_model": True,
        "snapshot": True,
        "accepting": True,
    }
    assert stack.http.get("/livez").json() == {"status": "ok"}


def test_think_ahead_answer_over_rest(stack: Stack) -> None:
    user, history = stack.user_with_prefixes(0)
    reply = stack.recommend(user_id=user, k=10)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["source"] == "think_ahead" and body["degraded"] is False
    assert body["degraded_reason"] is None
    assert len(body["items"]) == 10
    # 8 prefixes of a 300-item catalog hold fewer than 10 unseen items: the tail is topped up.
    assert 0 <= body["backfilled"] < 10
    assert body["catalog_version"] == stack.catalog.version
    assert body["snapshot_id"] == redis.Redis(port=stack.redis.port).get(KEYS.current).decode()
    for item in body["items"]:
        code = stack.catalog.code_of(item["item_id"])
        assert code == tuple(item["semantic_id"].values())
        assert item["item_id"] not in history
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    # an unchanged history may be answered from the snapshot's stored ranking: no engine round
    assert body["timings"]["total_ms"] >= body["timings"]["decode_ms"] >= 0


def test_grpc_answers_like_rest(stack: Stack) -> None:
    user, _ = stack.user_with_prefixes(1)
    rest = stack.recommend(user_id=user, k=5).json()
    reply = stack.stub().Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=30)
    assert reply.source == pb.SOURCE_THINK_AHEAD and not reply.degraded
    assert [i.item_id for i in reply.items] == [i["item_id"] for i in rest["items"]]
    assert [round(i.score, 4) for i in reply.items] == [round(i["score"], 4) for i in rest["items"]]


def test_exclusions_are_never_returned(stack: Stack) -> None:
    user, _ = stack.user_with_prefixes(2)
    first = [i["item_id"] for i in stack.recommend(user_id=user, k=10).json()["items"]]
    body = stack.recommend(user_id=user, k=10, exclude_item_ids=first[:3]).json()
    items = [i["item_id"] for i in body["items"]]
    assert not set(items) & set(first[:3])
    assert len(items) == 10


def test_events_change_the_next_answer_and_reorder_across_prefixes(stack: Stack) -> None:
    user, history = stack.user_with_prefixes(3)
    before = stack.recommend(user_id=user, k=10).json()
    # Events from another part of the catalog: far from this user's recent items.
    far = [iid for iid in stack.catalog.item_ids if iid not in history][150:153]
    ev = stack.http.post("/v1/events", json={"user_id": user, "item_ids": far})
    assert ev.status_code == 200, ev.text
    assert ev.json()["history_length"] == min(len(history) + 3, 50)
    after = stack.recommend(user_id=user, k=10).json()
    assert after["source"] == "think_ahead"
    assert after["timings"]["total_ms"] >= after["timings"]["decode_ms"] > 0  # an engine round
    assert not {i["item_id"] for i in after["items"]} & set(far)
    before_rank = {
        i["item_id"]: (r, tuple(i["semantic_id"].values())[:2])
        for r, i in enumerate(before["items"])
    }
    after_rank = {i["item_id"]: r for r, i in enumerate(after["items"])}
    common = [i for i in before_rank if i in after_rank]
    flipped = [
        (x, y)
        for x in common
        for y in common
        if before_rank[x][1] != before_rank[y][1]
        and before_rank[x][0] < before_rank[y][0]
        and after_rank[x] > after_rank[y]
    ]
    changed_scores = [i["score"] for i in before["items"]] != [i["score"] for i in after["items"]]
    assert changed_scores
    assert flipped or [i["item_id"] for i in before["items"]] != [
        i["item_id"] for i in after["items"]
    ]


def test_unknown_event_items_are_reported_not_stored(stack: Stack) -> None:
    user, _ = stack.user_with_prefixes(4)
    reply = stack.http.post("/v1/events", json={"user_id": user, "item_ids": ["no-such-item"]})
    assert reply.status_code == 200
    assert reply.json()["unknown_item_ids"] == ["no-such-item"]
    grpc_reply = stack.stub().AppendEvents(
        pb.AppendEventsRequest(user_id=user, item_ids=[stack.catalog.item_ids[0]]), timeout=10
    )
    assert grpc_reply.history_length >= 1


def test_cold_user_gets_a_flagged_full_decode(stack: Stack) -> None:
    body = stack.recommend(user_id="never-seen-user", k=10).json()
    assert body["source"] == "full_decode", body
    assert body["degraded"] is True and body["degraded_reason"] == "no_prefixes"
    assert len(body["items"]) == 10
    assert all(stack.catalog.code_of(i["item_id"]) for i in body["items"])


def test_full_decode_strategy_on_request(stack: Stack) -> None:
    user, history = stack.user_with_prefixes(5)
    body = stack.recommend(user_id=user, k=7, strategy="full_decode").json()
    assert body["source"] == "full_decode" and body["degraded"] is False, body
    assert len(body["items"]) == 7 and not {i["item_id"] for i in body["items"]} & set(history)


def test_blown_budget_answers_with_a_popular_fallback(stack: Stack) -> None:
    user, history = stack.user_with_prefixes(6)
    # a full decode needs several engine steps: 1 ms cannot hold them. With a history of its
    # own: a request with none is answered from the decode every such request shares (cached
    # by whichever test decoded one first)
    body = stack.recommend(
        user_id=user, k=10, budget_ms=1, strategy="full_decode", recent_item_ids=history[-2:]
    ).json()
    assert body["source"] in FALLBACK_SOURCES, body
    assert body["degraded"] is True and body["degraded_reason"] == "budget_exceeded"
    assert len(body["items"]) == 10


def test_fresh_event_without_time_for_a_round_is_reranked_without_the_engine(
    stack: Stack,
) -> None:
    user, _ = stack.user_with_prefixes(6)
    fresh = [stack.catalog.item_ids[0]]
    # one round with time to spare: the service learns how long a round takes here
    timed = stack.recommend(user_id=user, k=10, recent_item_ids=fresh).json()
    assert timed["source"] == "think_ahead", timed
    rounds_before = metric(
        stack.http.get("/metrics").text, 'thinkahead_answers_total{engine_round="yes"}'
    )
    for _ in range(40):
        body = stack.recommend(user_id=user, k=10, budget_ms=1, recent_item_ids=fresh).json()
        # the precondition, not the behaviour under test: the user's Redis read fit its 1 ms
        # floor (on a loaded box it can miss it, and then nothing of the user is known; CI
        # once saw five misses in a row, so the tries are spread over a few seconds)
        if body["degraded_reason"] != "budget_exceeded":
            break
        time.sleep(0.1)
    assert body["source"] == "think_ahead_rerank", body
    assert body["degraded"] is False and len(body["items"]) == 10
    assert fresh[0] not in {i["item_id"] for i in body["items"]}
    rounds_after = metric(
        stack.http.get("/metrics").text, 'thinkahead_answers_total{engine_round="yes"}'
    )
    assert rounds_after == rounds_before


def test_corrupt_and_mismatched_values_fall_back_and_are_counted(stack: Stack) -> None:
    r = redis.Redis(port=stack.redis.port)
    sid = r.get(KEYS.current).decode()
    r.set(KEYS.user(sid, "corrupt-user"), b"\x00\xffnot msgpack at all")
    corrupt_series = 'thinkahead_corrupt_values_total{key_type="snapshot_user"}'
    before = metric(stack.http.get("/metrics").text, corrupt_series)
    body = stack.recommend(user_id="corrupt-user", k=5).json()
    assert body["degraded_reason"] == "corrupt_value" and body["source"] == "full_decode"
    foreign = UserPrefixes("other-model", stack.catalog.version, time.time(), (Prefix(0, 0, 0.0),))
    r.set(KEYS.user(sid, "foreign-user"), foreign.encode())
    body = stack.recommend(user_id="foreign-user", k=5).json()
    assert body["degraded_reason"] == "version_mismatch"
    metrics = stack.http.get("/metrics").text
    assert metric(metrics, corrupt_series) == before + 1
    assert 'thinkahead_fallbacks_total{reason="version_mismatch",source="full_decode"}' in metrics


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "u1", "k": -1}, "k"),
        ({"user_id": "u1", "k": 100000}, "k"),
        ({"user_id": "u1", "k": "ten"}, "k"),
        ({"user_id": 42, "k": 5}, "user_id"),
        ({"user_id": "bad id with spaces"}, "user_id"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "u1", "surprise": True}, "surprise"),
        ({"user_id": "u1", "exclude_item_ids": ["x"] * 201}, "exclude_item_ids"),
        ({"user_id": "u1", "recent_item_ids": ["ok", "not ok!"]}, "recent_item_ids[1]"),
        ({"user_id": "u1", "budget_ms": 0}, "budget_ms"),
        ({"user_id": "u1", "budget_ms": 10**9}, "budget_ms"),
        ({"user_id": "u1", "strategy": "guess"}, "strategy"),
        ({"k": 3}, "user_id"),
    ],
)
def test_bad_rest_input_is_a_422_naming_the_field(
    stack: Stack, body: dict[str, Any], field: str
) -> None:
    reply = stack.recommend(**body)
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request" and error["field"] == field


def test_malformed_json_is_a_422(stack: Stack) -> None:
    reply = stack.http.post(
        "/v1/recommend", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert reply.status_code == 422
    assert reply.json()["error"]["type"] == "invalid_request"


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (pb.RecommendRequest(user_id="u1", k=-3), "k:"),
        (pb.RecommendRequest(user_id="", k=3), "user_id:"),
        (pb.RecommendRequest(user_id="u1", k=3, budget_ms=0), "budget_ms:"),
        (pb.RecommendRequest(user_id="u1", k=3, exclude_item_ids=["x"] * 300), "exclude_item_ids:"),
        (pb.RecommendRequest(user_id="u1", k=3, strategy=99), "strategy:"),
    ],
)
def test_bad_grpc_input_is_invalid_argument(stack: Stack, request_: Any, needle: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stack.stub().Recommend(request_, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()


def test_metrics_are_exposed(stack: Stack) -> None:
    user, _ = stack.user_with_prefixes(0)
    assert stack.recommend(user_id=user, k=3).json()["source"] == "think_ahead"
    stack.stub().Recommend(pb.RecommendRequest(user_id=user, k=3), timeout=30)
    text = stack.http.get("/metrics").text
    for name in [
        "thinkahead_requests_total",
        "thinkahead_request_duration_seconds_bucket",
        "thinkahead_stage_duration_seconds_bucket",
        "thinkahead_fallbacks_total",
        "thinkahead_in_flight_requests",
        "thinkahead_rejected_requests_total",
        "thinkahead_snapshot_age_seconds",
        "thinkahead_engine_queue_depth",
        "thinkahead_build_info",
    ]:
        assert name in text, name
    assert 'thinkahead_requests_total{outcome="ok",source="think_ahead",transport="http"}' in text
    assert 'transport="grpc"' in text


def test_grpc_health_and_reflection(stack: Stack) -> None:
    health = health_pb2_grpc.HealthStub(stack.grpc_channel)
    for service in ("", "thinkahead.v1.Recommender"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(stack.grpc_channel)
    replies = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"thinkahead.v1.Recommender", "grpc.health.v1.Health"} <= names


def test_schemathesis_finds_no_server_errors(stack: Stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Property-based requests generated from the OpenAPI schema, over real HTTP: no 500s."""
    import shutil
    import subprocess

    binary = shutil.which("schemathesis") or shutil.which("st")
    assert binary, "schemathesis is a dev dependency (scripts/setup.sh installs it)"
    result = subprocess.run(
        [
            binary,
            "run",
            f"{stack.service.base_url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "40",
            "--exclude-path",
            "/metrics",
            "--seed",
            "1",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    import re

    match = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert match, result.stdout[-3000:]
    assert int(match.group(1)) == int(match.group(2)) >= 100
    assert 'outcome="internal_error"' not in stack.http.get("/metrics").text


def test_admission_limit_rejects_fast_with_retry_after(stack: Stack) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=stack.service.base_url, timeout=60) as client:
            body = {"user_id": "burst-user", "k": 10, "strategy": "full_decode"}
            return await asyncio.gather(
                *(client.post("/v1/recommend", json=body) for _ in range(40))
            )

    replies = asyncio.run(burst())
    codes = [r.status_code for r in replies]
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
    rejected = next(r for r in replies if r.status_code == 429)
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["type"] == "overloaded"
    assert (
        'thinkahead_rejected_requests_total{reason="overloaded"}' in stack.http.get("/metrics").text
    )


def test_new_snapshot_is_picked_up_without_restart(stack: Stack, batch_engine, tiny_world) -> None:  # type: ignore[no-untyped-def]
    user, _ = stack.user_with_prefixes(0)
    old = stack.recommend(user_id=user, k=3).json()["snapshot_id"]
    time.sleep(1.1)  # snapshot ids are stamped to the second
    other = ThinkAheadRun(
        tiny_world.model_dir,
        tiny_world.catalog_dir,
        tiny_world.interactions_csv,
        stack.redis.url,
        ThinkAheadJob(prefixes=6, beam=6),  # other inputs: a new snapshot, not a resumed one
    )
    new = publish(other, batch_engine)
    assert new != old
    deadline = time.monotonic() + 5
    seen = old
    while seen != new and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = stack.recommend(user_id=user, k=3).json()["snapshot_id"]
    assert seen == new


def test_redis_down_still_answers_flagged_then_recovers(stack: Stack) -> None:
    user, _ = stack.user_with_prefixes(0)
    stack.redis.stop(kill=True)
    try:
        replies = [stack.recommend(user_id=user, k=5) for _ in range(5)]
        assert all(r.status_code == 200 for r in replies)
        body = replies[-1].json()
        assert body["degraded"] and body["degraded_reason"] == "redis_unavailable"
        assert len(body["items"]) == 5
        grpc_reply = stack.stub().Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=10)
        assert grpc_reply.degraded_reason == "redis_unavailable"
        assert stack.http.get("/readyz").status_code == 503
        ev = stack.http.post("/v1/events", json={"user_id": user, "item_ids": ["1"]})
        assert ev.status_code == 503 and ev.json()["error"]["type"] == "unavailable"
    finally:
        stack.redis.restart()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        body = stack.recommend(user_id=user, k=5).json()
        if body["degraded_reason"] != "redis_unavailable":
            break
        time.sleep(0.2)
    assert body["degraded_reason"] != "redis_unavailable"  # empty Redis now: no snapshot


@pytest.fixture
def own_service(stack: Stack, tiny_world, tmp_path) -> Iterator[ServiceProcess]:  # type: ignore[no-untyped-def]
    """A second service over the module's Redis, for a test that stops it."""
    service = start_service(
        tiny_world.model_dir, tiny_world.catalog_dir, stack.redis.url, tmp_path / "service.log"
    )
    yield service
    service.stop()


def test_sigterm_drains_in_flight_requests_and_exits_cleanly(own_service: ServiceProcess) -> None:
    async def slow_then_stop() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=own_service.base_url, timeout=60) as client:
            body = {"user_id": "drain-user", "k": 10, "strategy": "full_decode"}
            calls = [asyncio.create_task(client.post("/v1/recommend", json=body)) for _ in range(3)]
            # the signal must find them in flight: on a loaded machine a fixed sleep did not
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                text = (await client.get("/metrics")).text
                if metric(text, "thinkahead_in_flight_requests") >= 3:
                    break
                await asyncio.sleep(0.01)
            own_service.process.send_signal(15)
            return await asyncio.gather(*calls)

    replies = asyncio.run(slow_then_stop())
    assert [r.status_code for r in replies] == [200, 200, 200]
    # uvicorn re-raises the caught SIGTERM after its graceful shutdown, so the exit status
    # reports the signal; the log shows the drain ran to the end.
    assert own_service.process.wait(timeout=60) in (0, -15)
    log = own_service.log()
    assert "event=grpc_drained" in log and "Application shutdown complete" in log
