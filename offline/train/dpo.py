"""Preference alignment on the model's own rollouts (OneRec's DPO stage), after supervised
training.

For every training user the supervised model (frozen: the reference) beam-searches its top
items for the user's last training item's history; the true item is preferred over each of the
rollout items it did not beat, most over those ranked highest (a rank-aware weight
1 / log2(rank + 2), the NDCG discount: a wrong item ranked first costs most). The policy, started
from the supervised weights, minimises the weighted DPO loss

    -log sigmoid(beta * ((log pi(y+) - log ref(y+)) - (log pi(y-) - log ref(y-))))

plus ``sft_weight`` times the true item's negative log-likelihood, which keeps it from drifting
off the data (DPO alone can lower both likelihoods). log pi(y) is the item's constrained
log-probability, the sum over its a, b and c tokens of the per-level softmax the decoder is
trained and decoded with. Rollouts are refreshed from the policy every epoch (on-policy); the
best epoch by NDCG@10 on the validation sample (plain full decode, as in supervised training;
NDCG, since the preference is about rank) is kept, and none if no epoch beats the supervised
model.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from offline.data import Example, leave_one_out, read_interactions
from offline.decode.torch_beam import beam_search_batch
from offline.errors import InputError
from offline.fsutil import atomic_directory
from offline.train.checkpoint import peak_rss_gb
from offline.train.config import DpoConfig
from offline.train.dataset import IGNORE, LEVEL_OFFSETS
from offline.train.trainer import (
    evaluate_examples,
    length_batches,
    native_bf16,
    validation_sample,
)
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.manifest import ModelManifest, sha256_hex
from service.contracts.model import load_model_info
from service.contracts.tokens import Code, TokenIds

log = logging.getLogger(__name__)
SELECT_BY = "ndcg@10"


@dataclass(frozen=True)
class Pair:
    """One user's preferences: the true item over each rejected one, with its weight."""

    history: list[Code]
    chosen: Code
    rejected: list[Code]
    weights: list[float]


def training_examples(
    catalog: Catalog, interactions: Path, max_history: int, exclude_users: set[str]
) -> list[tuple[list[Code], Code]]:
    """(history, next item) of each training user's last training item."""
    split = leave_one_out(read_interactions(interactions), max_history)
    out = []
    for user, items in zip(split.train.users, split.train.items, strict=True):
        if user in exclude_users or len(items) < 2:
            continue
        codes, unknown = catalog.codes_of(items)
        if unknown or len(codes) < 2:
            continue
        out.append((codes[-max_history - 1 : -1], codes[-1]))
    return out


def rollout_pairs(
    model: LlamaForCausalLM,
    catalog: Catalog,
    ids: TokenIds,
    examples: list[tuple[list[Code], Code]],
    cfg: DpoConfig,
    progress: bool,
) -> list[Pair]:
    """Beam-search each history; the true item against the rollout items ranked above it (or
    the top ``rejected`` when it is not among them)."""
    model.eval()
    pairs: list[Pair] = []
    groups = length_batches([len(h) * 5 + 2 for h, _ in examples], cfg.rollouts, 200_000)
    for group in tqdm(groups, desc="rollouts", disable=not progress, unit="batch"):
        hist = [examples[i][0] for i in group]
        beams = beam_search_batch(
            model, ids, [Constraint(catalog, h) for h in hist], hist, cfg.rollouts
        )
        for i, user_beams in zip(group, beams, strict=True):
            history, target = examples[i]
            wrong = [(rank, b.code) for rank, b in enumerate(user_beams) if b.code != target][
                : cfg.rejected
            ]
            if not wrong:
                continue
            pairs.append(
                Pair(
                    history,
                    target,
                    [code for _, code in wrong],  # type: ignore[misc]
                    [1.0 / math.log2(rank + 2) for rank, _ in wrong],
                )
            )
    return pairs


def item_logprobs(
    model: LlamaForCausalLM,
    ids: TokenIds,
    masks: torch.Tensor,
    histories: list[list[Code]],
    items: list[Code],
) -> torch.Tensor:
    """log P(a, b, c | history) of each (history, item), per-level softmax: (n,)."""
    pad = ids.pad if ids.pad is not None else 0
    seqs = [[*ids.history(h)[:-1], *ids.item(y)] for h, y in zip(histories, items, strict=True)]
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    levels = torch.full((len(seqs), width), -1, dtype=torch.long)
    for row, s in enumerate(seqs):
        tokens[row, : len(s)] = torch.tensor(s)
        attn[row, : len(s)] = 1
        base = len(s) - 5  # <|sid_begin|> of the item
        for level, off in enumerate(LEVEL_OFFSETS):
            labels[row, base + off - 1] = s[base + off]
            levels[row, base + off - 1] = level
    hidden = model.model(input_ids=tokens, attention_mask=attn).last_hidden_state
    sel = labels != IGNORE
    logits = model.lm_head(hidden[sel]).float()
    logits = logits.masked_fill(~masks[levels[sel]], float("-inf"))
    token_lp = logits.log_softmax(-1).gather(1, labels[sel].unsqueeze(1)).squeeze(1)
    return token_lp.view(len(seqs), 3).sum(-1)


def _flatten(pairs: list[Pair]) -> tuple[list[list[Code]], list[Code], list[int]]:
    """Every (history, item) the pairs score: chosen first, then rejected, per pair."""
    histories: list[list[Code]] = []
    items: list[Code] = []
    starts = []
    for p in pairs:
        starts.append(len(items))
        for y in [p.chosen, *p.rejected]:
            histories.append(p.history)
            items.append(y)
    return histories, items, starts


def _length_batches(pairs: list[Pair], size: int, rng: np.random.Generator) -> list[list[Pair]]:
    """Batches of similar history lengths (little padding), in random order."""
    order = np.argsort([len(p.history) + rng.random() for p in pairs], kind="stable")
    batches = [[pairs[i] for i in order[j : j + size]] for j in range(0, len(order), size)]
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def dpo_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    pairs: list[Pair],
    starts: list[int],
    cfg: DpoConfig,
) -> torch.Tensor:
    """The weighted DPO loss of each pair plus the true item's NLL, averaged over users."""
    losses = []
    for p, s in zip(pairs, starts, strict=True):
        margin_w = policy[s] - reference[s]
        rej = slice(s + 1, s + 1 + len(p.rejected))
        margin_l = policy[rej] - reference[rej]
        weights = torch.tensor(p.weights)
        pref = -(F.logsigmoid(cfg.beta * (margin_w - margin_l)) * weights).sum() / weights.sum()
        losses.append(pref - cfg.sft_weight * policy[s])
    return torch.stack(losses).mean()


def train_dpo(
    sft_dir: Path,
    catalog_dir: Path,
    interactions: Path,
    out_dir: Path,
    cfg: DpoConfig,
    progress: bool = True,
) -> ModelManifest:
    """Preference-align the supervised model in ``sft_dir``; the result (or the supervised
    weights, when no epoch beats them on validation) goes to ``out_dir``."""
    from offline.train.trainer import level_masks

    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    catalog = Catalog.load(catalog_dir)
    info = load_model_info(sft_dir, catalog)
    if info.manifest.parameters.get("stage") == "dpo":
        raise InputError(sft_dir, "already preference-aligned: start from a supervised model")
    refit = bool(info.manifest.parameters.get("refit"))
    ids = info.token_ids
    policy = LlamaForCausalLM.from_pretrained(str(sft_dir))
    reference = LlamaForCausalLM.from_pretrained(str(sft_dir)).eval()
    masks = level_masks(ids, policy.get_output_embeddings().weight.shape[0])
    split = leave_one_out(read_interactions(interactions), info.max_history)
    valid: list[Example] = [] if refit else validation_sample(split.valid, cfg.val_users, 0)
    examples = training_examples(catalog, interactions, info.max_history, {e.user for e in valid})
    if cfg.max_users is not None and cfg.max_users < len(examples):
        rng = np.random.default_rng(cfg.seed)
        examples = [examples[i] for i in sorted(rng.choice(len(examples), cfg.max_users, False))]
    if not examples:
        raise InputError(interactions, "no training users with two or more catalog items")
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    use_bf16 = native_bf16()  # as supervised training: bf16 matmuls where the CPU has them
    history: list[dict[str, float]] = []
    best = evaluate_examples(policy, catalog, ids, valid, cfg.val_beam) if valid else {}
    best = {"epoch": 0, **best}
    best_state = None
    if progress and valid:
        tqdm.write(f"supervised: val R@10 {best['recall@10']:.4f} N@10 {best['ndcg@10']:.4f}")
    rng = np.random.default_rng(cfg.seed)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.monotonic()
        pairs = rollout_pairs(policy, catalog, ids, examples, cfg, progress)
        policy.train()
        losses = []
        batches = _length_batches(pairs, cfg.batch_users, rng)
        for batch in tqdm(batches, desc=f"dpo epoch {epoch}", disable=not progress, unit="batch"):
            histories, items, starts = _flatten(batch)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                with torch.no_grad():
                    ref = item_logprobs(reference, ids, masks, histories, items)
                pol = item_logprobs(policy, ids, masks, histories, items)
            loss = dpo_loss(pol, ref, batch, starts, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        metrics = evaluate_examples(policy, catalog, ids, valid, cfg.val_beam) if valid else {}
        row = {
            "epoch": epoch,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "pairs": len(pairs),
            "seconds": round(time.monotonic() - t0, 1),
            **{k: round(v, 5) for k, v in metrics.items()},
        }
        history.append(row)
        if progress:
            tqdm.write(f"dpo epoch {row}")
        # the preference is rank-aware: an epoch is judged by NDCG@10 on validation
        if refit or metrics.get(SELECT_BY, -1.0) > best.get(SELECT_BY, -1.0):
            best = {"epoch": epoch, **metrics}
            best_state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    if best_state is not None:
        policy.load_state_dict(best_state)
    else:
        policy = LlamaForCausalLM.from_pretrained(str(sft_dir))
    return _save(
        policy, sft_dir, out_dir, info.manifest, cfg, best, history, started, len(examples)
    )


def _save(
    model: LlamaForCausalLM,
    sft_dir: Path,
    out_dir: Path,
    sft: ModelManifest,
    cfg: DpoConfig,
    best: dict[str, float],
    history: list[dict[str, float]],
    started: float,
    users: int,
) -> ModelManifest:
    import shutil

    with atomic_directory(Path(out_dir)) as work:
        model.save_pretrained(str(work))
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(sft_dir) / name).is_file():
                shutil.copy(Path(sft_dir) / name, work / name)
        manifest = sft.model_copy(
            update={
                "model_version": sha256_hex((work / "model.safetensors").read_bytes()),
                "metrics": {
                    "validation": best,
                    "history": history,
                    "supervised": sft.metrics.get("validation"),
                },
                "parameters": {
                    **sft.parameters,
                    "stage": "dpo",
                    "supervised_model": sft.model_version,
                    "dpo": cfg.model_dump(),
                    "dpo_users": users,
                    "dpo_seconds": round(time.monotonic() - started, 1),
                    "dpo_kept_epoch": best.get("epoch", 0),
                    "peak_rss_gb": round(peak_rss_gb(), 2),
                },
            }
        )
        manifest.write(work)
    return manifest
