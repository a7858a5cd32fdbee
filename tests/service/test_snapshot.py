from __future__ import annotations

import msgpack
import pytest
import redis

from offline.thinkahead.publish import SnapshotWriter
from service.config import RedisSettings
from service.contracts.packed import SCORED_DTYPE_V1, pack_scored, unpack_scored
from service.contracts.snapshot import (
    CorruptValue,
    Keyspace,
    Prefix,
    UserPrefixes,
    validate_snapshot_id,
)
from service.errors import RedisUnavailable
from service.storage.redis import connect
from service.storage.store import SnapshotStore


def value(**kw) -> UserPrefixes:  # type: ignore[no-untyped-def]
    base = dict(
        model_version="m1",
        catalog_version="c1",
        computed_at=1700000000.5,
        prefixes=(Prefix(1, 2, -0.5), Prefix(3, 4, -1.25)),
        history_digest="abc123",
    )
    base.update(kw)
    return UserPrefixes(**base)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field() -> None:
    v = value(
        reasoning="likes matte lipsticks",
        covisit_heads=(Prefix(5, 6, -2.5),),
        affinity=b"\x01" * 20,
        first_tokens=((1, -0.25),),
        c_tails=pack_scored([((1, 2, 0), -0.25), ((1, 2, 3), -1.5)]),
    )
    assert UserPrefixes.decode(v.encode()) == v
    assert unpack_scored(UserPrefixes.decode(v.encode()).c_tails) == [
        ((1, 2, 0), -0.25),
        ((1, 2, 3), -1.5),
    ]
    plain = UserPrefixes.decode(value().encode())
    assert plain.covisit_heads == () and plain.affinity == b"" and plain.c_tails == b""
    assert "l" not in msgpack.unpackb(value().encode())  # optional fields cost nothing
    body = msgpack.unpackb(v.encode())
    body["x"] = [1, 2]  # schema 1's spelling in a schema 2 value
    with pytest.raises(CorruptValue, match="not bytes"):
        UserPrefixes.decode(msgpack.packb(body))
    body = msgpack.unpackb(v.encode())
    body["x"] = body["x"][:-1]  # a row cut short
    with pytest.raises(CorruptValue, match="not whole rows"):
        UserPrefixes.decode(msgpack.packb(body))
    body = msgpack.unpackb(v.encode())
    body["i"] = "not bytes"
    with pytest.raises(CorruptValue, match="field i is not bytes"):
        UserPrefixes.decode(msgpack.packb(body))
    body = msgpack.unpackb(v.encode())
    body["l"] = [1.0, 2.0]
    with pytest.raises(CorruptValue, match="field l is not bytes"):
        UserPrefixes.decode(msgpack.packb(body))


def test_values_of_schema_1_are_still_read() -> None:
    """What the worker published before schema 2 (msgpack float lists, tagless 10-byte rows)
    reads as the same value, its lists repacked as schema 2 spells them."""
    import numpy as np

    rows = np.array([(1, 2, 3, -0.5), (300, 2, 1, -1.25)], dtype=SCORED_DTYPE_V1).tobytes()
    old = msgpack.packb(
        {
            "v": 1, "m": "m1", "c": "c1", "t": 1.5, "h": "abc",
            "p": [1, 2, -0.5, 3, 4, -1.25], "x": [5, 6, -2.5], "f": [1, -0.25],
            "a": rows, "i": rows, "l": rows, "r": "text",
        },
        use_bin_type=True,
    )  # fmt: skip
    v = UserPrefixes.decode(old)
    assert v.prefixes == (Prefix(1, 2, -0.5), Prefix(3, 4, -1.25))
    assert v.covisit_heads == (Prefix(5, 6, -2.5),) and v.first_tokens == ((1, -0.25),)
    assert v.reasoning == "text" and v.rationales == b""
    expected = [((1, 2, 3), -0.5), ((300, 2, 1), -1.25)]
    for blob in (v.answer, v.affinity, v.c_tails):
        assert unpack_scored(blob) == expected  # exact in float16 too: these are dyadic
    assert UserPrefixes.decode(v.encode()) == v


def test_scored_lists_are_narrow_where_the_codes_fit() -> None:
    small = [((1, 2, 3), -0.5)] * 10
    assert len(pack_scored(small)) == 1 + 10 * 5  # uint8 codes, float16 scores
    assert len(pack_scored(small, precise=True)) == 1 + 10 * 7
    assert len(pack_scored([((256, 2, 3), -0.5)] * 10)) == 1 + 10 * 8  # uint16 codes
    assert unpack_scored(pack_scored([((256, 2, 3), -0.123456)], precise=True)) == [
        ((256, 2, 3), pytest.approx(-0.123456, abs=1e-7))
    ]
    with pytest.raises(ValueError, match="not a packed list"):
        unpack_scored(b"\x01\x02\x03")


def test_value_is_compact() -> None:
    many = value(prefixes=tuple(Prefix(i, i, -float(i)) for i in range(32)))
    assert len(many.encode()) < 32 * 6 + 64  # 6 bytes a prefix


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1\xff garbage",
        b"hello world",
        msgpack.packb({"v": 3, "m": "m", "c": "c", "t": 1.0, "p": b""}),
        msgpack.packb({"v": 2, "m": "m", "c": "c", "t": 1.0, "p": []}),
        msgpack.packb({"v": 1, "m": "m", "c": "c", "t": 1.0, "p": [1, 2]}),
        msgpack.packb({"v": 1, "m": "m", "c": "c", "t": "x", "p": []}),
        msgpack.packb({"v": 1, "c": "c", "t": 1.0, "p": []}),
        msgpack.packb([1, 2, 3]),
    ],
)
def test_foreign_or_corrupt_values_raise_corrupt_value(raw: bytes) -> None:
    with pytest.raises(CorruptValue):
        UserPrefixes.decode(raw)


def test_user_keys_share_a_cluster_slot() -> None:
    keys = Keyspace("ta")
    assert keys.user("s1", "u42") == "ta:snap:s1:u:{u42}"
    assert keys.history("u42") == "ta:hist:{u42}"
    assert keys.current == "ta:snap:current"
    assert keys.manifest("s1") == "ta:snap:s1:manifest"


BAD_IDS = ["", "a{b}", "}", "x" * 65, "with space", "s1*", "s1\n", "s[12]"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_snapshot_ids_never_carry_hash_tags(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_snapshot_id(bad)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_no_snapshot_key_is_built_from_a_bad_id(bad: str) -> None:
    keys = Keyspace("ta")
    for build in (
        lambda: keys.manifest(bad),
        lambda: keys.done_shards(bad),
        lambda: keys.user(bad, "u1"),
        lambda: keys.covisit(bad, "i1"),
        lambda: keys.user_pattern(bad),
    ):
        with pytest.raises(ValueError, match="snapshot id"):
            build()
    assert keys.user("20250101T000000-ab12cd34", "u1") == "ta:snap:20250101T000000-ab12cd34:u:{u1}"


async def test_a_foreign_current_id_reads_as_no_snapshot(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    r.set(Keyspace().current, "evil{slot}")
    store = SnapshotStore(connect(RedisSettings(url=redis_url)), Keyspace(), 50)
    try:
        assert await store.current_snapshot() is None
        r.set(Keyspace().current, "s1")
        assert await store.current_snapshot() == ("s1", None)  # no manifest yet
    finally:
        await store.close()
        r.close()


def test_the_publisher_replaces_a_foreign_pending_id_and_sweeps_foreign_retired_ids(
    redis_url: str,
) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = Keyspace()
    writer = SnapshotWriter(r, keys, ttl_s=600)
    r.set(keys.pending, "x*")
    assert writer.pending() is None  # so the worker begins a snapshot of its own
    r.zadd(keys.retired, {"a{b}": 0, "*": 0})
    r.set("ta:snap:kept:u:{u1}", b"another snapshot's value")
    assert writer.cleanup(grace_s=0) == []
    assert r.zcard(keys.retired) == 0
    assert r.get("ta:snap:kept:u:{u1}") is not None  # "*" did not widen the sweep
    r.close()


def test_history_prefix_is_independent_of_the_snapshot_prefix() -> None:
    keys = Keyspace("ta-v2", history_prefix="ta")
    assert keys.history("u1") == "ta:hist:{u1}"
    assert keys.user("s", "u1") == "ta-v2:snap:s:u:{u1}"
    assert Keyspace("x").history("u1") == "x:hist:{u1}"


BUSY_MS = """
local start = redis.call('TIME')
local t0 = start[1] * 1000000 + start[2]
while true do
  local now = redis.call('TIME')
  if now[1] * 1000000 + now[2] - t0 > tonumber(ARGV[1]) * 1000 then return 1 end
end
"""


async def test_writes_outwait_a_stall_that_reads_fall_back_from(redis_url: str) -> None:
    """Redis stalls for 300 ms (a script holds it): a read gives up after its 100 ms and the
    request falls back; an append waits (1 s) and lands once, so no caller retries it twice."""
    import asyncio

    settings = RedisSettings(url=redis_url)
    store = SnapshotStore(
        connect(settings), Keyspace(), 50, writer=connect(settings, settings.write_timeout_ms)
    )
    blocker = redis.Redis.from_url(redis_url)
    try:
        await store.read_user(None, "u1")  # both clients connected before the stall
        await store.append_history("u1", ["warm"])
        stall = asyncio.create_task(asyncio.to_thread(blocker.eval, BUSY_MS, 0, 300))
        await asyncio.sleep(0.05)  # the script is running
        with pytest.raises(RedisUnavailable, match="read failed"):
            await store.read_user(None, "u1")
        assert await store.append_history("u1", ["i1"]) == 2
        await stall
    finally:
        await store.close()
        blocker.close()
    assert redis.Redis.from_url(redis_url).lrange(Keyspace().history("u1"), 0, -1) == [
        b"i1",
        b"warm",
    ]
