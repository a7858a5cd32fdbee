"""Remote engine mode against a real `vllm serve` (OpenAI completions with token-id prompts):
the same log-probs and the same beam search results as vLLM in-process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from service.contracts.beam import BeamSearch, run_searches, run_searches_async
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.model import load_model_info
from service.engine.base import ScoreRequest
from service.engine.remote import RemoteVllmEngine
from tests.helpers import free_port, vllm_serve_command

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_server(tiny_world, tmp_path_factory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    proc = subprocess.Popen(
        vllm_serve_command(tiny_world.model_dir, port),
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:])
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("vllm serve did not start")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_remote_and_in_process_agree(tiny_world, vllm_server, batch_engine) -> None:  # type: ignore[no-untyped-def]
    catalog = Catalog.load(tiny_world.catalog_dir)
    info = load_model_info(tiny_world.model_dir, catalog)
    ids = info.token_ids
    history = [catalog.code_at(r) for r in range(5, 12)]
    prompt = tuple(ids.history(history))
    con = Constraint(catalog, history)
    a_allowed = tuple(ids.level_ids("a", con.a_values()))
    requests = [
        ScoreRequest(prompt, a_allowed, top_n=5),
        ScoreRequest(prompt, a_allowed, want=a_allowed[:3]),
    ]
    remote = RemoteVllmEngine(vllm_server, info.version, None, 30)

    async def go():  # type: ignore[no-untyped-def]
        try:
            assert await remote.check_health()
            got = await remote.score(requests)
            searches = [BeamSearch(prompt, ids, con, 10)]
            await run_searches_async(searches, remote.score)
            return got, searches[0].beams
        finally:
            await remote.close()

    got, remote_beams = asyncio.run(go())
    want = batch_engine.score_batch(requests)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for token in g:
            assert g[token] == pytest.approx(w[token], abs=1e-4)
    local = BeamSearch(prompt, ids, con, 10)
    run_searches([local], batch_engine.score_batch)
    assert [b.code for b in remote_beams] == [b.code for b in local.beams]
