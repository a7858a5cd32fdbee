"""The Redis keyspace and the compact binary values of a think-ahead snapshot.

Keys (prefix configurable, default ``ta``)::

    ta:snap:current                 -> active snapshot id
    ta:snap:{sid}:manifest          -> SnapshotManifest (JSON)
    ta:snap:{sid}:u:{<user_id>}     -> UserPrefixes (msgpack), with a TTL
    ta:snap:{sid}:cv:{<item_id>}    -> the item's co-visitation neighbours (msgpack), with a TTL
    ta:hist:{<user_id>}             -> list of recent item ids, newest first, capped
    ta:events                       -> stream of users who acted (field u), bounded; consumer
                                       group "rethink" (the near-line re-think worker)
    ta:snap:pending                 -> id of the snapshot a worker is still writing
    ta:snap:{sid}:done              -> set of finished shard numbers (resume)
    ta:snap:retired                 -> zset of replaced snapshot ids by retire time

The user id sits in a Redis Cluster hash tag (``{...}``) in both per-user keys, so a user's
prefixes and history live in one slot and one pipeline reads both in one round trip, on a single
node or a cluster. Snapshot ids never contain braces: :class:`Keyspace` builds no key from an id
that fails :func:`validate_snapshot_id`.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack

from service.contracts.packed import (
    pack_first_tokens,
    pack_prefixes,
    pack_scored,
    unpack_first_tokens,
    unpack_prefixes,
    unpack_scored_v1,
)

VALUE_SCHEMA = 2  # written; 1 is still read (values published before it)
_SNAPSHOT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def history_digest(codes: Sequence[tuple[int, int, int]]) -> str:
    """Identifies the exact history a snapshot value was computed from: when the online prompt
    has the same digest, the offline prefix scores are the fresh ones."""
    flat = ",".join(f"{a}.{b}.{c}" for a, b, c in codes)
    return hashlib.blake2b(flat.encode(), digest_size=8).hexdigest()


class CorruptValue(ValueError):
    """A Redis value that is not a snapshot value of ours (foreign, truncated or another schema)."""


@dataclass(frozen=True)
class Keyspace:
    prefix: str = "ta"
    # Histories belong to users, not to a model: a rollout under a new snapshot prefix can
    # keep reading (and appending to) the same histories.
    history_prefix: str | None = None

    @property
    def current(self) -> str:
        return f"{self.prefix}:snap:current"

    @property
    def pending(self) -> str:
        return f"{self.prefix}:snap:pending"

    @property
    def retired(self) -> str:
        return f"{self.prefix}:snap:retired"

    # Every snapshot-scoped key is built here, from a checked id: a brace would move the key's
    # hash tag (another cluster slot), a glob character would widen cleanup's SCAN pattern.
    def manifest(self, snapshot_id: str) -> str:
        return f"{self.prefix}:snap:{validate_snapshot_id(snapshot_id)}:manifest"

    def done_shards(self, snapshot_id: str) -> str:
        return f"{self.prefix}:snap:{validate_snapshot_id(snapshot_id)}:done"

    def user(self, snapshot_id: str, user_id: str) -> str:
        return f"{self.prefix}:snap:{validate_snapshot_id(snapshot_id)}:u:{{{user_id}}}"

    def covisit(self, snapshot_id: str, item_id: str) -> str:
        return f"{self.prefix}:snap:{validate_snapshot_id(snapshot_id)}:cv:{{{item_id}}}"

    def user_pattern(self, snapshot_id: str) -> str:
        return f"{self.prefix}:snap:{validate_snapshot_id(snapshot_id)}:*"

    def history(self, user_id: str) -> str:
        return f"{self.history_prefix or self.prefix}:hist:{{{user_id}}}"

    @property
    def events(self) -> str:
        """The stream of users who acted: events belong to users, like their histories."""
        return f"{self.history_prefix or self.prefix}:events"


@functools.lru_cache(maxsize=64)  # a handful of ids, checked on every key of every request
def validate_snapshot_id(snapshot_id: str) -> str:
    """The id itself; ValueError unless it is 1-64 of ``[A-Za-z0-9_.-]``."""
    if not _SNAPSHOT_ID.fullmatch(snapshot_id):
        raise ValueError(f"snapshot id {snapshot_id!r} must match {_SNAPSHOT_ID.pattern}")
    return snapshot_id


@dataclass(frozen=True)
class Prefix:
    a: int
    b: int
    score: float


@dataclass(frozen=True)
class UserPrefixes:
    """One user's candidate space C_u as computed offline."""

    model_version: str
    catalog_version: str
    computed_at: float  # unix seconds
    prefixes: tuple[Prefix, ...]
    history_digest: str = ""  # of the history the prefixes were computed from
    reasoning: str | None = None  # free text (a chat model's reasoning)
    # the best category rationales, packed (``service.contracts.rationale``)
    rationales: bytes = b""
    # log P(a, b | that history) of the co-visitation candidates' prefixes that are not among
    # ``prefixes``: an unchanged user's whole candidate set is then scored without a/b steps
    covisit_heads: tuple[Prefix, ...] = ()
    # the whole ranked answer for that history (``service.contracts.answers``), packed
    answer: bytes = b""
    # log P(a | that history) of the prefixes' first tokens: after a fresh event the service
    # reuses log P(b | a) = prefix score - log P(a) instead of asking the engine for b steps
    first_tokens: tuple[tuple[int, float], ...] = ()
    # the user's best items under the item-level model, packed (``service.contracts.affinity``)
    affinity: bytes = b""
    # log P(c | a, b, that history) of every item under the multi-item prefixes, packed like
    # answers (``service.contracts.packed``): after a fresh event the service reuses them
    # instead of a c step per prefix (msgpack key "l": "c" is the catalog version)
    c_tails: bytes = b""

    def encode(self) -> bytes:
        """Schema 2: the prefix, first-token and scored-code lists as packed binary
        (``service.contracts.packed``): about half of schema 1's msgpack floats."""
        body: dict[str, object] = {
            "v": VALUE_SCHEMA,
            "m": self.model_version,
            "c": self.catalog_version,
            "t": float(self.computed_at),
            "p": pack_prefixes([(p.a, p.b, p.score) for p in self.prefixes]),
            "h": self.history_digest,
        }
        optional: dict[str, object] = {
            "r": self.reasoning,
            "k": self.rationales,
            "x": pack_prefixes([(p.a, p.b, p.score) for p in self.covisit_heads]),
            "a": self.answer,
            "i": self.affinity,
            "l": self.c_tails,
            "f": pack_first_tokens(self.first_tokens),
        }
        body |= {key: v for key, v in optional.items() if v}
        return msgpack.packb(body, use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes) -> UserPrefixes:
        try:
            body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except (msgpack.UnpackException, ValueError, TypeError) as exc:
            raise CorruptValue(f"not msgpack: {exc}") from exc
        if not isinstance(body, dict) or body.get("v") not in (1, VALUE_SCHEMA):
            raise CorruptValue("not a snapshot value of schema version 1 or 2")
        try:
            blobs = {key: body.get(key, b"") for key in ("a", "i", "l", "k")}
            for key, blob in blobs.items():
                if not isinstance(blob, bytes):
                    raise CorruptValue(f"field {key} is not bytes")
            reasoning = body.get("r")
            if body["v"] == 1:
                prefixes, heads, first = (
                    _unflat(body["p"]),
                    _unflat(body.get("x", [])),
                    _pairs(body.get("f", [])),
                )
                blobs |= {
                    key: pack_scored(unpack_scored_v1(blobs[key]), precise=key == "a")
                    for key in ("a", "i", "l")
                    if blobs[key]
                }
            else:
                prefixes = _prefixes(body["p"])
                heads = _prefixes(body.get("x", b""))
                first = tuple(unpack_first_tokens(_bytes(body.get("f", b""))))
            return cls(
                model_version=str(body["m"]),
                catalog_version=str(body["c"]),
                computed_at=float(body["t"]),
                prefixes=prefixes,
                history_digest=str(body.get("h", "")),
                reasoning=None if reasoning is None else str(reasoning),
                rationales=blobs["k"],
                covisit_heads=heads,
                answer=blobs["a"],
                affinity=blobs["i"],
                c_tails=blobs["l"],
                first_tokens=first,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CorruptValue):
                raise
            raise CorruptValue(f"malformed snapshot value: {exc!r}") from exc


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise CorruptValue("a packed field is not bytes")
    return value


def _prefixes(raw: object) -> tuple[Prefix, ...]:
    return tuple(Prefix(a, b, s) for a, b, s in unpack_prefixes(_bytes(raw)))


def _pairs(flat: object) -> tuple[tuple[int, float], ...]:
    if not isinstance(flat, list) or len(flat) % 2:
        raise CorruptValue("first-token list length is not a multiple of 2")
    return tuple((int(flat[i]), float(flat[i + 1])) for i in range(0, len(flat), 2))


def _unflat(flat: object) -> tuple[Prefix, ...]:
    if not isinstance(flat, list) or len(flat) % 3:
        raise CorruptValue("prefix list length is not a multiple of 3")
    return tuple(
        Prefix(int(flat[i]), int(flat[i + 1]), float(flat[i + 2])) for i in range(0, len(flat), 3)
    )
