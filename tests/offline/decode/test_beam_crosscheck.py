"""vLLM's constrained beam search (per-step allowed_token_ids, processed log-probs) against the
independent transformers reference, on the tiny trained model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from offline.decode.torch_beam import beam_search_batch
from service.contracts.beam import BeamSearch, run_searches
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.model import load_model_info

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def world(tiny_world):  # type: ignore[no-untyped-def]
    catalog = Catalog.load(tiny_world.catalog_dir)
    info = load_model_info(tiny_world.model_dir, catalog)
    model = LlamaForCausalLM.from_pretrained(tiny_world.model_dir).eval()
    histories = [[catalog.code_at(r) for r in range(s, s + 6)] for s in range(0, 120, 15)]
    return catalog, info, model, histories


@pytest.mark.parametrize("depth", [2, 3])
def test_vllm_and_transformers_agree_on_top_k(world, batch_engine, depth: int) -> None:  # type: ignore[no-untyped-def]
    catalog, info, model, histories = world
    constraints = [Constraint(catalog, h) for h in histories]
    reference = beam_search_batch(model, info.token_ids, constraints, histories, 10, depth=depth)
    searches = [
        BeamSearch(info.token_ids.history(h), info.token_ids, c, 10, depth=depth)
        for h, c in zip(histories, constraints, strict=True)
    ]
    run_searches(searches, batch_engine.score_batch)
    for ref, search in zip(reference, searches, strict=True):
        assert [b.code for b in search.beams] == [b.code for b in ref]
        got = torch.tensor([b.score for b in search.beams])
        want = torch.tensor([b.score for b in ref])
        assert torch.allclose(got, want, atol=1e-3)


def test_every_beam_is_a_real_unexcluded_item(world, batch_engine) -> None:  # type: ignore[no-untyped-def]
    catalog, info, _, histories = world
    for history in histories:
        constraint = Constraint(catalog, history)
        search = BeamSearch(info.token_ids.history(history), info.token_ids, constraint, 40)
        run_searches([search], batch_engine.score_batch)
        assert len(search.beams) == 40
        for beam in search.beams:
            assert catalog.item_at(beam.code) is not None  # type: ignore[arg-type]
            assert beam.code not in history
        scores = [b.score for b in search.beams]
        assert scores == sorted(scores, reverse=True)


def test_beam_wider_than_the_catalog_returns_every_allowed_item(world, batch_engine) -> None:  # type: ignore[no-untyped-def]
    catalog, info, _, histories = world
    constraint = Constraint(catalog, histories[0])
    search = BeamSearch(
        info.token_ids.history(histories[0]), info.token_ids, constraint, len(catalog) + 50
    )
    run_searches([search], batch_engine.score_batch)
    assert len(search.beams) == len(catalog) - len(histories[0])


def test_wanted_and_top_n_requests_can_share_a_batch(world, batch_engine) -> None:  # type: ignore[no-untyped-def]
    """Regression: vLLM 0.32 truncates top-N answers to the sampled token when a batch also
    holds logprob_token_ids requests; the engine adapter must not depend on that feature."""
    from service.engine.base import ScoreRequest

    catalog, info, _, histories = world
    ids = info.token_ids
    prompt = tuple(ids.history(histories[0]))
    allowed = tuple(ids.level_ids("a", Constraint(catalog, histories[0]).a_values()))
    top = ScoreRequest(prompt, allowed, top_n=5)
    wanted = ScoreRequest(prompt, allowed, want=allowed[:3])
    alone = batch_engine.score_batch([top])[0]
    mixed_top, mixed_wanted = batch_engine.score_batch([top, wanted])
    assert len(alone) == 5 and mixed_top == alone
    assert set(mixed_wanted) == set(allowed[:3])
    for token, logprob in mixed_wanted.items():
        if token in alone:
            assert logprob == pytest.approx(alone[token], abs=1e-5)
