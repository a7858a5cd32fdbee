"""The recommend chain with co-visitation, in seconds: the core over a real redis-server and a
fake engine (softmax over the allowed tokens). Co-visitation neighbours of the fresh history
join the think-ahead candidates, lift items through the fused score, and answer as
``fallback_covisitation`` when the decoder cannot."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis

from offline.thinkahead.entries import stored_scores
from offline.thinkahead.prefixes import UserResult
from offline.thinkahead.publish import SnapshotWriter
from service.contracts.affinity import NO_AFFINITY
from service.contracts.catalog import Catalog
from service.contracts.covisit import Neighbours
from service.contracts.fusion import FusionWeights
from service.contracts.manifest import SnapshotManifest
from service.contracts.model import ModelInfo, ServingConfig, load_model_info
from service.contracts.snapshot import Keyspace, Prefix, UserPrefixes, history_digest
from service.contracts.think_ahead import ScoringSettings, ThinkAheadScorer
from service.core import DegradedReason, RecommendQuery, Source
from service.engine.base import ScoreRequest
from service.runtime import Runtime, open_runtime
from tests.fake_engine import FAKE_MODEL_VERSION, FakeEngine, write_tiny_artifacts
from tests.inproc import make_settings

SID = "snap-covisit-1"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    catalog_dir, model_dir = write_tiny_artifacts(tmp_path_factory.mktemp("covisit"))
    # served weights as `thinkahead tune-blend` would record them
    ServingConfig(weights=FusionWeights(covisit=4.0), covisit_candidates=5).write(model_dir)
    return catalog_dir, model_dir


def publish(
    redis_url: str,
    catalog: Catalog,
    users: dict[str, list[str]],
    model: ModelInfo | None = None,
) -> None:
    """A snapshot whose prefixes avoid item "7", plus co-visitation: "7" follows "1". With a
    ``model``, values carry the worker's log P(a, b) of the co-visitation prefixes."""
    writer = SnapshotWriter(redis.Redis.from_url(redis_url), Keyspace(), ttl_s=600)
    manifest = SnapshotManifest(
        snapshot_id=SID, model_version=FAKE_MODEL_VERSION, catalog_version=catalog.version
    )
    writer.begin(manifest)
    seven = catalog.code_of("7")
    assert seven is not None
    prefixes = tuple(
        Prefix(int(a), int(b), -1.0 - i)
        for i, (a, b) in enumerate(sorted(catalog.rows_under_ab))
        if (a, b) != seven[:2]
    )[:4]
    values = []
    neighbours = {"1": Neighbours(("7", "9"), (30.0, 1.0))}
    for user, history in users.items():
        codes = catalog.codes_of(history)[0]
        heads: tuple[Prefix, ...] = ()
        if model is not None:
            scorer = ThinkAheadScorer(
                catalog, model.token_ids, ScoringSettings(covisit_candidates=5)
            )
            (scores,) = stored_scores(
                FakeEngine(),
                scorer,
                [codes],
                [UserResult(list(prefixes), None)],
                neighbours,
                [NO_AFFINITY],
                tail_prefixes=0,
            )
            heads = scores.heads
        values.append(
            (
                user,
                UserPrefixes(
                    FAKE_MODEL_VERSION,
                    catalog.version,
                    time.time(),
                    prefixes,
                    history_digest=history_digest(codes),
                    covisit_heads=heads,
                ),
            )
        )
    writer.write_shard(SID, 0, values)
    writer.write_covisit(SID, list(neighbours.items()))
    writer.publish(manifest)
    writer.seed_histories(users.items(), cap=50)


@asynccontextmanager
async def running(
    artifacts: tuple[Path, Path], redis_url: str, worker_heads: bool = False
) -> AsyncIterator[Runtime]:
    catalog_dir, model_dir = artifacts
    catalog = Catalog.load(catalog_dir)
    model = load_model_info(model_dir, catalog) if worker_heads else None
    publish(redis_url, catalog, {"u1": ["3", "4"], "u2": ["1"]}, model)
    settings = make_settings(catalog_dir, model_dir, redis_url)
    async with open_runtime(settings, FakeEngine()) as rt:
        await rt.watcher.refresh()
        yield rt


async def test_served_weights_come_from_serving_json(
    artifacts: tuple[Path, Path], redis_url: str
) -> None:
    async with running(artifacts, redis_url) as runtime:
        scoring = runtime.core.scorer.settings
        assert scoring.weights == FusionWeights(covisit=4.0)
        assert runtime.settings.recommend.covisit_candidates is None  # resolved in the core
        assert scoring.covisit_candidates == 5


async def test_a_fresh_event_brings_its_neighbours_into_the_candidates(
    artifacts: tuple[Path, Path], redis_url: str
) -> None:
    async with running(artifacts, redis_url) as runtime:
        before = await runtime.core.recommend(RecommendQuery("u1", k=5))
        assert before.source is Source.THINK_AHEAD and "7" not in [i.item_id for i in before.items]
        after = await runtime.core.recommend(RecommendQuery("u1", k=5, recent_item_ids=("1",)))
        assert after.source is Source.THINK_AHEAD
        # "7" is under no snapshot prefix: only co-visitation of the fresh "1" can bring it, and
        # its co-visitation feature puts it first
        assert after.items[0].item_id == "7"
        assert "1" not in [i.item_id for i in after.items]  # history stays excluded


async def test_without_the_feature_weight_the_neighbour_is_only_a_candidate(
    artifacts: tuple[Path, Path],
    redis_url: str,
) -> None:
    async with running(artifacts, redis_url) as runtime:
        core = runtime.core
        fused = await core.recommend(RecommendQuery("u2", k=60))
        core.use_scoring(core.scorer.settings.model_copy(update={"weights": FusionWeights()}))
        plain = await core.recommend(RecommendQuery("u2", k=60))
        assert fused.source is plain.source is Source.THINK_AHEAD
        with_feature = {i.item_id: i.score for i in fused.items}
        decoder_only = {i.item_id: i.score for i in plain.items}
        # "7" is scored by the decoder either way; the feature adds exactly 4 * log(1 + 30)
        assert "7" in decoder_only
        assert with_feature["7"] - decoder_only["7"] == pytest.approx(4 * math.log1p(30.0))
        assert with_feature["2"] == pytest.approx(decoder_only["2"])  # no co-visitation


async def test_engine_down_users_with_recent_items_get_covisitation(
    artifacts: tuple[Path, Path], redis_url: str
) -> None:
    async with running(artifacts, redis_url) as runtime:
        engine = runtime.engine
        assert isinstance(engine, FakeEngine)
        engine.down = True
        answer = await runtime.core.recommend(RecommendQuery("u2", k=3))
        assert answer.source is Source.COVISITATION
        assert answer.degraded_reason is DegradedReason.ENGINE_UNAVAILABLE
        assert [i.item_id for i in answer.items[:2]] == ["7", "9"]
        assert answer.backfilled == 1  # the third is a popular item
        cold = await runtime.core.recommend(RecommendQuery("nobody", k=3))
        assert cold.source is Source.GLOBAL_POPULAR  # no recent items: nothing to co-visit


async def test_neighbours_are_cached_so_redis_outages_keep_covisitation(
    artifacts: tuple[Path, Path], redis_url: str
) -> None:
    async with running(artifacts, redis_url) as runtime:
        runtime.engine.down = True  # type: ignore[attr-defined]
        first = await runtime.core.recommend(RecommendQuery("u2", k=2))
        assert first.source is Source.COVISITATION
        redis.Redis.from_url(redis_url).delete(Keyspace().covisit(SID, "1"))
        again = await runtime.core.recommend(RecommendQuery("u2", k=2))
        assert [i.item_id for i in again.items] == [i.item_id for i in first.items]
        # recent items from the request itself work too, with no stored history
        fresh = await runtime.core.recommend(RecommendQuery("nobody", k=2, recent_item_ids=("1",)))
        assert fresh.source is Source.COVISITATION and fresh.items[0].item_id == "7"


async def test_worker_heads_spare_an_unchanged_users_a_and_b_steps(
    artifacts: tuple[Path, Path], redis_url: str
) -> None:
    answers = {}
    for worker_heads in (False, True):
        async with running(artifacts, redis_url, worker_heads) as runtime:
            engine = runtime.engine
            assert isinstance(engine, FakeEngine)
            sent: list[ScoreRequest] = []
            real = engine.score

            async def spy(requests: list[ScoreRequest], real=real, sent=sent):  # type: ignore[no-untyped-def]
                sent.extend(requests)
                return await real(requests)

            engine.score = spy  # type: ignore[method-assign]
            rec = await runtime.core.recommend(RecommendQuery("u2", k=5))
            assert rec.source is Source.THINK_AHEAD
            sid_begin = runtime.model.token_ids.sid_begin
            a_steps = [r for r in sent if r.prompt[-1] == sid_begin]
            answers[worker_heads] = ([(i.item_id, i.score) for i in rec.items], a_steps)
    assert answers[False][1] and not answers[True][1]  # the a/b steps are gone
    ranked, plain = answers[True][0], answers[False][0]
    assert [i for i, _ in ranked] == [i for i, _ in plain] and "7" in dict(ranked)
    assert [s for _, s in ranked] == pytest.approx([s for _, s in plain], abs=1e-6)
