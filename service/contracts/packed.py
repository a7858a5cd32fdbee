"""Scored item codes packed for a snapshot value (stored answers, item-level scores, stored
log P(c | a, b)).

A packed list is one tag byte, then fixed-size rows: (a, b, c) as uint8 where every code fits
(catalogs with K <= 256) else uint16, and the score as float32 (``precise``: what callers see,
e.g. a stored answer's fused scores) or float16 (features and stored log-probs, where 1e-3 does
not reorder anything measurable). 5 to 10 bytes per item. The tag says which, so a reader needs
no other context. Values of schema 1 held tagless 10-byte rows (uint16 codes, float32 scores):
:func:`unpack_scored_v1` reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.contracts.tokens import Code

_TAG = 0xE0  # the top three bits mark a packed list; bit 0: uint16 codes; bit 1: float32
_TAG_MASK = 0xFC
SCORED_DTYPE_V1 = np.dtype([("a", "<u2"), ("b", "<u2"), ("c", "<u2"), ("score", "<f4")])


def _dtype(wide: bool, precise: bool) -> np.dtype:
    code = "<u2" if wide else "u1"
    return np.dtype([("a", code), ("b", code), ("c", code), ("score", "<f4" if precise else "<f2")])


def pack_scored(ranked: Sequence[tuple[Code, float]], precise: bool = False) -> bytes:
    if not ranked:
        return b""
    wide = max(max(code) for code, _ in ranked) > 255
    dtype = _dtype(wide, precise)
    rows = np.array([(a, b, c, s) for (a, b, c), s in ranked], dtype=dtype)
    return bytes([_TAG | int(wide) | int(precise) << 1]) + rows.tobytes()


def unpack_scored(raw: bytes) -> list[tuple[Code, float]]:
    """Raises ValueError on a blob that is not a packed list of whole rows."""
    if not raw:
        return []
    tag = raw[0]
    if tag & _TAG_MASK != _TAG:
        raise ValueError(f"not a packed list of scored codes (tag {tag:#04x})")
    dtype = _dtype(bool(tag & 1), bool(tag & 2))
    body = raw[1:]
    if len(body) % dtype.itemsize:
        raise ValueError(
            f"packed codes of {len(body)} bytes is not whole {dtype.itemsize}-byte rows"
        )
    rows = np.frombuffer(body, dtype=dtype)
    return [((int(a), int(b), int(c)), float(s)) for a, b, c, s in rows.tolist()]


def unpack_scored_v1(raw: bytes) -> list[tuple[Code, float]]:
    """A schema-1 value's tagless rows (uint16 codes, float32 scores)."""
    if len(raw) % SCORED_DTYPE_V1.itemsize:
        raise ValueError(
            f"packed codes of {len(raw)} bytes is not whole {SCORED_DTYPE_V1.itemsize}-byte rows"
        )
    rows = np.frombuffer(raw, dtype=SCORED_DTYPE_V1)
    return [((int(a), int(b), int(c)), float(s)) for a, b, c, s in rows.tolist()]


_PREFIX_TAG = 0xD0  # bit 0: uint16 codes


def pack_prefixes(rows: Sequence[tuple[int, int, float]]) -> bytes:
    """(a, b, float32 score) rows: a user's prefixes, the extra prefixes' heads."""
    if not rows:
        return b""
    wide = max(max(a, b) for a, b, _ in rows) > 255
    code = "<u2" if wide else "u1"
    dtype = np.dtype([("a", code), ("b", code), ("score", "<f4")])
    return bytes([_PREFIX_TAG | int(wide)]) + np.array(list(rows), dtype=dtype).tobytes()


def unpack_prefixes(raw: bytes) -> list[tuple[int, int, float]]:
    if not raw:
        return []
    if raw[0] & 0xFE != _PREFIX_TAG:
        raise ValueError(f"not a packed prefix list (tag {raw[0]:#04x})")
    code = "<u2" if raw[0] & 1 else "u1"
    dtype = np.dtype([("a", code), ("b", code), ("score", "<f4")])
    if (len(raw) - 1) % dtype.itemsize:
        raise ValueError("packed prefixes are not whole rows")
    return [(int(a), int(b), float(s)) for a, b, s in np.frombuffer(raw[1:], dtype).tolist()]


_FIRST_TAG = 0xC0  # bit 0: uint16 codes


def pack_first_tokens(rows: Sequence[tuple[int, float]]) -> bytes:
    """(a, float32 log P(a)) rows: log P(b | a) = a prefix's score minus it, exactly."""
    if not rows:
        return b""
    wide = max(a for a, _ in rows) > 255
    dtype = np.dtype([("a", "<u2" if wide else "u1"), ("lp", "<f4")])
    return bytes([_FIRST_TAG | int(wide)]) + np.array(list(rows), dtype=dtype).tobytes()


def unpack_first_tokens(raw: bytes) -> list[tuple[int, float]]:
    if not raw:
        return []
    if raw[0] & 0xFE != _FIRST_TAG:
        raise ValueError(f"not a packed first-token list (tag {raw[0]:#04x})")
    dtype = np.dtype([("a", "<u2" if raw[0] & 1 else "u1"), ("lp", "<f4")])
    if (len(raw) - 1) % dtype.itemsize:
        raise ValueError("packed first tokens are not whole rows")
    return [(int(a), float(lp)) for a, lp in np.frombuffer(raw[1:], dtype).tolist()]
