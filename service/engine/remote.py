"""A remote ``vllm serve`` deployment behind its OpenAI completions API.

One completions call per score request: the token-id prompt, ``max_tokens=1``,
``allowed_token_ids``, ``logprobs`` (from :func:`~service.engine.base.logprobs_to_ask`) and
``return_tokens_as_token_ids``, all sent at once so the server batches them. The log-probs
are the same processed ones as in-process, provided the server runs with ``--logprobs-mode
processed_logprobs --enable-prefix-caching --max-logprobs 256``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx

from service.engine.base import (
    EngineError,
    ScoreRequest,
    TokenLogprobs,
    logprobs_to_ask,
    pick,
)

# A connection the engine drops while httpcore sets it up can surface from anyio's socket stream
# as an AttributeError (its raw socket already gone: `'NoneType' object has no attribute
# 'getpeername'`, seen when the fault tests kill the engine under TLS load, httpcore 1.0.9 /
# anyio 4.16) instead of an httpx error. Either way the engine is unreachable: the caller's
# fallback, never a 500.
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, OSError, AttributeError)


def completion_body(model: str, request: ScoreRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(request.prompt),
        "max_tokens": 1,
        "temperature": 0.0,
        "allowed_token_ids": list(request.allowed),
        "logprobs": logprobs_to_ask(request),
        "return_tokens_as_token_ids": True,
    }
    return body


# What indexing a JSON value of the wrong shape raises (`top.items()` on a list, ...).
MALFORMED: tuple[type[Exception], ...] = (
    KeyError,
    IndexError,
    TypeError,
    ValueError,
    AttributeError,
)


def parse_logprobs(payload: Any) -> dict[int, float]:
    try:
        top = payload["choices"][0]["logprobs"]["top_logprobs"][0]
        return {int(tok.split(":", 1)[1]): float(lp) for tok, lp in top.items()}
    except MALFORMED as exc:
        raise EngineError(f"unexpected completions payload: {exc!r}") from exc


def parse_model_id(payload: Any) -> str:
    try:
        model = payload["data"][0]["id"]
    except MALFORMED as exc:
        raise EngineError(f"unexpected /v1/models payload: {exc!r}") from exc
    if not isinstance(model, str) or not model:
        raise EngineError(f"unexpected /v1/models payload: model id {model!r}")
    return model


class RemoteVllmEngine:
    def __init__(
        self,
        base_url: str,
        model_version: str,
        model: str | None,
        timeout_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.model_version = model_version
        self._model = model
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
            transport=transport,
        )

    async def _request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            return await self._client.request(method, path, json=body)
        except TRANSPORT_ERRORS as exc:
            raise EngineError(f"remote engine unreachable: {type(exc).__name__}: {exc}") from exc

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        """The JSON of a 200 reply. Any other status, or a body that is not JSON (a proxy's
        error page, a truncated reply), is the engine failing: the caller's fallback."""
        reply = await self._request(method, path, body)
        if reply.status_code != 200:
            raise EngineError(
                f"remote engine answered {reply.status_code} to {path}: {reply.text[:200]!r}"
            )
        try:
            return reply.json()
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise EngineError(
                f"remote engine sent {path} a body that is not JSON: {reply.text[:200]!r}"
            ) from exc

    async def _served_model(self) -> str:
        if self._model is None:
            self._model = parse_model_id(await self._json("GET", "/v1/models"))
        return self._model

    async def _one(self, model: str, request: ScoreRequest) -> TokenLogprobs:
        payload = await self._json("POST", "/v1/completions", completion_body(model, request))
        return pick(parse_logprobs(payload), request)

    async def score(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]:
        model = await self._served_model()
        return list(await asyncio.gather(*(self._one(model, r) for r in requests)))

    async def check_health(self) -> bool:
        try:
            reply = await self._request("GET", "/health")
        except EngineError:
            return False
        return reply.status_code == 200

    def is_dead(self) -> bool:
        return False  # a remote deployment restarts on its own; ours needs no restart for it

    async def close(self) -> None:
        await self._client.aclose()
