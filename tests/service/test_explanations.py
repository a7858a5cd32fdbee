"""Explanations over both transports, in seconds: the real worker thinks about users in
categories (fake engine), the service in-process answers REST and gRPC over real sockets with
the stored rationale, rendered and structured, and says why when there is none; never an
error."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import httpx
import pytest
import redis

from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
from service.api._proto.thinkahead.v1 import recommender_pb2 as pb
from service.api._proto.thinkahead.v1 import recommender_pb2_grpc as pb_grpc
from service.contracts.catalog import Catalog
from service.contracts.snapshot import Keyspace, UserPrefixes
from tests.fake_engine import FakeEngine
from tests.inproc import make_settings, serve_in_process
from tests.offline.test_category_reasoning import reasoning_world


@pytest.fixture
def world(tmp_path: Path, redis_url: str) -> tuple[Path, Path, str]:
    catalog_dir, model_dir, inter = reasoning_world(tmp_path)
    run = ThinkAheadRun(
        model_dir, catalog_dir, inter, redis_url, ThinkAheadJob(prefixes=6, beam=6, grace_s=0)
    )
    run.seed_histories(inter)
    run.run(FakeEngine, progress=False)
    return catalog_dir, model_dir, redis_url


async def test_the_stored_rationale_explains_the_answer_on_both_transports(world) -> None:  # type: ignore[no-untyped-def]
    catalog_dir, model_dir, url = world
    catalog = Catalog.load(catalog_dir)
    client = redis.Redis.from_url(url)
    keys = Keyspace()
    sid = client.get(keys.current).decode()
    history = [i.decode() for i in client.lrange(keys.history("u3"), 0, -1)]
    stored = UserPrefixes.decode(client.get(keys.user(sid, "u3")))
    async with serve_in_process(make_settings(catalog_dir, model_dir, url), FakeEngine()) as svc:
        async with httpx.AsyncClient(base_url=svc.base_url) as http:
            body = {"user_id": "u3", "k": 5, "include_reasoning": True}
            answer = (await http.post("/v1/recommend", json=body)).json()
            plain = await http.post("/v1/recommend", json={**body, "include_reasoning": False})
            cold = (await http.post("/v1/recommend", json={**body, "user_id": "nobody"})).json()
            schema = (await http.get("/openapi.json")).json()["components"]["schemas"]
        async with grpc.aio.insecure_channel(svc.grpc_target) as channel:
            reply = await pb_grpc.RecommenderStub(channel).Recommend(
                pb.RecommendRequest(user_id="u3", k=5, include_reasoning=True)
            )
    assert answer["source"] == "think_ahead" and answer["reasoning_absent"] is None
    rationale = answer["rationale"]
    assert catalog.categories is not None
    assert rationale["category"] in {catalog.categories.text(i) for i in range(6)}
    assert rationale["words"] == rationale["category"].split(" > ")
    assert 0 < rationale["probability"] <= 1
    assert set(rationale["evidence_item_ids"]) <= set(history)
    assert answer["reasoning"].startswith(f"next: {rationale['category']} (")
    assert len(rationale["alternatives"]) == 2  # the worker keeps 3 rationales
    assert rationale["basis"] == "stated" and reply.rationale.basis == "stated"
    assert stored.rationales  # what the service read
    # not asked: nothing; a cold user: none, and why
    assert plain.json()["rationale"] is None and plain.json()["reasoning_absent"] is None
    assert cold["rationale"] is None and cold["reasoning_absent"] == "no_entry"
    assert cold["degraded"] and cold["source"] != "think_ahead"
    assert {"RationaleOut", "AlternativeOut"} <= set(schema)
    # gRPC says the same
    assert reply.rationale.category == rationale["category"]
    assert list(reply.rationale.evidence_item_ids) == rationale["evidence_item_ids"]
    assert reply.reasoning == answer["reasoning"] and reply.reasoning_absent == ""


async def test_a_model_without_reasoning_says_so(tmp_path: Path, redis_url: str) -> None:
    from tests.fake_engine import write_tiny_artifacts

    catalog_dir, model_dir = write_tiny_artifacts(tmp_path)
    inter = tmp_path / "interactions.csv"
    inter.write_text("user_id,item_id,timestamp\nu1,3,0\nu1,4,1\n")
    run = ThinkAheadRun(model_dir, catalog_dir, inter, redis_url, ThinkAheadJob(grace_s=0))
    run.seed_histories(inter)
    run.run(FakeEngine, progress=False)
    async with (
        serve_in_process(make_settings(catalog_dir, model_dir, redis_url), FakeEngine()) as svc,
        httpx.AsyncClient(base_url=svc.base_url) as http,
    ):
        body = {"user_id": "u1", "k": 3, "include_reasoning": True}
        answer = (await http.post("/v1/recommend", json=body)).json()
    assert answer["source"] == "think_ahead"
    assert answer["rationale"] is None and answer["reasoning_absent"] == "no_rationale"


async def test_a_plain_model_explains_its_answer_by_where_it_lies(
    tmp_path: Path, redis_url: str
) -> None:
    """No stated rationale, but a catalog with categories: the worker stores the category
    share of the user's own stored answer (basis "answer"); the service shows it as is."""
    from service.contracts.answers import unpack_answer
    from service.contracts.rationale import DEFAULT_RATIONALE, Categories, answer_rationales
    from tests.fake_engine import write_tiny_artifacts

    catalog_dir, model_dir = write_tiny_artifacts(tmp_path)
    catalog = Catalog.load(catalog_dir)
    paths = [("Makeup", "Nails"), ("Makeup", "Lips"), ("Hair",)]
    Categories.from_paths([paths[r % 3] for r in range(len(catalog))]).save(catalog_dir)
    catalog = Catalog.load(catalog_dir)
    assert catalog.categories is not None
    inter = tmp_path / "interactions.csv"
    inter.write_text("user_id,item_id,timestamp\nu1,3,0\nu1,4,1\nu1,7,2\n")
    run = ThinkAheadRun(model_dir, catalog_dir, inter, redis_url, ThinkAheadJob(grace_s=0))
    run.seed_histories(inter)
    run.run(FakeEngine, progress=False)
    client = redis.Redis.from_url(redis_url)
    keys = Keyspace()
    stored = UserPrefixes.decode(client.get(keys.user(client.get(keys.current).decode(), "u1")))
    answer_items = [(catalog.item_at(c), s) for c, s in unpack_answer(stored.answer)]
    expected = answer_rationales(
        answer_items,
        catalog.categories,
        catalog.categories.of_items(catalog.item_ids),
        ["3", "4", "7"],
        settings=DEFAULT_RATIONALE,  # the model has no serving.json: the learned default mix
    )
    assert expected and {r.basis for r in expected} == {"answer"}
    alone = answer_rationales(
        answer_items,
        catalog.categories,
        catalog.categories.of_items(catalog.item_ids),
        ["3", "4", "7"],
    )
    # the history's share counts: the stored probabilities are not the answer's alone
    assert [r.logprob for r in expected] != [r.logprob for r in alone]
    async with serve_in_process(
        make_settings(catalog_dir, model_dir, redis_url), FakeEngine()
    ) as svc:
        async with httpx.AsyncClient(base_url=svc.base_url) as http:
            body = {"user_id": "u1", "k": 3, "include_reasoning": True}
            answer = (await http.post("/v1/recommend", json=body)).json()
        async with grpc.aio.insecure_channel(svc.grpc_target) as channel:
            reply = await pb_grpc.RecommenderStub(channel).Recommend(
                pb.RecommendRequest(user_id="u1", k=3, include_reasoning=True)
            )
    assert answer["source"] == "think_ahead" and answer["reasoning_absent"] is None
    rationale = answer["rationale"]
    assert rationale["basis"] == "answer" and reply.rationale.basis == "answer"
    assert rationale["category"] == catalog.categories.text(expected[0].category)
    assert rationale["probability"] == pytest.approx(math.exp(expected[0].logprob), abs=1e-4)
    assert answer["reasoning"].startswith(f"mostly {rationale['category']} (")
    assert set(rationale["evidence_item_ids"]) <= {"3", "4", "7"}
    assert reply.rationale.category == rationale["category"]
