"""The item-level sequence model: SASRec trained with a softmax over items.

It is the collaborative signal the semantic-ID decoder lacks (notes/quality-probe.md: an
item-level softmax model beat every semantic-ID generator on Beauty). It adds nothing to the vLLM
vocabulary: the think-ahead worker encodes each user's history into a vector, looks up the
user's best items in an index over the item vectors (:mod:`service.contracts.item_index`) and
stores them with their scores in the user's snapshot value, where they join the candidates and
the fused score (``service.contracts.affinity``); the service encodes a fresh history the same
way for its no-engine answer after an event (``service.core.fresh_items``). Shared, so both sides
load one definition.

Configuration as in the eSASRec benchmark for Beauty: item embeddings tied between input and
output (256-d by default, ``offline.items.config``), learned positions, one causal
self-attention block with one head, history 50; dropout 0.5 by default, as SASRec for the sparse
Amazon sets.

``mixer="bsarec"`` swaps the blocks for BSARec's (Shin et al., "An Attentive Inductive Bias for
Sequential Recommendation beyond the Self-Attention", AAAI 2024; official code
yehjin-shin/BSARec): beside the self-attention a fixed frequency filter over the window (the
``c // 2 + 1`` lowest rfft bins kept as the low-pass part, plus a learned ``beta`` times the
high-pass rest), mixed ``alpha`` x filter + (1 - alpha) x attention; post-norm sublayers, a 4x
GELU feed-forward and a layer norm on the embeddings, as that code. The filter sees the whole
window, newer items included: such a model trains on prefixes (``ItemTrainConfig.prefixes``),
never with a loss at every position.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
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
    # the defaults are what every model saved before BSARec was (they load unchanged)
    mixer: Literal["attention", "bsarec"] = "attention"
    # bsarec only: the frequency filter's share of the mix (the attention gets 1 - alpha)
    alpha: float = Field(default=0.7, ge=0, le=1)
    # bsarec only, as the official ``--c``: the filter keeps the c // 2 + 1 lowest frequencies
    # of the max_len window (c=5: the mean and the 1- and 2-cycle waves) as its low-pass part
    c: int = Field(default=5, ge=1)


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


def low_pass_operator(length: int, c: int) -> torch.Tensor:
    """(length, length) matrix ``P`` with ``P @ x`` = irfft(rfft(x) with every bin from
    ``c // 2 + 1`` on zeroed) along the first axis, ortho norm, as BSARec's FrequencyLayer."""
    spectrum = torch.fft.rfft(torch.eye(length, dtype=torch.float64), dim=0, norm="ortho")
    spectrum[c // 2 + 1 :] = 0
    return torch.fft.irfft(spectrum, n=length, dim=0, norm="ortho").float()


class UniformDropout(nn.Module):
    """``nn.Dropout`` with its keep mask drawn by ``uniform_``: the same distribution, but on
    CPU ``bernoulli_`` (what ``nn.Dropout`` and the attention's ``dropout_p`` draw with) is ~4x
    slower at these shapes and was a quarter of a BSARec training step on 2 cores. No
    parameters, so saved models load unchanged."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout {p} is not in [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.empty_like(x).uniform_() >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class FrequencyLayer(nn.Module):
    """BSARec's filter: low-pass + beta x high-pass of the window, then dropout, residual and
    norm. Always over the whole ``max_len`` window with the padding (left, zeroed by the
    caller) in it, as the official code whose inputs are always padded to max_len: a user's
    result does not depend on how wide its batch is. The filter is linear, so it is one
    precomputed matrix (exactly the rfft / irfft pair, see the tests)."""

    def __init__(self, dim: int, max_len: int, c: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("low_pass", low_pass_operator(max_len, c), persistent=False)
        self.sqrt_beta = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = UniformDropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[1]
        # the window's first max_len - width positions are padding (zero): their columns drop
        low = self.low_pass[-width:, -width:] @ x
        filtered = low + self.sqrt_beta**2 * (x - low)
        return self.norm(self.dropout(filtered) + x)


class SelfAttention(nn.Module):
    """BSARec's (BERT-style) multi-head attention sublayer: post-norm, dropout on the
    attention weights and on the output."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.weights_dropout = UniformDropout(dropout)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = UniformDropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        batch, width, dim = x.shape
        q, k, v = (
            self.qkv(x).view(batch, width, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        )
        if self.training:
            # the weights spelt out so that their dropout draws with uniform_, not bernoulli_
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            weights = scores.masked_fill(blocked[:, None], -torch.inf).softmax(dim=-1)
            h = self.weights_dropout(weights) @ v
        else:
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=~blocked[:, None])
        h = h.transpose(1, 2).reshape(batch, width, dim)
        return self.norm(self.dropout(self.out(h)) + x)


class BSARecBlock(nn.Module):
    """alpha x frequency filter + (1 - alpha) x self-attention, then the feed-forward
    sublayer (4x wide, GELU, post-norm)."""

    def __init__(self, cfg: ItemModelConfig) -> None:
        super().__init__()
        self.alpha = cfg.alpha
        self.filter = FrequencyLayer(cfg.dim, cfg.max_len, cfg.c, cfg.dropout)
        self.attention = SelfAttention(cfg.dim, cfg.heads, cfg.dropout)
        self.feed_forward = nn.Sequential(
            nn.Linear(cfg.dim, 4 * cfg.dim),
            nn.GELU(),
            nn.Linear(4 * cfg.dim, cfg.dim),
            UniformDropout(cfg.dropout),
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-12)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        mixed = torch.zeros_like(x)
        if self.alpha > 0:
            mixed = mixed + self.alpha * self.filter(x)
        if self.alpha < 1:
            mixed = mixed + (1 - self.alpha) * self.attention(x, blocked)
        return self.norm(self.feed_forward(mixed) + mixed)


class ItemSequenceModel(nn.Module):
    """Item row r of the catalog is token r + 1; token 0 pads (left, so the last position is
    always the newest item)."""

    def __init__(self, cfg: ItemModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = nn.Embedding(cfg.num_items + 1, cfg.dim, padding_idx=0)
        self.positions = nn.Embedding(cfg.max_len, cfg.dim)
        self.dropout = UniformDropout(cfg.dropout)
        self.blocks: nn.ModuleList
        if cfg.mixer == "bsarec":
            self.embedding_norm = nn.LayerNorm(cfg.dim, eps=1e-12)
            self.blocks = nn.ModuleList(BSARecBlock(cfg) for _ in range(cfg.blocks))
            self.norm: nn.Module = nn.Identity()  # each block ends in a norm
            for module in self.blocks.modules():  # as the official init_weights
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)
        else:
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
        if length > self.cfg.max_len:
            raise ValueError(f"{length} tokens, more than max_len {self.cfg.max_len}")
        keep = (tokens > 0).unsqueeze(-1).to(self.items.weight.dtype)
        positions = torch.arange(self.cfg.max_len - length, self.cfg.max_len, device=tokens.device)
        if self.cfg.mixer == "bsarec":
            x = self.embedding_norm(self.items(tokens) + self.positions(positions))
            x = self.dropout(x) * keep
            blocked = attention_mask(tokens > 0, 1)
            for block in self.blocks:
                x = block(x, blocked) * keep  # padding stays zero: the next filter ignores it
            return x
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
