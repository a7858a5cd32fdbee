"""A stand-in for a remote ``vllm serve``: the completions endpoints the remote engine uses,
answering with :class:`tests.fake_engine.FakeEngine`'s deterministic log-probs. Run as its own
process (``python -m tests.fake_completions --port N``) so a test can kill it and bring it back;
``POST /admin/delay?ms=N`` makes it slow.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import uvicorn
from fastapi import FastAPI, Request

from tests.fake_engine import FakeEngine


def create_app() -> FastAPI:
    app = FastAPI()
    state = {"delay_s": 0.0}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"data": [{"id": "fake"}]}

    @app.post("/admin/delay")
    async def delay(ms: float) -> dict[str, float]:
        state["delay_s"] = ms / 1000
        return state

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, Any]:
        body = await request.json()
        if state["delay_s"]:
            await asyncio.sleep(state["delay_s"])
        prompt, allowed = body["prompt"], body["allowed_token_ids"]
        last = prompt[-1] if prompt else 0
        ranked = sorted(allowed, key=lambda t: -FakeEngine._logit(last, t))
        n = max(1, int(body.get("logprobs") or 1))
        # Raw logits are enough here: the remote engine picks what the request asked for, and
        # a renormalisation constant changes no ranking.
        top = {f"token_id:{t}": FakeEngine._logit(last, t) - 10.0 for t in ranked[:n]}
        return {"choices": [{"logprobs": {"top_logprobs": [top]}}]}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
