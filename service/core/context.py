"""One recommend request's state, opened by the chain's read and passed along its steps."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.contracts.constraint import Constraint
from service.contracts.manifest import SnapshotManifest
from service.contracts.snapshot import UserPrefixes, history_digest
from service.contracts.tokens import Code
from service.core.clock import Clock
from service.core.types import DegradedReason, RecommendQuery
from service.storage.snapshot_watch import ActiveSnapshot


@dataclass
class RequestContext:
    """One recommend request's state, passed along the chain instead of long argument lists."""

    q: RecommendQuery
    clock: Clock
    request_id: str
    snapshot_id: str | None
    snapshot_value: bytes | None
    history: list[Code]  # the fresh history's codes (stored + recent), oldest first
    constraint: Constraint
    prompt: list[int]
    problem: DegradedReason | None  # why the read or the active snapshot cannot serve
    value: UserPrefixes | None = None  # the user's snapshot value, once judged usable
    manifest: SnapshotManifest | None = None  # the active snapshot's
    fresh_ids: list[str] = field(default_factory=list)  # stored history + recent, oldest first
    excluded_ids: set[str] = field(default_factory=set)
    # read on first use: a stored answer needs no co-visitation (and no second round trip)
    covisit: dict[str, float] | None = None

    @property
    def unchanged(self) -> bool:
        """The request scores under exactly the history its snapshot value was computed from:
        every offline score is the fresh one."""
        return (
            self.value is not None
            and not self.q.recent_item_ids
            and not self.q.exclude_item_ids
            and self.value.history_digest == history_digest(self.history)
        )


def snapshot_problem(active: ActiveSnapshot | None) -> DegradedReason | None:
    """Why the active snapshot cannot serve; None when it can."""
    if active is None:
        return DegradedReason.NO_SNAPSHOT
    return None if active.problem is None else DegradedReason(active.problem)
