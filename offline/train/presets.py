"""Model sizes. ``small`` is the default: trains on Beauty in well under an hour on 2 CPU cores."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import LlamaConfig


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    dropout: float = 0.1
    max_positions: int = 512

    def config(self, vocab_size: int, bos: int, eos: int, pad: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.max_positions,
            attention_dropout=self.dropout,
            tie_word_embeddings=True,
            initializer_range=0.02,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
            rope_theta=10000.0,
        )

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(hidden=64, layers=2, heads=2, intermediate=128),
    "small": Preset(hidden=192, layers=4, heads=4, intermediate=512),
    "base": Preset(hidden=256, layers=6, heads=4, intermediate=768),
}


def padded_vocab(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple
