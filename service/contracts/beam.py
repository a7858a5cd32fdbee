"""Trie-exact constrained beam search over semantic-ID levels, as a step machine.

Each step yields a batch of :class:`ScoreRequest` (one per live beam) and takes their answers.
The same machine drives the online full decode (3 levels, async engine), the think-ahead
prefix search (2 levels, offline batches across users) and evaluation. Every beam it keeps is a
real prefix of the catalog: children come from the constraint, which never offers a dead end.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from service.contracts.constraint import Constraint
from service.contracts.tokens import LEVELS, TokenIds
from service.engine.base import ScoreRequest, TokenLogprobs


@dataclass(frozen=True, slots=True)
class Beam:
    code: tuple[int, ...]
    score: float  # sum of constrained log-probs of the code's tokens


class BeamSearch:
    def __init__(
        self,
        prompt: Sequence[int],
        token_ids: TokenIds,
        constraint: Constraint,
        beam_width: int,
        depth: int = 3,
    ) -> None:
        if not 1 <= depth <= 3:
            raise ValueError("depth must be 1, 2 or 3")
        if beam_width < 1:
            raise ValueError("beam width must be positive")
        self.prompt = tuple(prompt)
        self.ids = token_ids
        self.constraint = constraint
        self.width = beam_width
        self.depth = depth
        self.beams: list[Beam] = [Beam((), 0.0)]
        self._pending: list[Beam] = []
        # log P(a) of every first token the engine returned (not only the kept beams): the
        # think-ahead worker stores them so a fresh history can reuse log P(b | a)
        self.first: dict[int, float] = {}

    @property
    def level(self) -> int:
        return len(self.beams[0].code) if self.beams else self.depth

    @property
    def done(self) -> bool:
        return not self.beams or self.level >= self.depth

    def _children(self, code: tuple[int, ...]):  # type: ignore[no-untyped-def]
        if len(code) == 0:
            return self.constraint.a_values()
        if len(code) == 1:
            return self.constraint.b_values(code[0])
        return self.constraint.c_values(code[0], code[1])

    def requests(self) -> list[ScoreRequest]:
        level = LEVELS[self.level]
        reqs: list[ScoreRequest] = []
        self._pending = []
        for beam in self.beams:
            children = self._children(beam.code)
            if len(children) == 0:
                continue
            code_tokens = [int(getattr(self.ids, LEVELS[i])[v]) for i, v in enumerate(beam.code)]
            reqs.append(
                ScoreRequest(
                    prompt=self.prompt + tuple(code_tokens),
                    allowed=tuple(self.ids.level_ids(level, children)),
                    top_n=self.width,
                )
            )
            self._pending.append(beam)
        return reqs

    def advance(self, results: Sequence[TokenLogprobs]) -> None:
        if len(results) != len(self._pending):
            raise ValueError(f"{len(results)} results for {len(self._pending)} requests")
        candidates: list[Beam] = []
        for beam, result in zip(self._pending, results, strict=True):
            for token, logprob in result.items():
                index = self.ids.index_of.get(token)
                if index is None:
                    continue
                candidates.append(Beam((*beam.code, index), beam.score + logprob))
        if self._pending and not self._pending[0].code:
            self.first = {b.code[0]: b.score for b in candidates}
        candidates.sort(key=lambda b: (-b.score, b.code))
        self.beams = candidates[: self.width]
        self._pending = []


def _plan(searches: Sequence[BeamSearch]) -> tuple[list[BeamSearch], list[list[ScoreRequest]]]:
    live = [s for s in searches if not s.done]
    return live, [s.requests() for s in live]


def _dispatch(
    live: list[BeamSearch], per_search: list[list[ScoreRequest]], results: Sequence[TokenLogprobs]
) -> None:
    offset = 0
    for search, reqs in zip(live, per_search, strict=True):
        search.advance(results[offset : offset + len(reqs)])
        offset += len(reqs)


def run_searches(
    searches: Sequence[BeamSearch], score_batch: Callable[[list[ScoreRequest]], list[TokenLogprobs]]
) -> None:
    """Drive many searches in lock step; each step is one engine batch across all of them."""
    while True:
        live, per_search = _plan(searches)
        if not live:
            return
        flat = [r for reqs in per_search for r in reqs]
        _dispatch(live, per_search, score_batch(flat) if flat else [])


async def run_searches_async(
    searches: Sequence[BeamSearch],
    score: Callable[[list[ScoreRequest]], Awaitable[list[TokenLogprobs]]],
) -> None:
    while True:
        live, per_search = _plan(searches)
        if not live:
            return
        flat = [r for reqs in per_search for r in reqs]
        _dispatch(live, per_search, await score(flat) if flat else [])
