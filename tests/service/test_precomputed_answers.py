"""Whole answers stored by the worker: an unchanged user is answered from Redis alone, exactly
as the engine path would answer, and anything that changes the scoring goes to the engine.
The real worker (``ThinkAheadRun``) and the core over a real redis-server, with a fake engine."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis

from offline.catalog.covisit import build_covisit_file
from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
from service.contracts.answers import pack_answer, unpack_answer
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.fusion import FusionWeights
from service.contracts.model import ServingConfig
from service.contracts.packed import unpack_scored
from service.contracts.snapshot import Keyspace, UserPrefixes
from service.contracts.think_ahead import ScoringSettings
from service.core import Recommendation, RecommendQuery, Source
from service.engine.base import ScoreRequest
from service.runtime import Runtime, open_runtime
from tests.fake_engine import FakeEngine, write_tiny_artifacts
from tests.inproc import make_settings

HISTORIES = {
    "u1": ["3", "4", "5"],
    "u2": ["1", "2"],
    "u3": ["10", "1", "11", "12"],
    "u4": ["7"],
}
STORED = 6  # answer items per user


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("answers")
    catalog_dir, model_dir = write_tiny_artifacts(root)
    interactions = root / "interactions.csv"
    rows = [f"{u},{i},{t}" for u, items in HISTORIES.items() for t, i in enumerate(items)]
    # other users make the co-visitation table richer than the histories above
    rows += [f"x{n},{i},{t}" for n in range(20) for t, i in enumerate((n % 9 + 1, 1, 7, n + 20))]
    interactions.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    build_covisit_file(catalog_dir, interactions)
    ServingConfig(
        weights=FusionWeights(offline=1.0, covisit=4.0, popularity=0.5), covisit_candidates=5
    ).write(model_dir)
    return catalog_dir, model_dir, interactions


def think_ahead(
    artifacts: tuple[Path, Path, Path], redis_url: str, answer_items: int, c_tails: bool = True
) -> str:
    catalog_dir, model_dir, interactions = artifacts
    job = ThinkAheadJob(prefixes=4, beam=4, answer_items=answer_items, grace_s=0, c_tails=c_tails)
    run = ThinkAheadRun(model_dir, catalog_dir, interactions, redis_url, job)
    run.seed_histories(interactions)
    return run.run(FakeEngine, progress=False).snapshot_id


@asynccontextmanager
async def serving(
    artifacts: tuple[Path, Path, Path], redis_url: str, answer_items: int, c_tails: bool = True
) -> AsyncIterator[tuple[Runtime, FakeEngine]]:
    snapshot_id = think_ahead(artifacts, redis_url, answer_items, c_tails)
    catalog_dir, model_dir, _ = artifacts
    engine = FakeEngine()
    async with open_runtime(make_settings(catalog_dir, model_dir, redis_url), engine) as rt:
        await rt.watcher.refresh()
        assert rt.watcher.active is not None and rt.watcher.active.snapshot_id == snapshot_id
        engine.calls = 0  # the start-up warm-up's rounds are not the requests'
        yield rt, engine


def ranking(rec: Recommendation) -> list[tuple[str, float]]:
    return [(i.item_id, i.score) for i in rec.items]


def recorded(engine: FakeEngine) -> list[ScoreRequest]:
    """Every request the engine is sent from now on."""
    sent: list[ScoreRequest] = []
    real = engine.score

    async def spy(requests: Sequence[ScoreRequest]) -> list[dict[int, float]]:
        sent.extend(requests)
        return await real(requests)

    engine.score = spy  # type: ignore[method-assign]
    return sent


def stored_value(rt: Runtime, redis_url: str, user: str) -> UserPrefixes:
    sid = rt.watcher.active.snapshot_id  # type: ignore[union-attr]
    return UserPrefixes.decode(redis.Redis.from_url(redis_url).get(Keyspace().user(sid, user)))  # type: ignore[arg-type]


def c_steps_of(
    sent: list[ScoreRequest], rt: Runtime, prefixes: Iterable[tuple[int, int]]
) -> set[tuple[int, int]]:
    """Which of ``prefixes`` had their c step sent (its prompt ends with their a, b tokens)."""
    ids = rt.model.token_ids
    tokens = {(int(ids.a[a]), int(ids.b[b])): (a, b) for a, b in prefixes}
    return {tokens[key] for r in sent if (key := tuple(r.prompt[-2:])) in tokens}


async def test_unchanged_users_are_answered_from_redis_exactly_as_the_engine_would(
    artifacts: tuple[Path, Path, Path], redis_url: str
) -> None:
    stored: dict[str, Recommendation] = {}
    async with serving(artifacts, redis_url, STORED) as (rt, engine):
        manifest = rt.watcher.active.manifest  # type: ignore[union-attr]
        assert manifest is not None and manifest.answer_items == STORED
        assert manifest.answers_key == rt.core.answer_scoring(manifest).key()
        for user in HISTORIES:
            stored[user] = await rt.core.recommend(RecommendQuery(user, k=STORED))
        assert engine.calls == 0  # not one engine round
        served = rt.metrics.precomputed_answers._value.get()  # type: ignore[attr-defined]
        assert served == len(HISTORIES)
    # without stored answers: from the stored heads and c's (still no engine round), then
    # with no c's stored (the engine's c steps)
    for c_tails in (True, False):
        async with serving(artifacts, redis_url, 0, c_tails) as (rt, engine):
            for user, answer in stored.items():
                computed = await rt.core.recommend(RecommendQuery(user, k=STORED))
                assert answer.source is computed.source is Source.THINK_AHEAD
                assert answer.degraded_reason is None
                assert answer.backfilled == computed.backfilled
                assert [i for i, _ in ranking(answer)] == [i for i, _ in ranking(computed)]
                assert [s for _, s in ranking(answer)] == pytest.approx(
                    [s for _, s in ranking(computed)],
                    abs=1e-5,  # stored as float32
                )
                assert not {i.item_id for i in answer.items} & set(HISTORIES[user])
            if c_tails:
                assert engine.calls == 0  # every head and c of an unchanged user is stored
            else:
                assert engine.calls > 0  # the c steps ask the engine


async def test_anything_that_changes_the_scoring_goes_to_the_engine(
    artifacts: tuple[Path, Path, Path], redis_url: str
) -> None:
    """Without stored c's (with them, an unchanged history needs no engine at all)."""
    async with serving(artifacts, redis_url, STORED, c_tails=False) as (rt, engine):
        queries = [
            RecommendQuery("u3", k=3, recent_item_ids=("7",)),  # a fresh event
            RecommendQuery("u3", k=3, exclude_item_ids=("2",)),  # renormalises the steps
            RecommendQuery("u3", k=STORED + 1),  # beyond the stored ranking
        ]
        for n, query in enumerate(queries, start=1):
            rec = await rt.core.recommend(query)
            assert rec.source is Source.THINK_AHEAD
            assert engine.calls == n, query
        # served with other weights than the worker scored with: the stored key no longer fits
        rt.core.use_scoring(rt.core.scorer.settings.model_copy(update={"weights": FusionWeights()}))
        await rt.core.recommend(RecommendQuery("u3", k=3))
        assert engine.calls == len(queries) + 1


async def test_a_damaged_answer_is_ignored_and_counted(
    artifacts: tuple[Path, Path, Path], redis_url: str
) -> None:
    async with serving(artifacts, redis_url, STORED, c_tails=False) as (rt, engine):
        sid = rt.watcher.active.snapshot_id  # type: ignore[union-attr]
        client = redis.Redis.from_url(redis_url)
        key = Keyspace().user(sid, "u2")
        value = UserPrefixes.decode(client.get(key))  # type: ignore[arg-type]
        good = await rt.core.recommend(RecommendQuery("u2", k=3))
        damaged = value.__class__(**{**value.__dict__, "answer": value.answer[:-3]})
        client.set(key, damaged.encode(), keepttl=True)
        rec = await rt.core.recommend(RecommendQuery("u2", k=3))
        assert engine.calls == 1 and rec.source is Source.THINK_AHEAD
        assert [i.item_id for i in rec.items] == [i.item_id for i in good.items]
        assert rt.metrics.corrupt_values.labels("snapshot_answer")._value.get() == 1  # type: ignore[attr-defined]


def test_answers_round_trip_and_scoring_keys_tell_configurations_apart() -> None:
    ranked = [((1, 2, 3), -0.5), ((0, 65535, 7), -12.25)]
    assert unpack_answer(pack_answer(ranked)) == ranked
    assert len(pack_answer(ranked)) == 1 + 2 * 10  # a tag; uint16 codes (65535), float32
    with pytest.raises(ValueError, match="whole"):
        unpack_answer(pack_answer(ranked)[:-1])
    base = scoring(FusionWeights(offline=2.0), 10, 32, True)
    assert base.serves(base.key(), stored_items=50, k=50)
    assert not base.serves(base.key(), stored_items=50, k=51)
    assert not base.serves(None, stored_items=50, k=1)
    for other in (
        scoring(FusionWeights(offline=2.5), 10, 32, True),
        scoring(FusionWeights(offline=2.0), 11, 32, True),
        scoring(FusionWeights(offline=2.0), 10, 16, True),
        scoring(FusionWeights(offline=2.0), 10, 32, False),
        scoring(FusionWeights(offline=2.0, affinity=1.0), 10, 32, True),
        scoring(FusionWeights(offline=2.0), 10, 32, True, affinity_candidates=5),
    ):
        assert other.key() != base.key()
    # the fresh-event path's approximations never change an unchanged user's answer
    fresh_path = base.model_copy(update={"reuse_snapshot_b": False, "reuse_snapshot_c": False})
    assert fresh_path.key() == base.key()


def test_scoring_keys_of_published_snapshots_still_match() -> None:
    """Snapshots published before ScoringSettings (by AnswerScoring) keep serving their stored
    answers: the key of their settings is unchanged (values computed by the old class)."""
    served = FusionWeights(offline=0.25, covisit=4.0, affinity=0.5)
    assert scoring(served, 10, 32, True).key() == "6d0ca79f419c0e03"
    assert scoring(FusionWeights(offline=2.0), 10, 32, True).key() == "f17ba2389d30c9ea"
    with_items = FusionWeights(offline=0.25, covisit=4.0, popularity=0.1, affinity=2.0)
    assert scoring(with_items, 10, 32, True, affinity_candidates=10).key() == "27b6a891742bfa0e"


def scoring(
    weights: FusionWeights,
    covisit_candidates: int,
    prefixes: int,
    exclude_history: bool,
    affinity_candidates: int = 0,
) -> ScoringSettings:
    return ScoringSettings(
        weights=weights,
        covisit_candidates=covisit_candidates,
        prefixes=prefixes,
        exclude_history=exclude_history,
        affinity_candidates=affinity_candidates,
    )


async def test_a_fresh_event_costs_one_a_step_instead_of_a_b_step_per_first_token(
    artifacts: tuple[Path, Path, Path], redis_url: str
) -> None:
    """The fake engine's log P(b | a) does not depend on the history, so reusing the
    snapshot's is exact here: same ranking, fewer requests."""
    answers = {}
    async with serving(artifacts, redis_url, STORED) as (rt, engine):
        sent = recorded(engine)
        ids = rt.model.token_ids
        a_tokens = {int(t) for t in ids.a}
        value = stored_value(rt, redis_url, "u3")
        extra_a = {h.a for h in value.covisit_heads}  # the extras the worker scored
        assert extra_a - {p.a for p in value.prefixes}  # (the test needs one)
        assert {a for a, _ in value.first_tokens} == {p.a for p in value.prefixes} | extra_a
        for reuse in (True, False):
            rt.core.use_scoring(
                rt.core.scorer.settings.model_copy(update={"reuse_snapshot_b": reuse})
            )
            sent.clear()
            rec = await rt.core.recommend(RecommendQuery("u3", k=5, recent_item_ids=("9",)))
            assert rec.source is Source.THINK_AHEAD
            b_steps = [r for r in sent if r.prompt[-1] in a_tokens]
            answers[reuse] = (ranking(rec), b_steps, len(sent))
    ranked, b_steps, requests = answers[True]
    # b steps only for prefixes the worker did not score (neighbours of the fresh event)
    a_of = {int(t): a for a, t in enumerate(ids.a)}
    b_of = {int(t): b for b, t in enumerate(ids.b)}

    def asked(steps: list[ScoreRequest]) -> set[tuple[int, int]]:
        return {(a_of[r.prompt[-1]], b_of[w]) for r in steps for w in r.want}

    stored = {(p.a, p.b) for p in value.prefixes} | {(h.a, h.b) for h in value.covisit_heads}
    assert not asked(b_steps) & stored, asked(b_steps) & stored
    assert asked(answers[False][1]) & stored  # without reuse they are asked again
    assert requests < answers[False][2]
    assert [i for i, _ in ranked] == [i for i, _ in answers[False][0]]
    # the stored prefix scores and log P(a) are float32: log P(b | a) is exact to ~1e-7
    assert [s for _, s in ranked] == pytest.approx([s for _, s in answers[False][0]], abs=1e-6)


@pytest.mark.parametrize(
    "query",
    [
        RecommendQuery("u3", k=5, recent_item_ids=("9",)),  # an event outside the prefixes
        RecommendQuery("u3", k=5, recent_item_ids=("19",)),  # an event under a stored prefix
        RecommendQuery("u3", k=5, exclude_item_ids=("40",)),  # an exclusion under one
    ],
)
async def test_a_fresh_event_reuses_the_snapshots_c_steps(
    artifacts: tuple[Path, Path, Path], redis_url: str, query: RecommendQuery
) -> None:
    """The fake engine's log P(c | a, b) depends only on the allowed c's, so the stored ones,
    renormalised over the c's still allowed, are exact here: same ranking, no c step for a
    snapshot prefix."""
    answers = {}
    async with serving(artifacts, redis_url, STORED) as (rt, engine):
        sent = recorded(engine)
        value = stored_value(rt, redis_url, "u3")
        snapshot_ab = {(p.a, p.b) for p in value.prefixes}
        extras_ab = {(h.a, h.b) for h in value.covisit_heads}
        stored_ab = {code[:2] for code, _ in unpack_scored(value.c_tails)}
        assert snapshot_ab <= stored_ab <= snapshot_ab | extras_ab
        for reuse in (True, False):
            rt.core.use_scoring(
                rt.core.scorer.settings.model_copy(update={"reuse_snapshot_c": reuse})
            )
            sent.clear()
            rec = await rt.core.recommend(query)
            assert rec.source is Source.THINK_AHEAD and rec.degraded_reason is None
            answers[reuse] = (ranking(rec), c_steps_of(sent, rt, snapshot_ab | extras_ab))
    (ranked, c_steps), (fresh, fresh_c_steps) = answers[True], answers[False]
    assert not c_steps and snapshot_ab <= fresh_c_steps
    assert [i for i, _ in ranked] == [i for i, _ in fresh]
    assert [s for _, s in ranked] == pytest.approx([s for _, s in fresh], abs=1e-5)  # float32
    assert not {i for i, _ in ranked} & {*query.recent_item_ids, *query.exclude_item_ids}


async def test_a_c_the_snapshot_did_not_store_sends_that_prefixs_c_step(
    artifacts: tuple[Path, Path, Path], redis_url: str
) -> None:
    """Served without history exclusion, u3's own items are allowed again: the stored c's of
    a prefix holding one no longer cover its allowed c's, so that prefix (only) asks the
    engine."""
    query = RecommendQuery("u3", k=5, recent_item_ids=("9",))
    answers = {}
    async with serving(artifacts, redis_url, STORED) as (rt, engine):
        sent = recorded(engine)
        catalog = rt.catalog
        value = stored_value(rt, redis_url, "u3")
        snapshot_ab = {(p.a, p.b) for p in value.prefixes}
        history_ab = {code[:2] for code in catalog.codes_of(HISTORIES["u3"])[0]}
        assert history_ab & snapshot_ab
        for reuse in (True, False):
            rt.core.use_scoring(
                rt.core.scorer.settings.model_copy(
                    update={"reuse_snapshot_c": reuse, "exclude_history": False}
                )
            )
            sent.clear()
            rec = await rt.core.recommend(query)
            answers[reuse] = (ranking(rec), c_steps_of(sent, rt, snapshot_ab))
    assert answers[True][1] == history_ab & snapshot_ab
    assert [i for i, _ in answers[True][0]] == [i for i, _ in answers[False][0]]
    assert [s for _, s in answers[True][0]] == pytest.approx(
        [s for _, s in answers[False][0]], abs=1e-5
    )


async def test_a_damaged_c_blob_is_ignored_and_counted(
    artifacts: tuple[Path, Path, Path], redis_url: str
) -> None:
    query = RecommendQuery("u3", k=5, recent_item_ids=("9",))
    async with serving(artifacts, redis_url, STORED) as (rt, engine):
        sent = recorded(engine)
        value = stored_value(rt, redis_url, "u3")
        good = await rt.core.recommend(query)
        damaged = UserPrefixes(**{**value.__dict__, "c_tails": value.c_tails[:-3]})
        sid = rt.watcher.active.snapshot_id  # type: ignore[union-attr]
        redis.Redis.from_url(redis_url).set(
            Keyspace().user(sid, "u3"), damaged.encode(), keepttl=True
        )
        sent.clear()
        rec = await rt.core.recommend(query)
        assert rec.source is Source.THINK_AHEAD and rec.degraded_reason is None
        assert c_steps_of(sent, rt, [(p.a, p.b) for p in value.prefixes])  # asked again
        assert [i.item_id for i in rec.items] == [i.item_id for i in good.items]
        assert rt.metrics.corrupt_values.labels("snapshot_c")._value.get() == 1  # type: ignore[attr-defined]


def test_the_worker_stores_normalised_c_log_probs_of_multi_item_prefixes_only(
    artifacts: tuple[Path, Path, Path], redis_url: str
) -> None:
    catalog = Catalog.load(artifacts[0])
    client = redis.Redis.from_url(redis_url)
    for c_tails in (True, False):
        sid = think_ahead(artifacts, redis_url, 0, c_tails=c_tails)
        for user, history in HISTORIES.items():
            value = UserPrefixes.decode(client.get(Keyspace().user(sid, user)))  # type: ignore[arg-type]
            if not c_tails:
                assert value.c_tails == b""
                continue
            constraint = Constraint(catalog, catalog.codes_of(history)[0])
            scored = [*value.prefixes, *value.covisit_heads]  # the user's and the extras
            multi = {(p.a, p.b) for p in scored if len(constraint.c_values(p.a, p.b)) > 1}
            assert multi - {(p.a, p.b) for p in value.prefixes}  # (the test needs an extra)
            mass: dict[tuple[int, int], float] = {}
            for code, lp in unpack_scored(value.c_tails):
                assert constraint.allows(code)
                mass[code[:2]] = mass.get(code[:2], 0.0) + math.exp(lp)
            assert set(mass) == multi
            assert list(mass.values()) == pytest.approx([1.0] * len(mass), abs=1e-5)


async def test_a_stored_answer_reads_no_co_visitation(
    artifacts: tuple[Path, Path, Path], redis_url: str
) -> None:
    """One Redis round trip for an unchanged user: the neighbours are read only by the steps
    that use them (the engine path and the fallbacks)."""
    async with serving(artifacts, redis_url, STORED) as (rt, _engine):
        reads: list[list[str]] = []
        real = rt.store.read_covisit

        async def spy(snapshot_id: str, items: list[str]) -> list[bytes | None]:
            reads.append(list(items))
            return await real(snapshot_id, items)

        rt.store.read_covisit = spy  # type: ignore[method-assign]
        rec = await rt.core.recommend(RecommendQuery("u3", k=3))
        assert rec.source is Source.THINK_AHEAD and not reads
        await rt.core.recommend(RecommendQuery("u3", k=3, recent_item_ids=("7",)))
        assert reads  # the engine path scores co-visitation candidates
