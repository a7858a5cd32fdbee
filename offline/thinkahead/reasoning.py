"""Reasoning paths for models that think before an item (OneRec-Think style).

The prompt is the history followed by ``<think>``; G continuations are sampled up to
``</think>`` (or the template's token budget, then closed), and the prefix search continues
after each: ``history <think> path </think> <|sid_begin|>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from offline.errors import InputError
from offline.thinkahead.prefixes import ReasoningPaths
from service.contracts.manifest import ReasoningTemplate
from service.contracts.model import tokenizer_vocab
from service.contracts.tokens import Code, TokenIds
from service.engine.base import BatchEngine


class Reasoner:
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

    def sample(
        self, engine: BatchEngine, histories: Sequence[Sequence[Code]], paths: int, seed: int = 0
    ) -> ReasoningPaths:
        prompts = [[*self.ids.history(h)[:-1], self.start] for h in histories]
        sampled = engine.sample(
            prompts, paths, self.template.max_tokens, self.template.temperature, [self.end], seed
        )
        tokens: list[list[list[int]]] = []
        texts: list[list[str]] = []
        for per_user in sampled:
            closed = [[self.start, *_strip_end(p, self.end), self.end] for p in per_user]
            tokens.append(closed)
            texts.append(
                [self.tokenizer.decode(p[1:-1], skip_special_tokens=False) for p in closed]
            )
        return ReasoningPaths(tokens, texts)


def _strip_end(path: list[int], end: int) -> list[int]:
    return path[: path.index(end)] if end in path else path
