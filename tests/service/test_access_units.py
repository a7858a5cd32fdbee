"""Units of the access and reliability layer: keys file, exposure rule, token buckets, the
engine breaker's transitions (its recovery over real transports is in test_api_security.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from service.access.auth import (
    OPEN,
    Authenticator,
    ExposureError,
    KeyStore,
    Principal,
    bearer_token,
    check_exposure,
    hash_key,
    is_loopback,
    load_keys,
)
from service.access.ratelimit import RateLimiter
from service.engine.breaker import BreakerState, CircuitBreaker
from service.errors import PermissionDenied, RateLimited, Unauthenticated


def keys_json(path: Path, entries: list[dict[str, object]]) -> Path:
    path.write_text(json.dumps({"keys": entries}))
    return path


def test_keys_file_holds_hashes_and_scopes(tmp_path: Path) -> None:
    path = keys_json(
        tmp_path / "k.json",
        [{"name": "svc", "sha256": hash_key("s3cret"), "scopes": ["recommend"]}],
    )
    auth = Authenticator(KeyStore(path))
    assert auth.authorize("Bearer s3cret", "recommend").name == "svc"
    assert auth.authorize("bearer   s3cret ", "recommend").name == "svc"
    with pytest.raises(PermissionDenied):
        auth.authorize("Bearer s3cret", "events")
    for header in (None, "", "Bearer", "Basic s3cret", "Bearer nope", "s3cret"):
        with pytest.raises(Unauthenticated):
            auth.authorize(header, "recommend")
    assert "s3cret" not in path.read_text()


@pytest.mark.parametrize(
    "entries",
    [
        [{"name": "a", "sha256": "not-hex", "scopes": ["recommend"]}],
        [{"name": "a", "sha256": hash_key("x"), "scopes": ["admin"]}],
        [{"name": "a", "sha256": hash_key("x"), "scopes": []}],
        [{"name": "a b", "sha256": hash_key("x"), "scopes": ["events"]}],
        [
            {"name": "a", "sha256": hash_key("x"), "scopes": ["events"]},
            {"name": "a", "sha256": hash_key("y"), "scopes": ["events"]},
        ],
        [{"name": "a", "sha256": hash_key("x"), "scopes": ["events"], "key": "plaintext"}],
    ],
)
def test_bad_keys_files_are_refused_at_start(tmp_path: Path, entries: list) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        load_keys(keys_json(tmp_path / "k.json", entries))


def test_no_keys_file_is_open() -> None:
    auth = Authenticator(None)
    assert not auth.enabled
    assert auth.authorize(None, "events") is OPEN


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("BEARER abc") == "abc"
    assert bearer_token("Token abc") is None
    assert bearer_token(None) is None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True), ("127.0.0.2", True),
     ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.com", False)],
)  # fmt: skip
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_exposure_rule() -> None:
    check_exposure("127.0.0.1", "127.0.0.1", has_keys=False, insecure=False)
    check_exposure("0.0.0.0", "0.0.0.0", has_keys=True, insecure=False)
    check_exposure("0.0.0.0", "0.0.0.0", has_keys=False, insecure=True)
    with pytest.raises(ExposureError, match=r"0\.0\.0\.0"):
        check_exposure("127.0.0.1", "0.0.0.0", has_keys=False, insecure=False)


def test_token_bucket_per_key() -> None:
    limiter = RateLimiter()
    slow = Principal("slow", frozenset({"recommend"}), rate_per_s=2, burst=3)
    other = Principal("other", frozenset({"recommend"}), rate_per_s=2, burst=1)
    for _ in range(3):
        limiter.check(slow, now=100.0)
    with pytest.raises(RateLimited) as info:
        limiter.check(slow, now=100.0)
    assert info.value.retry_after_s == 1 and info.value.http_status == 429
    limiter.check(other, now=100.0)  # its own bucket
    limiter.check(slow, now=100.5)  # refilled one token at 2/s
    with pytest.raises(RateLimited):
        limiter.check(slow, now=100.5)
    limiter.check(OPEN, now=100.5)  # no limit configured


def test_breaker_transitions() -> None:
    seen: list[BreakerState] = []
    breaker = CircuitBreaker(failures=3, on_change=seen.append)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the run of failures
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()

    async def failing() -> None:
        raise RuntimeError("still down")

    async def hanging() -> None:
        await asyncio.sleep(10)

    async def working() -> None:
        return None

    asyncio.run(breaker.probe_once(failing, timeout_s=1))
    assert breaker.state is BreakerState.OPEN
    asyncio.run(breaker.probe_once(hanging, timeout_s=0.05))
    assert breaker.state is BreakerState.OPEN
    asyncio.run(breaker.probe_once(working, timeout_s=1))
    assert breaker.state is BreakerState.CLOSED
    assert seen == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]
    breaker.trip()
    assert breaker.state is BreakerState.OPEN
    breaker.record_failure()  # while open, failures keep it open
    assert breaker.state is BreakerState.OPEN


def test_breaker_probe_loop_recovers_on_its_own() -> None:
    breaker = CircuitBreaker(failures=1)
    breaker.record_failure()
    healthy = asyncio.Event()

    async def probe() -> None:
        if not healthy.is_set():
            raise RuntimeError("down")

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(breaker.run_probes(probe, interval_s=0.05, timeout_s=1))
        await asyncio.sleep(0.2)
        assert breaker.state is BreakerState.OPEN
        healthy.set()
        t0 = loop.time()
        while breaker.state is not BreakerState.CLOSED:
            await asyncio.sleep(0.01)
        task.cancel()
        return loop.time() - t0

    assert asyncio.run(scenario()) < 0.5
