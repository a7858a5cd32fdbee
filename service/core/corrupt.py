"""The one decode-or-count helper: a stored blob that does not decode is counted by type
(``thinkahead_corrupt_values_total``) and logged, and the request goes on without it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from service.metrics import Metrics

T = TypeVar("T")
log = logging.getLogger(__name__)


class CorruptValues:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def decode(self, what: str, decode: Callable[[bytes], T], raw: bytes, default: T) -> T:
        """``decode(raw)``, or ``default`` (counted as ``what``) when it raises ValueError: every
        codec of ours raises a subclass of it on a damaged value."""
        try:
            return decode(raw)
        except ValueError as exc:
            self.count(what, exc)
            return default

    def count(self, what: str, exc: ValueError) -> None:
        """A damaged ``what``, told by a decoder that went on without it."""
        self.metrics.corrupt_values.labels(what).inc()
        log.warning("event=corrupt_value what=%s error=%s", what, exc)
