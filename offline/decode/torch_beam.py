"""Reference constrained beam search in plain transformers, batched across users with a KV cache.

Independent of the vLLM path (own masking, own cache handling), so tests can cross-check the two;
also the fast path for validation during training on a CPU, where a tiny model's forward pass
is cheaper than vLLM's scheduling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from service.contracts.beam import Beam
from service.contracts.constraint import Constraint
from service.contracts.tokens import LEVELS, Code, TokenIds


def _left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _children(constraint: Constraint, code: tuple[int, ...]):  # type: ignore[no-untyped-def]
    if not code:
        return constraint.a_values()
    if len(code) == 1:
        return constraint.b_values(code[0])
    return constraint.c_values(code[0], code[1])


@torch.no_grad()
def beam_search_batch(
    model: torch.nn.Module,
    ids: TokenIds,
    constraints: Sequence[Constraint],
    histories: Sequence[Sequence[Code]],
    beam_width: int,
    depth: int = 3,
) -> list[list[Beam]]:
    """Top ``beam_width`` codes (depth levels) per history, best first, scores = summed
    constrained log-probs (log-softmax renormalised over each step's allowed tokens)."""
    n = len(histories)
    vocab = model.get_output_embeddings().weight.shape[0]
    pad = ids.pad if ids.pad is not None else 0
    input_ids, attn = _left_pad([ids.history(h) for h in histories], pad)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    logits = out.logits[:, -1, :].float()
    next_pos = positions[:, -1:] + 1

    codes: list[list[tuple[int, ...]]] = [[()] for _ in range(n)]
    scores = torch.zeros((n, 1))
    for level in range(depth):
        rows = n * scores.shape[1]
        mask = torch.zeros((rows, vocab), dtype=torch.bool)
        table = getattr(ids, LEVELS[level])
        flat_codes = [c for user in codes for c in user]
        for r, code in enumerate(flat_codes):
            children = _children(constraints[r // scores.shape[1]], code) if -1 not in code else []
            if len(children):
                mask[r, table[children]] = True
            else:  # a padding beam (score -inf): any finite row keeps the softmax free of NaN
                mask[r, pad] = True
        logp = logits.masked_fill(~mask, float("-inf")).log_softmax(-1)
        total = (scores.reshape(rows, 1) + logp).reshape(n, -1)
        k = min(beam_width, total.shape[1])
        best, flat_idx = total.topk(k, dim=-1)
        parent = flat_idx // vocab
        token = flat_idx % vocab
        new_codes: list[list[tuple[int, ...]]] = []
        for u in range(n):
            user_codes = []
            for j in range(k):
                base = codes[u][int(parent[u, j])]
                user_codes.append((*base, ids.index_of.get(int(token[u, j]), -1)))
            new_codes.append(user_codes)
        codes, scores = new_codes, best
        if level == depth - 1:
            break
        # Grow the cache to the new beams: the chosen parents' rows (duplicates allowed).
        gather = (torch.arange(n).unsqueeze(1) * (rows // n) + parent).reshape(-1)
        cache.batch_select_indices(gather)
        attn = torch.cat([attn[gather], torch.ones((len(gather), 1), dtype=attn.dtype)], dim=1)
        pos = next_pos[gather]
        out = model(
            input_ids=token.reshape(-1, 1),
            attention_mask=attn,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        next_pos = pos + 1

    results: list[list[Beam]] = []
    for u in range(n):
        beams = [
            Beam(code, float(s))
            for code, s in zip(codes[u], scores[u].tolist(), strict=True)
            if s != float("-inf") and -1 not in code
        ]
        results.append(beams)
    return results
