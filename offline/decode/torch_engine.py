"""A plain-PyTorch :class:`service.engine.base.BatchEngine`: the same score requests as vLLM
answers, computed with one batched forward of each distinct history and a KV cache for the one
or two item tokens after it.

What it is for: evaluating the served scoring (plan, combine, fusion: the service's own code)
on every test user in minutes on a CPU, where a tiny model's forward is far cheaper than an
engine round; cross-checked against vLLM in tests. It is also the floor a latency report can
put beside the engine path. It is not a serving path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from offline.decode.torch_beam import _left_pad
from service.contracts.tokens import TokenIds
from service.engine.base import ScoreRequest, TokenLogprobs, pick


def _split(prompt: tuple[int, ...], ids: TokenIds) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the shared root, the at most two item tokens after it): the root ends at the last
    ``<|sid_begin|>`` when only item tokens follow it; any other prompt (e.g. ``history
    <think>``) is a root of its own."""
    for i in range(len(prompt) - 1, -1, -1):
        if prompt[i] == ids.sid_begin:
            suffix = prompt[i + 1 :]
            if len(suffix) <= 2 and all(t in ids.index_of for t in suffix):
                return prompt[: i + 1], suffix
            break
    return prompt, ()


class TorchBatchEngine:
    def __init__(self, model_dir: Path | str, ids: TokenIds, token_budget: int = 150_000) -> None:
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
        self.ids = ids
        self.token_budget = token_budget  # cache rows x width per forward: bounds memory

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]:
        split = [_split(r.prompt, self.ids) for r in requests]
        roots = sorted({root for root, _ in split}, key=len)
        nodes_of: dict[tuple[int, ...], set[tuple[int, ...]]] = {root: {()} for root in roots}
        for root, suffix in split:
            for depth in range(1, len(suffix) + 1):
                nodes_of[root].add(suffix[:depth])
        logits: dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
        for chunk in self._chunks(roots, nodes_of):
            logits.update(self._forward(chunk, nodes_of))
        out = []
        for request, key in zip(requests, split, strict=True):
            row = logits[key]
            allowed = torch.tensor(request.allowed, dtype=torch.long)
            logp = row[allowed].log_softmax(-1)
            values = dict(zip(request.allowed, logp.tolist(), strict=True))
            out.append(pick(values, request))
        return out

    def _chunks(
        self, roots: list[tuple[int, ...]], nodes_of: dict[tuple[int, ...], set[tuple[int, ...]]]
    ) -> list[list[tuple[int, ...]]]:
        chunks: list[list[tuple[int, ...]]] = []
        current: list[tuple[int, ...]] = []
        rows = 0
        for root in roots:  # ascending length: the newest root is the widest
            width = len(root) + 2
            need = len(nodes_of[root])
            if current and (rows + need) * width > self.token_budget:
                chunks.append(current)
                current, rows = [], 0
            current.append(root)
            rows += need
        if current:
            chunks.append(current)
        return chunks

    @torch.no_grad()
    def _forward(
        self,
        roots: list[tuple[int, ...]],
        nodes_of: dict[tuple[int, ...], set[tuple[int, ...]]],
    ) -> dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor]:
        pad = self.ids.pad if self.ids.pad is not None else 0
        input_ids, attn = _left_pad(roots, pad)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attn,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.past_key_values
        result = {(root, ()): out.logits[i, -1].float() for i, root in enumerate(roots)}
        # level by level: the rows of the previous level's nodes, one new token each
        parents: list[tuple[int, tuple[int, ...]]] = [(i, ()) for i in range(len(roots))]
        next_pos = positions[:, -1:] + 1
        for depth in (1, 2):
            children = [
                (p, node)
                for p, (r, parent) in enumerate(parents)
                for node in sorted(nodes_of[roots[r]])
                if len(node) == depth and node[:-1] == parent
            ]
            if not children:
                break
            gather = torch.tensor([p for p, _ in children], dtype=torch.long)
            cache.batch_select_indices(gather)
            attn = torch.cat([attn[gather], torch.ones((len(gather), 1), dtype=attn.dtype)], 1)
            pos = next_pos[gather]
            tokens = torch.tensor([[node[-1]] for _, node in children], dtype=torch.long)
            out = self.model(
                input_ids=tokens,
                attention_mask=attn,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            parents = [(parents[p][0], node) for p, node in children]
            for row, (r, node) in enumerate(parents):
                result[(roots[r], node)] = out.logits[row, -1].float()
            next_pos = pos + 1
        return result

    def sample(self, *args: object, **kwargs: object) -> list[list[list[int]]]:
        raise NotImplementedError("reasoning paths need the vLLM engine")
