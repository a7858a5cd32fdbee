"""The plain-PyTorch batch engine answers the service's score requests as vLLM does: the eval
may rank every test user with it and still be the service's own scoring."""

from __future__ import annotations

import pytest

from offline.decode.torch_engine import TorchBatchEngine
from offline.eval.candidates import ThinkAheadEval, rank_candidates, think_ahead_candidates
from offline.eval.examples import select_examples
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.covisit import CovisitTable
from service.contracts.fusion import FusionWeights
from service.contracts.model import load_model_info
from service.contracts.scoring import candidate_prefixes, plan_item_scoring
from service.contracts.think_ahead import ScoringSettings

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def world(tiny_world):  # type: ignore[no-untyped-def]
    catalog = Catalog.load(tiny_world.catalog_dir)
    info = load_model_info(tiny_world.model_dir, catalog)
    examples, _ = select_examples(tiny_world.interactions_csv, "test", 50, 40)
    covisit = CovisitTable.load(tiny_world.catalog_dir, catalog.item_ids, catalog.version)
    return (
        catalog,
        info,
        examples,
        covisit.as_mapping(),
        TorchBatchEngine(tiny_world.model_dir, info.token_ids),
    )


def test_same_answers_as_vllm_for_every_kind_of_request(world, batch_engine) -> None:  # type: ignore[no-untyped-def]
    catalog, info, examples, _, torch_engine = world
    ids = info.token_ids
    requests = []
    for e in examples[:12]:
        history = catalog.codes_of(e.history)[0]
        ab = sorted({(int(a), int(b)) for a, b, _ in catalog.codes[:: 7 + len(history)]})[:6]
        candidates = candidate_prefixes([], ab)  # a, b and c steps all needed
        plan = plan_item_scoring(
            ids.history(history), candidates, Constraint(catalog, history), ids, top_c=4
        )
        requests += plan.requests
    assert {len(r.prompt) - len(requests[0].prompt) for r in requests} != {0}
    ours = torch_engine.score_batch(requests)
    theirs = batch_engine.score_batch(requests)
    for request, a, b in zip(requests, ours, theirs, strict=True):
        assert set(a) == set(b), request
        for token in a:
            assert a[token] == pytest.approx(b[token], abs=1e-3)


def test_think_ahead_eval_ranks_alike_on_both_engines(world, batch_engine) -> None:  # type: ignore[no-untyped-def]
    catalog, info, examples, covisit, torch_engine = world
    weights = FusionWeights(offline=0.5, covisit=2.0)
    ranked = {}
    for name, engine in (("torch", torch_engine), ("vllm", batch_engine)):
        scoring = ScoringSettings(weights=weights, covisit_candidates=5, prefixes=8)
        spec = ThinkAheadEval(scoring, beam=8, k=10, progress=False)
        users, _ = think_ahead_candidates(engine, info, catalog, examples, spec, covisit)
        ranked[name], invalid = rank_candidates(catalog, users, weights, 10)
        assert invalid == 0
    same = sum(a == b for a, b in zip(ranked["torch"], ranked["vllm"], strict=True))
    assert same >= 0.9 * len(examples)  # float ties may swap a pair now and then
