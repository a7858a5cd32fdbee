"""Thought paths for models that think before an item (OneRec-Think style).

Two kinds, by the model manifest's reasoning template:

- ``categories`` (a decoder trained with ``--reasoning`` on a catalog with categories): one
  request per user for P(category | history) after ``history <think>``; the G likeliest
  categories that still hold an item the user has not had are the paths, each searched under
  ``history <think> <cat> </think> <|sid_begin|>`` within that category's items and weighted
  by its probability. The best ``RATIONALES_KEPT`` are stored as the user's rationales, with
  the history items they rest on. G = 0 states and stores them and searches the plain prompt.
- ``free`` (a chat checkpoint's free text): G continuations sampled after ``history <think>``
  up to ``</think>`` (or the template's token budget, then closed); the search continues after
  each: ``history <think> path </think> <|sid_begin|>``; the first path's text is stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from offline.errors import InputError
from offline.thinkahead.prefixes import ThoughtPath, Thoughts
from offline.train.reasoning import ReasoningVocab, rationale_prompt, think_prompt
from service.contracts.catalog import Catalog
from service.contracts.constraint import CatalogSubset, Constraint
from service.contracts.manifest import ReasoningTemplate
from service.contracts.model import tokenizer_vocab
from service.contracts.rationale import (
    RATIONALES_KEPT,
    Categories,
    Rationale,
    evidence_for,
)
from service.contracts.tokens import Code, TokenIds
from service.engine.base import BatchEngine, ScoreRequest


class Reasoner:
    """Samples free-text paths (a chat model's)."""

    def __init__(self, model_dir: Path, template: ReasoningTemplate, ids: TokenIds) -> None:
        vocab = tokenizer_vocab(model_dir)
        missing = [t for t in (template.think_start, template.think_end) if t not in vocab]
        if missing:
            raise InputError(
                model_dir, f"reasoning template tokens not in the vocabulary: {missing}"
            )
        self.template = template
        self.ids = ids
        self.start, self.end = vocab[template.think_start], vocab[template.think_end]
        self.tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))

    def think(
        self, engine: BatchEngine, histories: Sequence[Sequence[Code]], paths: int, seed: int = 0
    ) -> list[Thoughts]:
        prompts = [[*self.ids.history(h)[:-1], self.start] for h in histories]
        sampled = engine.sample(
            prompts, paths, self.template.max_tokens, self.template.temperature, [self.end], seed
        )
        out = []
        for prompt, per_user in zip(prompts, sampled, strict=True):
            closed = [[*_strip_end(p, self.end), self.end] for p in per_user]
            texts = [self.tokenizer.decode(p[:-1], skip_special_tokens=False) for p in closed]
            out.append(
                Thoughts(
                    [ThoughtPath([*prompt, *p, self.ids.sid_begin]) for p in closed],
                    reasoning=texts[0] if texts else None,
                )
            )
        return out


def _strip_end(path: list[int], end: int) -> list[int]:
    return path[: path.index(end)] if end in path else path


class CategoryReasoner:
    """The G likeliest categories as paths (a decoder trained with ``--reasoning``)."""

    def __init__(
        self, model_dir: Path, catalog: Catalog, categories: Categories, ids: TokenIds
    ) -> None:
        vocab = tokenizer_vocab(model_dir)
        try:
            self.vocab = ReasoningVocab.from_vocab(vocab, categories, ())
        except KeyError as exc:
            raise InputError(
                model_dir, f"a category model whose tokenizer lacks {exc}: retrain it"
            ) from exc
        self.catalog, self.categories, self.ids = catalog, categories, ids
        codes = catalog.codes.tolist()
        members: dict[int, list[Code]] = {}
        for row, cat in enumerate(categories.of_row.tolist()):
            if cat >= 0:
                members.setdefault(cat, []).append(tuple(codes[row]))  # type: ignore[arg-type]
        self.subsets = {cat: CatalogSubset(cs) for cat, cs in members.items()}
        self.sizes = {cat: len(cs) for cat, cs in members.items()}

    def think(
        self, engine: BatchEngine, histories: Sequence[Sequence[Code]], paths: int, seed: int = 0
    ) -> list[Thoughts]:
        """One engine batch for every user's P(category | history), then the paths."""
        open_cats = [self._open(h) for h in histories]
        requests = [
            ScoreRequest(
                tuple(think_prompt(self.ids, self.vocab, h)),
                tuple(int(self.vocab.categories[c]) for c in cats),
                top_n=max(paths, RATIONALES_KEPT),
            )
            for h, cats in zip(histories, open_cats, strict=True)
        ]
        answers = engine.score_batch(requests)
        token_cat = {int(t): c for c, t in enumerate(self.vocab.categories)}
        out = []
        for history, answer in zip(histories, answers, strict=True):
            ranked = sorted(
                ((token_cat[t], lp) for t, lp in answer.items() if t in token_cat),
                key=lambda cl: (-cl[1], cl[0]),
            )
            out.append(self._thoughts(history, ranked, paths))
        return out

    def _open(self, history: Sequence[Code]) -> list[int]:
        """Categories with an item the user has not had (its rationale can be served)."""
        seen: dict[int, int] = {}
        for code in set(history):
            row = self.catalog.row_by_code.get(code)
            cat = int(self.categories.of_row[row]) if row is not None else -1
            if cat >= 0:
                seen[cat] = seen.get(cat, 0) + 1
        return [c for c, n in self.sizes.items() if seen.get(c, 0) < n]

    def _thoughts(
        self, history: Sequence[Code], ranked: list[tuple[int, float]], paths: int
    ) -> Thoughts:
        items = [self.catalog.item_at(c) or "" for c in history]
        cats = [
            int(self.categories.of_row[r])
            if (r := self.catalog.row_by_code.get(c)) is not None
            else -1
            for c in history
        ]
        thought_paths = [
            ThoughtPath(
                rationale_prompt(self.ids, self.vocab, history, cat),
                Constraint(self.subsets[cat], history),
                lp,
            )
            for cat, lp in ranked[:paths]
            if math.isfinite(lp)
        ] or [ThoughtPath(self.ids.history(history))]  # G = 0: state it, search plainly
        rationales = tuple(
            Rationale(cat, lp, evidence_for(cat, items, cats))
            for cat, lp in ranked[:RATIONALES_KEPT]
        )
        return Thoughts(thought_paths, rationales=rationales)
