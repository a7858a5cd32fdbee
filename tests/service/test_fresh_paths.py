"""After a user acts: the event reaches the re-think stream, and until the user's entry is
re-thought the answer comes from one engine round or, when a round would not fit the budget
(or the settings say so), from the stored answer re-ranked with no engine round at all. The
real worker, the real core and a real redis-server; a fake engine."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from offline.catalog.covisit import build_covisit_file
from offline.items.artifact import save_item_model
from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
from service.contracts.catalog import Catalog
from service.contracts.item_model import ITEMS_DIR, left_padded
from service.contracts.item_network import ItemModelConfig, ItemSequenceModel
from service.contracts.snapshot import Keyspace
from service.core import DegradedReason, RecommendQuery, Source
from service.runtime import Runtime, open_runtime
from tests.fake_engine import FakeEngine, write_tiny_artifacts
from tests.inproc import make_settings

HISTORIES = {"u1": ["3", "4", "5"], "u2": ["1", "2"], "u3": ["10", "1", "11", "12"]}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("fresh")
    catalog_dir, model_dir = write_tiny_artifacts(root)
    interactions = root / "interactions.csv"
    rows = [f"{u},{i},{t}" for u, items in HISTORIES.items() for t, i in enumerate(items)]
    rows += [f"x{n},{i},{t}" for n in range(20) for t, i in enumerate((n % 9 + 1, 1, 7, n + 20))]
    interactions.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    build_covisit_file(catalog_dir, interactions)
    return catalog_dir, model_dir, interactions


@pytest.fixture(scope="module")
def artifacts_with_items(
    artifacts: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path, str]:
    """The same artifacts plus an item-level model in the model directory, made so that one
    item, TARGET, is the best item for u2's history after the event "7" and scores 0 for
    the history before it: only an encode of the fresh history can find it."""
    catalog_dir, model_dir, interactions = artifacts
    with_items = tmp_path_factory.mktemp("fresh-items") / "model"
    shutil.copytree(model_dir, with_items)
    catalog = Catalog.load(catalog_dir)
    torch.manual_seed(0)
    net = ItemSequenceModel(ItemModelConfig(num_items=len(catalog), dim=16, mixer="bsarec"))
    net.eval()
    rows = [catalog.row_of[i] for i in ("1", "2", "7")]
    target = catalog.row_of[TARGET]
    with torch.no_grad():
        old = net.user_vectors(left_padded([rows[:2]]))[0]
        new = net.user_vectors(left_padded([rows]))[0]
        only_new = new - (new @ old) / (old @ old) * old  # orthogonal to the old history
        net.items.weight[target + 1] = 50 * only_new / (only_new @ new)
    (with_items / ITEMS_DIR).mkdir()
    save_item_model(with_items / ITEMS_DIR, net, catalog.version, 0, {})
    return catalog_dir, with_items, interactions, TARGET


TARGET = "50"  # not in u2's history, its answer or the neighbours of "7"


@asynccontextmanager
async def serving(
    artifacts: tuple[Path, ...], redis_url: str, **recommend: Any
) -> AsyncIterator[tuple[Runtime, FakeEngine]]:
    catalog_dir, model_dir, interactions = artifacts[:3]
    job = ThinkAheadJob(prefixes=4, beam=4, answer_items=8, grace_s=0)
    run = ThinkAheadRun(model_dir, catalog_dir, interactions, redis_url, job)
    run.seed_histories(interactions)
    run.run(FakeEngine, progress=False)
    engine = FakeEngine()
    settings = make_settings(catalog_dir, model_dir, redis_url, recommend=recommend)
    async with open_runtime(settings, engine) as rt:
        await rt.watcher.refresh()
        engine.calls = 0
        yield rt, engine


async def test_an_event_is_announced_to_the_re_think_stream_once(artifacts, redis_url) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(redis_url)
    async with serving(artifacts, redis_url) as (rt, _):
        await rt.events.append("u1", ["7"])
        await rt.events.append("u1", ["8"], idempotency_key="k1")
        await rt.events.append("u1", ["8"], idempotency_key="k1")  # a retry: not again
        await rt.events.append("u1", ["no-such-item"])  # nothing stored: nothing to re-think
    entries = client.xrange(Keyspace().events)
    assert [fields[b"u"] for _, fields in entries] == [b"u1", b"u1"]


async def test_rerank_answers_a_fresh_event_without_an_engine_round(artifacts, redis_url) -> None:  # type: ignore[no-untyped-def]
    async with serving(artifacts, redis_url, fresh_path="rerank") as (rt, engine):
        unchanged = await rt.core.recommend(RecommendQuery("u2", k=5))
        assert unchanged.source is Source.THINK_AHEAD and engine.calls == 0
        await rt.events.append("u2", ["7"])
        fresh = await rt.core.recommend(RecommendQuery("u2", k=5))
    assert fresh.source is Source.THINK_AHEAD_RERANK and not fresh.degraded
    assert engine.calls == 0
    ids = [i.item_id for i in fresh.items]
    assert not {"1", "2", "7"} & set(ids)  # the history, the event included, stays out
    # "7" is followed by items 20+ in the other users' histories: its neighbours join
    assert any(int(i) >= 20 for i in ids)
    assert ids != [i.item_id for i in unchanged.items]


async def test_rerank_encodes_the_fresh_history_with_the_item_level_model(
    artifacts_with_items, redis_url
) -> None:  # type: ignore[no-untyped-def]
    """The no-engine answer after an event asks the service's item-level model about the fresh
    history: its best item (scored 0 under the old history, so not in the stored answer) leads
    the answer; without the model the same request re-ranks with the stored scores only."""
    target = artifacts_with_items[3]
    async with serving(artifacts_with_items, redis_url, fresh_path="rerank") as (rt, engine):
        assert rt.core.fresh_items is not None
        unchanged = await rt.core.recommend(RecommendQuery("u2", k=10))
        await rt.events.append("u2", ["7"])
        fresh = await rt.core.recommend(RecommendQuery("u2", k=10))
        items, rt.core.fresh_items = rt.core.fresh_items, None
        stored_only = await rt.core.recommend(RecommendQuery("u2", k=10))
        rt.core.fresh_items = items
    assert target not in {i.item_id for i in unchanged.items}
    assert fresh.source is stored_only.source is Source.THINK_AHEAD_RERANK
    assert engine.calls == 0 and fresh.timings.decode_ms == 0
    assert fresh.items[0].item_id == target
    assert target not in {i.item_id for i in stored_only.items}
    assert not {"1", "2", "7"} & {i.item_id for i in fresh.items}


async def test_auto_re_ranks_without_the_engine_when_the_fresh_history_is_encoded(
    artifacts_with_items, redis_url
) -> None:  # type: ignore[no-untyped-def]
    """With the item-level model in the service the re-rank is the better answer (validation:
    fresh-paths.md), so auto takes it even on an idle engine; without the model, the round."""
    async with serving(artifacts_with_items, redis_url) as (rt, engine):
        await rt.events.append("u3", ["7"])
        encoded = await rt.core.recommend(RecommendQuery("u3", k=5))
        assert encoded.source is Source.THINK_AHEAD_RERANK and engine.calls == 0
        rt.core.fresh_items = None
        round_ = await rt.core.recommend(RecommendQuery("u3", k=5))
    assert round_.source is Source.THINK_AHEAD and engine.calls == 1


async def test_a_user_without_an_entry_is_answered_by_the_item_level_model(
    artifacts_with_items, redis_url
) -> None:  # type: ignore[no-untyped-def]
    """No snapshot entry but a history (a new user who acted): the item-level model answers it
    with no engine round (it beats the decoder's full decode on Beauty test); a user with no
    history at all still gets the shared full decode, and without the model a full decode."""
    target = artifacts_with_items[3]
    async with serving(artifacts_with_items, redis_url) as (rt, engine):
        await rt.events.append("new-user", ["1", "2", "7"])
        known = await rt.core.recommend(RecommendQuery("new-user", k=10))
        assert engine.calls == 0
        cold = await rt.core.recommend(RecommendQuery("never-seen", k=10))
        assert engine.calls > 0
        rt.core.fresh_items, calls = None, engine.calls
        decoded = await rt.core.recommend(RecommendQuery("new-user", k=10))
    assert known.source is Source.ITEM_LEVEL and known.degraded_reason is DegradedReason.NO_PREFIXES
    assert known.items[0].item_id == target and known.timings.decode_ms == 0
    assert not {"1", "2", "7"} & {i.item_id for i in known.items}
    assert cold.source is Source.FULL_DECODE
    assert decoded.source is Source.FULL_DECODE and engine.calls > calls


async def test_auto_takes_the_round_until_rounds_stop_fitting_the_budget(
    artifacts, redis_url
) -> None:  # type: ignore[no-untyped-def]
    async with serving(artifacts, redis_url, default_budget_ms=200) as (rt, engine):
        await rt.events.append("u3", ["7"])
        first = await rt.core.recommend(RecommendQuery("u3", k=5))
        assert first.source is Source.THINK_AHEAD and engine.calls == 1  # a fast engine: fits
        engine.delay_s = 0.5  # the engine slows down past the budget
        cut = await rt.core.recommend(RecommendQuery("u3", k=5))
        assert cut.degraded  # this one learned it the hard way
        calls = engine.calls
        after = await rt.core.recommend(RecommendQuery("u3", k=5))
    assert after.source is Source.THINK_AHEAD_RERANK and not after.degraded
    assert engine.calls == calls  # not sent to the slow engine
    assert after.timings.total_ms < 200


async def test_auto_keeps_about_one_round_in_flight_whatever_the_budget(
    artifacts, redis_url
) -> None:  # type: ignore[no-untyped-def]
    """A generous budget: the engine would answer every fresh user in time, one after another
    behind a queue. The target keeps a busy engine's queue short instead: a fresh user arriving
    while a round is in flight, on an engine whose idle round is 60 ms, is re-ranked at once."""
    async with serving(artifacts, redis_url, default_budget_ms=2000, fresh_round_target_ms=100) as (
        rt,
        engine,
    ):
        await rt.events.append("u3", ["7"])
        await rt.events.append("u1", ["7"])
        engine.delay_s = 0.06
        alone = await rt.core.recommend(RecommendQuery("u3", k=5))
        assert alone.source is Source.THINK_AHEAD and engine.calls == 1  # idle: 72 ms fits
        engine.delay_s = 0.5
        busy = asyncio.create_task(rt.core.recommend(RecommendQuery("u3", k=5)))
        for _ in range(200):  # until that round is in flight
            if rt.core.rounds.rounds_in_flight:
                break
            await asyncio.sleep(0.01)
        assert rt.core.rounds.rounds_in_flight == 1
        queued = await rt.core.recommend(RecommendQuery("u1", k=5))
        assert rt.core.rounds.rounds_in_flight == 1  # answered while the round went on
        assert queued.source is Source.THINK_AHEAD_RERANK and not queued.degraded
        assert (await busy).source is Source.THINK_AHEAD
    assert engine.calls == 2  # the re-ranked user asked the engine nothing


async def test_users_without_history_share_one_decode(artifacts, redis_url) -> None:  # type: ignore[no-untyped-def]
    """Every never-seen user with nothing excluded decodes the same empty prompt under the
    same constraint: the first one pays the engine, the next ones are answered without it;
    a history or an exclusion is decoded for itself."""
    async with serving(artifacts, redis_url) as (rt, engine):
        first = await rt.core.recommend(RecommendQuery("cold-1", k=5))
        paid = engine.calls
        second = await rt.core.recommend(RecommendQuery("cold-2", k=5))
        assert engine.calls == paid > 0
        excluded = first.items[0].item_id
        own = await rt.core.recommend(RecommendQuery("cold-3", k=5, exclude_item_ids=[excluded]))
        assert engine.calls > paid
        paid = engine.calls
        seen = await rt.core.recommend(RecommendQuery("cold-4", k=5, recent_item_ids=["7"]))
        assert engine.calls > paid
    assert first.source is second.source is Source.FULL_DECODE
    assert second.degraded and second.degraded_reason == first.degraded_reason
    assert [i.item_id for i in second.items] == [i.item_id for i in first.items]
    assert second.timings.decode_ms == 0 < first.timings.decode_ms
    assert excluded not in {i.item_id for i in own.items}
    assert "7" not in {i.item_id for i in seen.items}
