"""The remote engine's transport failures become EngineError (the caller's fallback), whatever
the HTTP stack raises for them; the integration test over a real server is
tests/integration/test_remote_engine.py."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from service.engine.base import EngineError, ScoreRequest
from service.engine.remote import RemoteVllmEngine

REQUEST = ScoreRequest(prompt=(1, 2, 3), allowed=(4, 5), want=(4,))


def engine_over(
    handler: Callable[[httpx.Request], httpx.Response], model: str | None = "model"
) -> RemoteVllmEngine:
    return RemoteVllmEngine(
        "http://engine", "v1", model, timeout_s=1, transport=httpx.MockTransport(handler)
    )


def dropped_mid_connect(request: httpx.Request) -> httpx.Response:
    # what anyio's socket stream raised when a killed engine dropped a TLS connection
    raise AttributeError("'NoneType' object has no attribute 'getpeername'")


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def replies(status: int, body: bytes) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, content=body)


unavailable = replies(503, b"loading")


@pytest.mark.parametrize(
    ("handler", "needle"),
    [
        (dropped_mid_connect, "unreachable: AttributeError"),
        (refused, "unreachable: ConnectError"),
        (unavailable, "answered 503 to /v1/completions"),
    ],
)
async def test_transport_failures_are_engine_errors(handler, needle: str) -> None:  # type: ignore[no-untyped-def]
    engine = engine_over(handler)
    with pytest.raises(EngineError, match=needle):
        await engine.score([REQUEST])
    assert await engine.check_health() is False
    await engine.close()


async def test_served_model_lookup_failure_is_an_engine_error() -> None:
    engine = engine_over(unavailable, model=None)
    with pytest.raises(EngineError, match="503 to /v1/models"):
        await engine.score([REQUEST])
    await engine.close()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        (b'{"choices": [{"logprobs": {"top_logprobs": [["4", -0.1]]}}]}', "unexpected completions"),
        (b'{"choices": [{"logprobs": {"top_logprobs": [{"4": -0.1}]}}]}', "unexpected completions"),
        (b'{"choices": []}', "unexpected completions"),
        (b"[1, 2]", "unexpected completions"),
    ],
)
async def test_malformed_completion_replies_are_engine_errors(body: bytes, needle: str) -> None:
    engine = engine_over(replies(200, body))
    with pytest.raises(EngineError, match=needle):
        await engine.score([REQUEST])
    await engine.close()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"not json", "not JSON"),
        (b'{"data": []}', "unexpected /v1/models"),
        (b'{"data": [{"id": null}]}', "model id None"),
    ],
)
async def test_malformed_models_replies_are_engine_errors(body: bytes, needle: str) -> None:
    engine = engine_over(replies(200, body), model=None)
    with pytest.raises(EngineError, match=needle):
        await engine.score([REQUEST])
    await engine.close()


async def test_a_well_formed_reply_is_read() -> None:
    # the parsing above rejects only what is malformed: token 4's log-prob comes through
    top = b'{"token_id:4": -0.25, "token_id:5": -2.0}'
    body = b'{"choices": [{"logprobs": {"top_logprobs": [' + top + b"]}}]}"
    engine = engine_over(replies(200, body))
    (scored,) = await engine.score([REQUEST])
    await engine.close()
    assert scored[4] == pytest.approx(-0.25)
