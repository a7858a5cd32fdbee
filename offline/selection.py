"""Which epochs of a training run are scored on validation: shared by the decoder's trainer
(``offline/train``) and the item-level model's (``offline/items``)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

# both trainers' ``val_tail`` setting
VAL_TAIL: Any = Field(
    default=1 / 3,
    gt=0,
    le=1,
    description="validate only this last share of the epochs (and the run's final one): "
    "the best epoch is chosen among them (the decoder's default, --tail-average: their mean "
    "weights are kept)",
)


def in_validated_tail(epoch: int, epochs: int, tail: float) -> bool:
    """Whether ``epoch`` (1-based) of an ``epochs``-epoch run lies in its last ``tail`` share
    (at least the final epoch): the epochs the run scores and chooses its best among. The best
    epoch of every Beauty run so far lay there, and a validation pass costs 40% of a decoder
    epoch (20% of an item model's), so scoring the early epochs only spent minutes."""
    return epoch > epochs - max(1, round(epochs * tail))
