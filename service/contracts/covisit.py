"""Item-to-item co-visitation: the contract both sides share.

Offline, ``thinkahead catalog build`` (or ``thinkahead covisit build``) counts, over users'
sequences, how often item j follows item i within a few steps (nearer steps weigh more,
predecessors at a quarter weight; ``offline.catalog.covisit``) and keeps the top-N neighbours of
every item: ``covisit.npz`` beside the catalog, with its own version. The
think-ahead worker publishes the table with each snapshot, one Redis value per item
(``ta:snap:{sid}:cv:{<item_id>}``), so it shards with the keyspace and flips with the snapshot.

Online, the neighbours of the user's freshest items are (1) candidates, scored by the decoder
in the same engine round as the snapshot's prefixes, (2) a feature of the fused score, and
(3) the fallback for users whose recent items are known when the decoder cannot answer.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

COVISIT_FILE = "covisit.npz"
NEIGHBOURS_SCHEMA = 1
# Weight of the newest, second newest and third newest history item (the afternoon baseline of
# notes/quality-probe.md): older items say less about what comes next.
RECENCY_WEIGHTS = (1.0, 0.5, 0.25)


class CovisitError(ValueError):
    pass


@dataclass(frozen=True)
class Neighbours:
    """One item's top-N co-visited items, best first."""

    item_ids: tuple[str, ...]
    scores: tuple[float, ...]

    def encode(self) -> bytes:
        body = {"v": NEIGHBOURS_SCHEMA, "i": list(self.item_ids), "s": list(self.scores)}
        return msgpack.packb(body, use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes) -> Neighbours:
        try:
            body = msgpack.unpackb(raw, raw=False)
            if not isinstance(body, dict) or body.get("v") != NEIGHBOURS_SCHEMA:
                raise CovisitError("not a co-visitation value of schema version 1")
            ids, scores = body["i"], body["s"]
            if len(ids) != len(scores):
                raise CovisitError("ids and scores differ in length")
            return cls(tuple(str(i) for i in ids), tuple(float(s) for s in scores))
        except (msgpack.UnpackException, KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CovisitError):
                raise
            raise CovisitError(f"malformed co-visitation value: {exc!r}") from exc


EMPTY = Neighbours((), ())


class NeighbourCache:
    """Bounded LRU of neighbour lists read from Redis, keyed by snapshot (values under one
    snapshot never change): hot items skip the round trip, and users whose recent items are
    cached still get co-visitation while Redis is down."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._values: OrderedDict[tuple[str, str], Neighbours] = OrderedDict()

    def get(self, snapshot_id: str, item_id: str) -> Neighbours | None:
        key = (snapshot_id, item_id)
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def put(self, snapshot_id: str, item_id: str, value: Neighbours) -> None:
        if self.capacity <= 0:
            return
        self._values[(snapshot_id, item_id)] = value
        self._values.move_to_end((snapshot_id, item_id))
        while len(self._values) > self.capacity:
            self._values.popitem(last=False)

    def __len__(self) -> int:
        return len(self._values)


def recent_items(history: Sequence[str], n: int = len(RECENCY_WEIGHTS)) -> list[str]:
    """The distinct items whose neighbours feed the score, newest first."""
    out: list[str] = []
    for item in reversed(history):
        if item not in out:
            out.append(item)
        if len(out) == n:
            break
    return out


def covisit_scores(
    history: Sequence[str], neighbours: Mapping[str, Neighbours], exclude: set[str]
) -> dict[str, float]:
    """Recency-weighted co-visitation score of every neighbour of the user's last items."""
    scores: dict[str, float] = {}
    for weight, item in zip(RECENCY_WEIGHTS, recent_items(history), strict=False):
        found = neighbours.get(item, EMPTY)
        for other, s in zip(found.item_ids, found.scores, strict=True):
            if other not in exclude:
                scores[other] = scores.get(other, 0.0) + weight * s
    return scores


def top_scored(scores: Mapping[str, float], n: int) -> list[str]:
    """The n best ids, ties by id so the order is deterministic."""
    return [i for i, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def feature(score: float) -> float:
    """Counts are heavy-tailed: the fused score sees log(1 + count)."""
    return math.log1p(max(score, 0.0))


@dataclass(frozen=True)
class CovisitTable:
    """The offline artifact: every item's neighbours, in catalog-row form."""

    version: str
    catalog_version: str
    item_ids: list[str]  # catalog order
    offsets: np.ndarray  # (N + 1,) int64: neighbours of row r are [offsets[r], offsets[r+1])
    neighbour_rows: np.ndarray  # int32
    neighbour_scores: np.ndarray  # float32
    parameters: dict[str, object]

    def neighbours(self, row: int) -> Neighbours:
        lo, hi = int(self.offsets[row]), int(self.offsets[row + 1])
        return Neighbours(
            tuple(self.item_ids[r] for r in self.neighbour_rows[lo:hi].tolist()),
            tuple(float(s) for s in self.neighbour_scores[lo:hi].tolist()),
        )

    def as_mapping(self) -> dict[str, Neighbours]:
        return {
            item: self.neighbours(row)
            for row, item in enumerate(self.item_ids)
            if self.offsets[row + 1] > self.offsets[row]
        }

    def save(self, directory: Path) -> Path:
        path = Path(directory) / COVISIT_FILE
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(
            tmp,
            offsets=self.offsets,
            rows=self.neighbour_rows,
            scores=self.neighbour_scores,
            meta=np.array(
                json.dumps(
                    {
                        "version": self.version,
                        "catalog_version": self.catalog_version,
                        "parameters": self.parameters,
                    }
                )
            ),
        )
        tmp.replace(path)
        return path

    @classmethod
    def load_optional(
        cls, directory: Path | str, item_ids: list[str], catalog_version: str
    ) -> CovisitTable | None:
        """The catalog directory's table, or None when it has none (decoder only)."""
        if not (Path(directory) / COVISIT_FILE).is_file():
            return None
        return cls.load(directory, item_ids, catalog_version)

    @classmethod
    def load(cls, directory: Path | str, item_ids: list[str], catalog_version: str) -> CovisitTable:
        path = Path(directory) / COVISIT_FILE
        if not path.is_file():
            raise CovisitError(
                f"{path}: missing; build it with `thinkahead covisit build` "
                "(or `thinkahead catalog build --interactions ...`)"
            )
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            offsets, rows, scores = data["offsets"], data["rows"], data["scores"]
        built_for = meta["catalog_version"]
        if built_for != catalog_version:
            raise CovisitError(
                f"{path}: built for catalog {built_for}, but the catalog loaded is "
                f"{catalog_version}; rebuild it"
            )
        if len(offsets) != len(item_ids) + 1:
            raise CovisitError(f"{path}: {len(offsets) - 1} rows, catalog has {len(item_ids)}")
        return cls(meta["version"], built_for, item_ids, offsets, rows, scores, meta["parameters"])
