"""``thinkahead eval --stale-events N`` plans as the service does after fresh events: with the
snapshot's log P(c | a, b) reused (computed for the stale history by the worker's own function),
the snapshot prefixes need no c step. The fake engine's c log-probs do not depend on the
history, so reuse is exact here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from offline.data import Example
from offline.eval.candidates import ThinkAheadEval, think_ahead_candidates
from offline.eval.job import reused_steps
from service.contracts.catalog import Catalog
from service.contracts.fusion import FusionWeights
from service.contracts.model import load_model_info
from service.contracts.think_ahead import ScoringSettings
from service.engine.base import ScoreRequest, TokenLogprobs
from tests.fake_engine import FakeEngine, write_tiny_artifacts

HISTORIES = [["3", "4", "5", "6"], ["1", "2", "9"], ["10", "1", "11", "12", "7"]]


class CountingEngine(FakeEngine):
    """Records each batch's size: the last one of a chunk is the online step's."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]:
        self.batches.append(len(requests))
        return super().score_batch(requests)


@pytest.mark.parametrize("prune", [False, True])
def test_stale_history_reuses_the_stored_c_steps(tmp_path: Path, prune: bool) -> None:
    catalog_dir, model_dir = write_tiny_artifacts(tmp_path)
    catalog = Catalog.load(catalog_dir)
    info = load_model_info(model_dir, catalog)
    examples = [Example(f"u{n}", h, "20") for n, h in enumerate(HISTORIES)]
    scored, requests = {}, {}
    for reuse in (True, False):
        engine = CountingEngine()
        scoring = ScoringSettings(
            weights=FusionWeights(offline=1.0),
            covisit_candidates=0,
            prefixes=4,
            reuse_snapshot_c=reuse,
        )
        spec = ThinkAheadEval(scoring, beam=4, k=5, stale_events=1, prune=prune, progress=False)
        users, _ = think_ahead_candidates(engine, info, catalog, examples, spec, {})
        scored[reuse] = [sorted((s.code, s.decoder) for s in u.scored) for u in users]
        requests[reuse] = engine.batches[-1]  # one chunk: the online step's batch
    assert requests[True] < requests[False]
    for ours, fresh in zip(scored[True], scored[False], strict=True):
        assert [code for code, _ in ours] == [code for code, _ in fresh]
        assert [d for _, d in ours] == pytest.approx([d for _, d in fresh], abs=1e-5)


def test_the_report_label_says_which_steps_were_reused() -> None:
    assert reused_steps(True, True) == ", log P(b | a) and log P(c | a, b) reused"
    assert reused_steps(False, True) == ", log P(c | a, b) reused"
    assert reused_steps(False, False) == ", all steps fresh"
