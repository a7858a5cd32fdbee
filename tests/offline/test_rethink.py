"""The near-line re-think worker over a real redis-server, with the fake engine: a user who acted
gets an entry for their fresh history, computed by the nightly worker's code; an entry computed
for a history that moved on meanwhile is never written; entries a dead consumer left pending are
claimed and done."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import redis

from offline.thinkahead.rethink import GROUP, Rethinker
from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
from service.contracts.catalog import Catalog
from service.contracts.snapshot import Keyspace, UserPrefixes, history_digest
from tests.fake_engine import FakeEngine, write_tiny_artifacts

HISTORIES = {"u1": ["3", "4", "5"], "u2": ["1", "2"], "u3": ["10", "11", "12", "13"]}
KEYS = Keyspace()


@pytest.fixture
def world(tmp_path: Path, redis_url: str) -> tuple[Path, Path, str]:
    catalog_dir, model_dir = write_tiny_artifacts(tmp_path)
    inter = tmp_path / "interactions.csv"
    rows = [f"{u},{i},{t}" for u, items in HISTORIES.items() for t, i in enumerate(items)]
    inter.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    job = ThinkAheadJob(prefixes=4, beam=4, answer_items=6, grace_s=0)
    run = ThinkAheadRun(model_dir, catalog_dir, inter, redis_url, job)
    run.seed_histories(inter)
    run.run(FakeEngine, progress=False)
    return catalog_dir, model_dir, redis_url


def act(client: redis.Redis, user: str, *items: str) -> None:
    """What the events API does: append (newest first), then tell the stream."""
    client.lpush(KEYS.history(user), *items)
    client.xadd(KEYS.events, {"u": user})


def value_of(client: redis.Redis, user: str) -> UserPrefixes:
    sid = client.get(KEYS.current).decode()
    return UserPrefixes.decode(client.get(KEYS.user(sid, user)))


def fresh_digest(catalog: Catalog, client: redis.Redis, user: str) -> str:
    items = [i.decode() for i in reversed(client.lrange(KEYS.history(user), 0, -1))]
    return history_digest(catalog.codes_of(items)[0])


def rethinker(world: tuple[Path, Path, str], name: str = "c1", **kw: object) -> Rethinker:
    catalog_dir, model_dir, url = world
    return Rethinker(model_dir, catalog_dir, url, FakeEngine, name, block_ms=10, **kw)  # type: ignore[arg-type]


def test_a_user_who_acted_gets_an_entry_for_the_fresh_history(world) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(world[2])
    worker = rethinker(world)
    before, untouched = value_of(client, "u1"), value_of(client, "u2")
    act(client, "u1", "7")
    act(client, "u1", "8")  # two events, one user: one entry
    assert worker.step() == 1
    after = value_of(client, "u1")
    assert after.history_digest == fresh_digest(worker.catalog, client, "u1")
    assert after.history_digest != before.history_digest
    assert after.answer and after.computed_at > before.computed_at
    assert value_of(client, "u2").computed_at == untouched.computed_at  # others stay
    assert worker.metrics.users.labels("written")._value.get() == 1  # type: ignore[attr-defined]
    assert client.xpending(KEYS.events, GROUP)["pending"] == 0  # acknowledged
    assert worker.step() == 0  # nothing new


def test_an_entry_for_a_history_that_moved_on_is_never_written(world) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(world[2])
    worker = rethinker(world)
    before = value_of(client, "u2")
    act(client, "u2", "9")
    worker.step()  # builds the thinker for the snapshot
    act(client, "u2", "20")
    thinker, _ = next(iter(worker._thinkers.values()))
    real = thinker.entries

    def racing(histories, seed=0):  # type: ignore[no-untyped-def]
        client.lpush(KEYS.history("u2"), "21")  # an event lands while the worker thinks
        return real(histories, seed)

    object.__setattr__(thinker, "entries", racing)
    worker.step()
    assert worker.metrics.users.labels("stale")._value.get() == 1  # type: ignore[attr-defined]
    now = value_of(client, "u2")
    assert now.history_digest != fresh_digest(worker.catalog, client, "u2")  # not the stale one
    assert now.history_digest != before.history_digest  # the first re-think's entry stays


def test_entries_a_dead_consumer_left_pending_are_claimed(world) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(world[2])
    rethinker(world, "dead")  # creates the group
    act(client, "u3", "30")
    # the dead consumer read the entry and never acknowledged it
    client.xreadgroup(GROUP, "dead", {KEYS.events: ">"}, count=10)
    assert client.xpending(KEYS.events, GROUP)["pending"] == 1
    alive = rethinker(world, "alive", claim_idle_s=0.05)
    time.sleep(0.1)
    assert alive.step() == 1
    assert value_of(client, "u3").history_digest == fresh_digest(alive.catalog, client, "u3")
    assert client.xpending(KEYS.events, GROUP)["pending"] == 0


def test_the_worker_refuses_a_snapshot_of_another_model(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from offline.errors import InputError
    from offline.thinkahead.rethink import _batch

    client = redis.Redis.from_url(world[2])
    worker = rethinker(world)
    worker.model = worker.model.__class__(
        worker.model.path, worker.model.manifest.model_copy(update={"model_version": "other"}),
        worker.model.token_ids,
    )  # fmt: skip
    act(client, "u1", "7")
    entries = client.xrange(KEYS.events)
    with pytest.raises(InputError, match="built with model"):
        worker.process(_batch(entries))
    assert not worker._thinkers  # nothing built for a snapshot it must not write into


def test_the_cli_worker_lowers_its_own_cpu_priority_when_told(world) -> None:  # type: ignore[no-untyped-def]
    """``thinkahead rethink --nice 10``: the process runs at nice 10 (requests on shared cores
    go first) and still stops cleanly on SIGTERM."""
    import signal
    import subprocess

    from offline.localproc import cli_command, launch_env

    catalog_dir, model_dir, url = world
    before = os.nice(0)
    proc = subprocess.Popen(
        [*cli_command("rethink", model_dir, catalog_dir, url), "--nice", "10"],
        env=launch_env(None),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # as the bench starts it: its own autogroup, lowered too
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # printed once the worker is set up
        assert line.startswith("re-thinking users from"), line
        # /proc/<pid>/stat field 19 is the nice value (after the command name's parentheses)
        nice = int(Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
        assert nice == before + 10
        autogroup = Path(f"/proc/{proc.pid}/autogroup")
        if autogroup.exists():  # Linux with autogroup scheduling
            assert autogroup.read_text().split()[-1] == "10"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
