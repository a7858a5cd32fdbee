"""The fault run with authentication and TLS on, REST and gRPC mixed: ``thinkahead serve`` as a
real process in remote-engine mode (the engine a separate process that is killed, brought back
and made slow), a real redis-server killed under load (AOF, fsync always, like a persistent
Redis), API keys from a keys file, HTTPS and gRPC over TLS. Plus the start-up refusal on a
non-loopback bind without keys. No vLLM needed: the engine speaks vLLM's completions API over
the fake engine's deterministic log-probs (tests/fake_completions.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from service.api._proto.thinkahead.v1 import recommender_pb2 as pb
from service.api._proto.thinkahead.v1 import recommender_pb2_grpc as pb_grpc
from service.contracts.catalog import Catalog
from service.contracts.manifest import SnapshotManifest
from service.contracts.snapshot import Keyspace, Prefix, UserPrefixes
from tests.fake_engine import FAKE_MODEL_VERSION, write_tiny_artifacts
from tests.helpers import RedisProcess, free_port, free_ports, start_redis, vllm_serve_command
from tests.inproc import BACKEND_KEY, write_keys
from tests.tls_certs import Pki, make_pki

pytestmark = pytest.mark.slow
KEYS = Keyspace("ta")
PROBE_INTERVAL_S = 1.0
USERS = [f"u{i}" for i in range(24)]
HISTORY_CAP = 1000


class Proc:
    """A child process with its log, stopped on exit; ``drop`` leaves variables out of its
    environment."""

    def __init__(
        self,
        args: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        drop: tuple[str, ...] = (),
    ) -> None:
        self.args, self.log_path = args, log
        self.env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in drop}
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.args, env=self.env, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def restart(self) -> None:
        self.kill()
        self.process = self._start()


def wait_http(url: str, proc: Proc, verify: Any = True, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise RuntimeError(f"exited {proc.process.returncode}:\n{proc.log()[-3000:]}")
        try:
            if httpx.get(url, verify=verify, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not up in {timeout}s:\n{proc.log()[-3000:]}")


def serve_args(catalog_dir: Path, model_dir: Path, redis_url: str, engine_url: str) -> list[str]:
    return [
        sys.executable, "-m", "offline.cli", "serve",
        "--model", str(model_dir), "--catalog", str(catalog_dir), "--redis", redis_url,
        "--engine", "remote", "--remote-url", engine_url,
    ]  # fmt: skip


def publish_snapshot(redis_proc: RedisProcess, catalog: Catalog) -> None:
    """A small think-ahead snapshot (every user gets the same few prefixes) and histories."""
    r = redis_proc.client()
    sid = "s-secure-1"
    prefixes = tuple(
        Prefix(int(a), int(b), -0.5 * i) for i, (a, b) in enumerate(sorted(catalog.c_under_ab)[:6])
    )
    manifest = SnapshotManifest(
        snapshot_id=sid,
        model_version=FAKE_MODEL_VERSION,
        catalog_version=catalog.version,
        num_users=len(USERS),
    )
    for i, user in enumerate(USERS):
        value = UserPrefixes(FAKE_MODEL_VERSION, catalog.version, time.time(), prefixes)
        r.set(KEYS.user(sid, user), value.encode())
        r.rpush(KEYS.history(user), *catalog.item_ids[i : i + 3][::-1])
    r.set(KEYS.manifest(sid), json.dumps(manifest.model_dump()))
    r.set(KEYS.current, sid)
    r.close()


@dataclass
class Secure:
    service: Proc
    engine: Proc
    redis: RedisProcess
    pki: Pki
    catalog: Catalog
    http_port: int
    grpc_port: int
    engine_url: str

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.http_port}"

    def verify(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca))

    def grpc_creds(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.pki.ca.read_bytes())

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.base_url}/metrics", verify=self.verify(), timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return float("nan")


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    root = tmp_path_factory.mktemp("secure")
    catalog_dir, model_dir = write_tiny_artifacts(root)
    catalog = Catalog.load(catalog_dir)
    pki = make_pki(root / "pki")
    redis_proc = start_redis(
        root / "redis", extra_args=("--appendonly", "yes", "--appendfsync", "always")
    )
    publish_snapshot(redis_proc, catalog)
    engine_port = free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    engine = Proc(
        [sys.executable, "-m", "tests.fake_completions", "--port", str(engine_port)],
        root / "engine.log",
    )
    wait_http(f"{engine_url}/health", engine)
    http_port, grpc_port = free_ports(2)
    env = {
        "THINKAHEAD_AUTH__KEYS_FILE": str(write_keys(root / "keys.json")),
        "THINKAHEAD_TLS__CERT_FILE": str(pki.server_cert),
        "THINKAHEAD_TLS__KEY_FILE": str(pki.server_key),
        "THINKAHEAD_REDIS__SNAPSHOT_POLL_S": "0.2",
        "THINKAHEAD_ENGINE__BREAKER__PROBE_INTERVAL_S": str(PROBE_INTERVAL_S),
        "THINKAHEAD_ENGINE__REMOTE_TIMEOUT_S": "2",
        "THINKAHEAD_RECOMMEND__DEFAULT_BUDGET_MS": "500",
        # counting acknowledged events against list lengths needs lists below the cap, however
        # many events a fast box sends in the run
        "THINKAHEAD_REDIS__HISTORY_CAP": str(HISTORY_CAP),
    }
    args = [
        *serve_args(catalog_dir, model_dir, redis_proc.url, engine_url),
        "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        "--host", "0.0.0.0",  # allowed: keys are configured
    ]  # fmt: skip
    service = Proc(args, root / "service.log", env)
    s = Secure(service, engine, redis_proc, pki, catalog, http_port, grpc_port, engine_url)
    try:
        wait_http(f"{s.base_url}/livez", service, verify=s.verify())
        yield s
    finally:
        service.stop()
        engine.stop()
        redis_proc.stop()


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    flagged: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    by_transport: Counter[str] = field(default_factory=Counter)
    events_sent: int = 0
    events_acked: int = 0
    events_retries: int = 0
    acked_per_user: Counter[str] = field(default_factory=Counter)

    def answer(self, transport: str, source: str, reason: str) -> None:
        self.answered += 1
        self.by_transport[transport] += 1
        self.sources[source] += 1
        self.reasons[reason or "none"] += 1
        self.flagged += bool(reason)


def error_name(exc: Exception) -> str:
    """The exception, with its gRPC status where it has one (what failed, not only that)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{type(exc).__name__} {exc.code().name}: {exc.details()}"
    return type(exc).__name__


async def _load(s: Secure, seconds: float, tally: Tally) -> None:
    stop_at = time.monotonic() + seconds
    headers = {"authorization": f"Bearer {BACKEND_KEY}"}
    auth = (("authorization", f"Bearer {BACKEND_KEY}"),)
    grpc_source = {v: k for k, v in pb.Source.items()}
    async with (
        httpx.AsyncClient(base_url=s.base_url, verify=s.verify(), timeout=30) as http,
        grpc.aio.secure_channel(f"127.0.0.1:{s.grpc_port}", s.grpc_creds()) as channel,
    ):
        stub = pb_grpc.RecommenderStub(channel)

        async def recommend(i: int, n: int) -> None:
            user = USERS[n % len(USERS)]
            # Every other request carries a fresh event, so the engine is needed.
            recent = [s.catalog.item_ids[(n * 7) % len(s.catalog)]] if n % 2 else []
            tally.sent += 1
            try:
                if i % 2 == 0:
                    reply = await http.post(
                        "/v1/recommend",
                        json={"user_id": user, "k": 5, "recent_item_ids": recent},
                        headers=headers,
                    )
                    if reply.status_code != 200:
                        tally.errors[f"http {reply.status_code}"] += 1
                        return
                    body = reply.json()
                    tally.answer("http", body["source"], body["degraded_reason"] or "")
                else:
                    request = pb.RecommendRequest(user_id=user, k=5, recent_item_ids=recent)
                    got = await stub.Recommend(request, metadata=auth, timeout=30)
                    source = grpc_source[got.source].removeprefix("SOURCE_").lower()
                    tally.answer("grpc", source, got.degraded_reason)
            except (httpx.HTTPError, grpc.aio.AioRpcError) as exc:
                tally.errors[error_name(exc)] += 1

        async def event(i: int, n: int) -> None:
            """One event, retried with its idempotency key until acknowledged."""
            user = USERS[(n * 5 + i) % len(USERS)]
            item = s.catalog.item_ids[(n * 11 + i) % len(s.catalog)]
            key = f"c{i}-n{n}"
            tally.events_sent += 1
            for attempt in range(200):
                try:
                    if i % 2 == 0:
                        body = {"user_id": user, "item_ids": [item], "idempotency_key": key}
                        reply = await http.post("/v1/events", json=body, headers=headers)
                        ok = reply.status_code == 200
                    else:
                        request = pb.AppendEventsRequest(
                            user_id=user, item_ids=[item], idempotency_key=key
                        )
                        await stub.AppendEvents(request, metadata=auth, timeout=10)
                        ok = True
                except (httpx.HTTPError, grpc.aio.AioRpcError):
                    ok = False
                if ok:
                    tally.events_acked += 1
                    tally.acked_per_user[user] += 1
                    return
                tally.events_retries += 1
                await asyncio.sleep(0.1 * min(attempt + 1, 5))

        async def client(i: int) -> None:
            n = i
            while time.monotonic() < stop_at:
                n += 1
                await (event(i, n) if n % 4 == 0 else recommend(i, n))

        await asyncio.gather(*(client(i) for i in range(8)))


def test_fault_run_with_auth_and_tls_rest_and_grpc(secure: Secure) -> None:
    s = secure
    r = s.redis.client()
    before = {u: r.llen(KEYS.history(u)) for u in USERS}
    r.close()
    tally = Tally()

    def chaos() -> None:
        time.sleep(3)
        s.redis.stop(kill=True)  # Redis killed under load
        time.sleep(3)
        s.redis.restart()
        time.sleep(2)
        s.engine.kill()  # engine killed
        time.sleep(3)
        s.engine.restart()
        time.sleep(2.5)
        httpx.post(f"{s.engine_url}/admin/delay", params={"ms": 2000}, timeout=5)  # slow engine
        time.sleep(3)
        httpx.post(f"{s.engine_url}/admin/delay", params={"ms": 0}, timeout=5)

    thread = threading.Thread(target=chaos)
    thread.start()
    asyncio.run(_load(s, 22, tally))
    thread.join()
    r = s.redis.client()
    after = {u: r.llen(KEYS.history(u)) for u in USERS}
    r.close()
    lost = sum(max(0, before[u] + tally.acked_per_user[u] - after[u]) for u in USERS)
    doubled = sum(max(0, after[u] - before[u] - tally.acked_per_user[u]) for u in USERS)
    figures = {
        "requests_sent": tally.sent,
        "answered": tally.answered,
        "flagged": tally.flagged,
        "errors": sum(tally.errors.values()),
        "by_transport": dict(tally.by_transport),
        "sources": dict(tally.sources),
        "reasons": dict(tally.reasons),
        "events_sent": tally.events_sent,
        "events_acked": tally.events_acked,
        "events_retries": tally.events_retries,
        "events_lost": lost,
        "events_doubled": doubled,
    }
    print("\nsecure fault run:", json.dumps(figures))
    assert sum(tally.errors.values()) == 0, tally.errors
    assert tally.answered == tally.sent
    assert tally.by_transport["http"] > 0 and tally.by_transport["grpc"] > 0
    for reason in ("redis_unavailable", "engine_unavailable", "budget_exceeded"):
        assert tally.reasons[reason] > 0, reason  # each fault was seen and flagged
    assert tally.sources["think_ahead"] > 0
    assert max(after.values()) < HISTORY_CAP  # under the cap, so counting is exact
    assert tally.events_acked == tally.events_sent
    assert lost == 0 and doubled == 0
    assert tally.events_retries > 0  # the Redis outage was hit and retried through


def test_engine_back_full_decode_within_probe_interval_no_request(secure: Secure) -> None:
    engine_killed_and_back(secure)


def engine_killed_and_back(s: Secure) -> None:
    """Kill the remote engine, see requests fall back and the breaker open, bring the engine
    back and, sending no request, see the breaker close within one probe interval of the
    engine answering; then full decode answers again."""
    headers = {"authorization": f"Bearer {BACKEND_KEY}"}
    with httpx.Client(base_url=s.base_url, verify=s.verify(), timeout=30) as http:
        # one recent item: a user with no history at all is answered from the shared decode
        cold = {"user_id": "cold-after-restart", "k": 5, "recent_item_ids": ["7"]}
        assert http.post("/v1/recommend", json=cold, headers=headers).json()["source"] == (
            "full_decode"
        )
        s.engine.kill()
        for _ in range(4):  # this user's full decode fails: popular items, flagged
            body = http.post("/v1/recommend", json=cold, headers=headers).json()
            assert body["source"].startswith("fallback_") and body["degraded"]
        assert s.metric("thinkahead_engine_breaker_state") == 2
        restarted = time.monotonic()
        s.engine.restart()
        # No recommend request from here on: only the background probe can close it.
        healthy = None
        while s.metric("thinkahead_engine_breaker_state") != 0:
            assert time.monotonic() - restarted < 600, "breaker did not close"
            if healthy is None:
                try:
                    if httpx.get(f"{s.engine_url}/health", timeout=1).status_code == 200:
                        healthy = time.monotonic()
                except httpx.HTTPError:
                    pass
            time.sleep(0.02)
        closed = time.monotonic()
        healthy = healthy or closed
        print(
            f"\nengine process restarted; answering after {healthy - restarted:.2f}s; breaker "
            f"closed {closed - healthy:.2f}s after that (probe interval {PROBE_INTERVAL_S}s)"
        )
        assert closed - healthy <= PROBE_INTERVAL_S + 0.5
        body = http.post("/v1/recommend", json=cold, headers=headers).json()
        # Flagged only because this user has no prefixes (or there is no snapshot at all).
        assert body["source"] == "full_decode"
        assert body["degraded_reason"] in ("no_prefixes", "no_snapshot")


def test_refuses_a_public_bind_without_keys_unless_insecure(secure: Secure, tmp_path) -> None:  # type: ignore[no-untyped-def]
    catalog_dir, model_dir = write_tiny_artifacts(tmp_path)
    base = serve_args(catalog_dir, model_dir, s_url := secure.redis.url, secure.engine_url)
    http_port, grpc_port = free_ports(2)
    ports = ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    refused = subprocess.run(
        [*base, *ports, "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2
    assert "refusing to serve without API keys on 0.0.0.0" in refused.stdout + refused.stderr
    proc = Proc([*base, *ports, "--host", "0.0.0.0", "--insecure"], tmp_path / "open.log")
    try:
        wait_http(f"http://127.0.0.1:{http_port}/livez", proc)
        reply = httpx.post(
            f"http://127.0.0.1:{http_port}/v1/recommend", json={"user_id": "u1", "k": 3}
        )
        assert reply.status_code == 200  # open, as asked
    finally:
        assert proc.stop() in (0, -15)
    assert s_url


@pytest.mark.vllm
def test_real_vllm_serve_killed_and_back_with_auth_and_tls(tiny_world, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The same recovery against a real ``vllm serve`` (remote mode) over the tiny decoder."""
    pki = make_pki(tmp_path / "pki")
    catalog = Catalog.load(tiny_world.catalog_dir)
    redis_proc = start_redis(tmp_path / "redis")
    port = free_port()
    engine_url = f"http://127.0.0.1:{port}"
    # vLLM's own engine core runs in a child process (as `vllm serve` does in production).
    engine = Proc(
        vllm_serve_command(tiny_world.model_dir, port),
        tmp_path / "vllm.log",
        drop=("VLLM_ENABLE_V1_MULTIPROCESSING",),
    )
    service = None
    try:
        wait_http(f"{engine_url}/health", engine, timeout=900)
        http_port, grpc_port = free_ports(2)
        env = {
            "THINKAHEAD_AUTH__KEYS_FILE": str(write_keys(tmp_path / "keys.json")),
            "THINKAHEAD_TLS__CERT_FILE": str(pki.server_cert),
            "THINKAHEAD_TLS__KEY_FILE": str(pki.server_key),
            "THINKAHEAD_ENGINE__BREAKER__PROBE_INTERVAL_S": str(PROBE_INTERVAL_S),
            "THINKAHEAD_ENGINE__REMOTE_TIMEOUT_S": "5",
            "THINKAHEAD_RECOMMEND__DEFAULT_BUDGET_MS": "2000",
        }
        args = [
            *serve_args(tiny_world.catalog_dir, tiny_world.model_dir, redis_proc.url, engine_url),
            "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        ]  # fmt: skip
        service = Proc(args, tmp_path / "service.log", env)
        s = Secure(service, engine, redis_proc, pki, catalog, http_port, grpc_port, engine_url)
        wait_http(f"{s.base_url}/livez", service, verify=s.verify(), timeout=300)
        engine_killed_and_back(s)
    finally:
        if service is not None:
            service.stop()
        engine.stop()
        redis_proc.stop()
