"""Scored item codes packed for a snapshot value: (a, b, c) as uint16 and the score as float32,
10 bytes per item (stored answers, item-level scores)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.contracts.tokens import Code

SCORED_DTYPE = np.dtype([("a", "<u2"), ("b", "<u2"), ("c", "<u2"), ("score", "<f4")])


def pack_scored(ranked: Sequence[tuple[Code, float]]) -> bytes:
    rows = np.array([(a, b, c, s) for (a, b, c), s in ranked], dtype=SCORED_DTYPE)
    return rows.tobytes()


def unpack_scored(raw: bytes) -> list[tuple[Code, float]]:
    """Raises ValueError on a blob that is not whole rows."""
    if len(raw) % SCORED_DTYPE.itemsize:
        raise ValueError(
            f"packed codes of {len(raw)} bytes is not whole {SCORED_DTYPE.itemsize}-byte rows"
        )
    rows = np.frombuffer(raw, dtype=SCORED_DTYPE)
    return [((int(a), int(b), int(c)), float(s)) for a, b, c, s in rows.tolist()]
