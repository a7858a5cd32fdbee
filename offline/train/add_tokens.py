"""``thinkahead model add-item-tokens``: itemic alignment's first step for an existing LLM.

Adds ``<|sid_begin|>``, ``<|sid_end|>`` and the 3 x K item tokens to the tokenizer and grows the
embeddings. New rows start at the mean of the existing embeddings plus small noise scaled to
their spread (the usual recipe: the new tokens start "average" instead of at random norms that
dominate the softmax), so the model's text behaviour is unchanged at step zero and fine-tuning
on item sequences can start from a sane point. A manifest ties the result to the catalog.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from offline.errors import InputError
from offline.fsutil import atomic_directory
from service.contracts.catalog import Catalog
from service.contracts.manifest import ModelManifest, sha256_hex
from service.contracts.tokens import SID_BEGIN, SID_END, all_item_tokens


def _init_rows(matrix: torch.Tensor, start: int, generator: torch.Generator) -> None:
    old = matrix[:start].float()
    mean, std = old.mean(0), old.std(0)
    noise = torch.randn((matrix.shape[0] - start, matrix.shape[1]), generator=generator)
    matrix[start:] = (mean + 0.1 * std * noise).to(matrix.dtype)


def add_item_tokens(base_model: Path, catalog_dir: Path, out: Path, seed: int = 0) -> ModelManifest:
    base_model, out = Path(base_model), Path(out)
    if not (base_model / "config.json").is_file():
        raise InputError(base_model, "not a Hugging Face model directory (no config.json)")
    catalog = Catalog.load(catalog_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    model = AutoModelForCausalLM.from_pretrained(str(base_model), torch_dtype="auto")
    new_tokens = [SID_BEGIN, SID_END, *all_item_tokens(catalog.codebook_size)]
    before = len(tokenizer)
    added = tokenizer.add_tokens(new_tokens, special_tokens=True)
    old_rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        start = min(before, old_rows)
        _init_rows(model.get_input_embeddings().weight, start, generator)
        out_emb = model.get_output_embeddings()
        if out_emb is not None and out_emb.weight is not model.get_input_embeddings().weight:
            _init_rows(out_emb.weight, start, generator)
    with atomic_directory(out) as work:
        model.save_pretrained(str(work))
        tokenizer.save_pretrained(str(work))
        weights = sorted(work.glob("*.safetensors"))
        manifest = ModelManifest(
            model_version=sha256_hex(*(w.read_bytes() for w in weights)),
            catalog_version=catalog.version,
            codebook_size=catalog.codebook_size,
            preset=f"aligned:{base_model.name}",
            parameters={
                "base_model": str(base_model),
                "added_tokens": added,
                "vocab_before": before,
                "vocab_after": len(tokenizer),
                "seed": seed,
            },
        )
        manifest.write(work)
    return manifest
