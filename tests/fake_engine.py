"""A fast layer under the real tests: a deterministic fake engine and tiny on-disk artifacts
(catalog + model directory with manifest and tokenizer), so the REST and gRPC apps run
in-process in seconds without vLLM."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service.contracts.catalog import POPULARITY_FILE, catalog_version_of, write_codes
from service.contracts.manifest import CatalogManifest, ModelManifest
from service.contracts.tokens import SPECIAL_TOKENS, all_item_tokens
from service.engine.base import EngineError, ScoreRequest, TokenLogprobs

FAKE_MODEL_VERSION = "fake-model-v1"


class FakeEngine:
    """Implements :class:`service.engine.base.Engine`: a softmax over the allowed tokens of
    logits that depend only on (last prompt token, token), so answers are reproducible.
    ``down`` makes every call fail like a dead engine; ``delay_s`` makes it slow."""

    def __init__(self, model_version: str = FAKE_MODEL_VERSION) -> None:
        self.model_version = model_version
        self.down = False
        self.delay_s = 0.0
        self.calls = 0

    @staticmethod
    def _logit(last: int, token: int) -> float:
        return ((token * 2654435761 + last * 40503) % 1009) / 200.0

    def _one(self, request: ScoreRequest) -> TokenLogprobs:
        last = request.prompt[-1] if request.prompt else 0
        logits = {t: self._logit(last, t) for t in request.allowed}
        top = max(logits.values())
        norm = top + math.log(sum(math.exp(v - top) for v in logits.values()))
        logprobs = {t: v - norm for t, v in logits.items()}
        if request.want is not None:
            return {t: logprobs[t] for t in request.want if t in logprobs}
        ranked = sorted(logprobs.items(), key=lambda kv: (-kv[1], kv[0]))
        return dict(ranked[: request.n_logprobs])

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]:
        """The same answers as an offline :class:`BatchEngine` (the worker's side)."""
        return [self._one(r) for r in requests]

    async def score(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.down:
            raise EngineError("fake engine is down")
        return [self._one(r) for r in requests]

    async def check_health(self) -> bool:
        return not self.down

    def is_dead(self) -> bool:
        return False

    async def close(self) -> None:
        return None


def write_tiny_artifacts(root: Path, n_items: int = 60, k: int = 4) -> tuple[Path, Path]:
    """A catalog of ``n_items`` items with distinct codes over K=``k`` and a model directory
    (manifest + tokenizer.json with the contract's tokens) built for it: (catalog, model)."""
    if n_items > k**3:
        raise ValueError("more items than codes")
    catalog_dir, model_dir = root / "catalog", root / "model"
    catalog_dir.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    all_codes = np.array([(a, b, c) for a in range(k) for b in range(k) for c in range(k)])
    codes = all_codes[rng.permutation(len(all_codes))[:n_items]].astype(np.int32)
    item_ids = [str(i + 1) for i in range(n_items)]
    write_codes(catalog_dir / "codes.csv", item_ids, codes)
    np.save(catalog_dir / POPULARITY_FILE, rng.integers(1, 100, size=n_items).astype(np.float64))
    version = catalog_version_of(item_ids, codes, k)
    CatalogManifest(
        catalog_version=version, codebook_size=k, num_items=n_items, embedding_model="none"
    ).write(catalog_dir)
    ModelManifest(model_version=FAKE_MODEL_VERSION, catalog_version=version, codebook_size=k).write(
        model_dir
    )
    tokens = [*SPECIAL_TOKENS, *all_item_tokens(k)]
    vocab = {t: i for i, t in enumerate(tokens)}
    (model_dir / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": vocab}, "added_tokens": []})
    )
    return catalog_dir, model_dir
