"""The one engine primitive everything is built on.

A :class:`ScoreRequest` asks for the log-probs of the next token after ``prompt``, renormalised
over ``allowed`` (vLLM's processed log-probs with ``allowed_token_ids``): either of the ``want``
tokens, or of the ``top_n`` most likely ones. Beam search steps, whole-item scoring and the
think-ahead prefix search are all batches of these, submitted together as one engine round so
that the prefix cache serves their shared history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

TokenLogprobs = dict[int, float]


class EngineError(RuntimeError):
    """The engine failed or is not running (the core maps it to a fallback or UNAVAILABLE)."""


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    prompt: tuple[int, ...]
    allowed: tuple[int, ...]
    want: tuple[int, ...] | None = None
    top_n: int = 0

    def __post_init__(self) -> None:
        if not self.allowed:
            raise ValueError("empty allowed set: drop the candidate instead of asking the engine")
        if self.want is None and self.top_n <= 0:
            raise ValueError("ask for wanted tokens or a positive top_n")

    @property
    def n_logprobs(self) -> int:
        return min(self.top_n, len(self.allowed))


def logprobs_to_ask(request: ScoreRequest) -> int:
    """The ``logprobs=N`` to send: ``top_n``, or for wanted tokens the whole allowed set (the
    log-probs are renormalised over it, so its top len(allowed) is every allowed token; then
    :func:`pick` keeps the wanted ones). Neither engine uses vLLM's ``logprob_token_ids``: in
    vLLM 0.32 a batch that mixes such requests with ``logprobs=N`` ones answers the latter with
    the sampled token only, and requests of different users share batches. An allowed set is
    one level's codes, so the engine's max logprobs must be at least K (256 by default)."""
    return len(request.allowed) if request.want is not None else request.n_logprobs


def pick(result: TokenLogprobs, request: ScoreRequest) -> TokenLogprobs:
    """Keep only what the request asked for (engines may return the sampled token too)."""
    if request.want is not None:
        return {t: result[t] for t in request.want if t in result}
    allowed = set(request.allowed)
    ranked = sorted(((lp, t) for t, lp in result.items() if t in allowed), reverse=True)
    return {t: lp for lp, t in ranked[: request.n_logprobs]}


class Engine(Protocol):
    """Async engine used by the online service."""

    model_version: str

    async def score(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]:
        """Answer all requests in one engine round, in order."""
        ...

    async def check_health(self) -> bool: ...

    def is_dead(self) -> bool:
        """True when the engine cannot recover without a process restart (liveness)."""
        ...

    async def close(self) -> None: ...


class BatchEngine(Protocol):
    """Synchronous engine for offline jobs: whole batches across users."""

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]: ...

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        stop_token_ids: Sequence[int],
        seed: int,
    ) -> list[list[list[int]]]:
        """``n`` sampled continuations per prompt (token ids), for reasoning paths."""
        ...
