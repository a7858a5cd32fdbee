"""The item-level sequence model: SASRec trained with a softmax over items.

It is the collaborative signal the semantic-ID decoder lacks (notes/quality-probe.md: an
item-level softmax model beat every semantic-ID generator on Beauty). It never serves online and
adds nothing to the vLLM vocabulary: the think-ahead worker encodes each user's history into a
vector, looks up the user's best items in an index over the item vectors
(:mod:`offline.items.index`) and stores them with their scores in the user's snapshot value,
where they join the candidates and the fused score (``service.contracts.affinity``).

Configuration as in the eSASRec benchmark for Beauty: item embeddings tied between input and
output (256-d by default, ``offline.items.config``), learned positions, one causal
self-attention block with one head, history 50; dropout 0.5 by default, as SASRec for the sparse
Amazon sets.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class ItemModelConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    num_items: int = Field(ge=1)
    dim: int = Field(default=64, ge=8)
    blocks: int = Field(default=1, ge=1)
    heads: int = Field(default=1, ge=1)
    max_len: int = Field(default=50, ge=2)
    dropout: float = Field(default=0.2, ge=0, lt=1)


def attention_mask(real: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, length) bool of real items -> (batch * heads, length, length), True where
    attention is blocked: each position sees itself and the real items before it, never
    padding. Without the padding part a user's vector would depend on how long the other
    histories in its batch are (training batches hold similar lengths, the worker's batches do
    not: 1% of test R@10 on Beauty)."""
    length = real.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=real.device).tril()
    # a padded query has no real key before it: it keeps itself (its output is zeroed anyway)
    itself = torch.eye(length, dtype=torch.bool, device=real.device)
    return ~((causal & real[:, None, :]) | itself).repeat_interleave(heads, dim=0)


class ItemSequenceModel(nn.Module):
    """Item row r of the catalog is token r + 1; token 0 pads (left, so the last position is
    always the newest item)."""

    def __init__(self, cfg: ItemModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = nn.Embedding(cfg.num_items + 1, cfg.dim, padding_idx=0)
        self.positions = nn.Embedding(cfg.max_len, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                cfg.dim,
                cfg.heads,
                dim_feedforward=cfg.dim,
                dropout=cfg.dropout,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(cfg.blocks)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        # small, as for any tied table: N(0, 1) makes the first logits huge
        nn.init.normal_(self.items.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, length) left-padded tokens -> (batch, length, dim) hidden states."""
        length = tokens.shape[1]
        keep = (tokens > 0).unsqueeze(-1).to(self.items.weight.dtype)
        positions = torch.arange(self.cfg.max_len - length, self.cfg.max_len, device=tokens.device)
        x = self.items(tokens) * math.sqrt(self.cfg.dim) + self.positions(positions)
        x = self.dropout(x) * keep
        mask = attention_mask(tokens > 0, self.cfg.heads)
        for block in self.blocks:
            x = block(x, src_mask=mask) * keep
        return self.norm(x)

    def user_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """The hidden state after the newest item: what the next item's vector is scored
        against."""
        return self.forward(tokens)[:, -1]

    def item_vectors(self) -> torch.Tensor:
        """(num_items, dim): row r is catalog row r."""
        return self.items.weight[1:]
