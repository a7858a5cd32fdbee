"""The users an evaluation scores: a seeded sample of one leave-one-out split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from offline.data import Example, Split, leave_one_out, read_interactions


def select_examples(
    interactions: Path, split: str, max_history: int, limit: int | None, seed: int = 0
) -> tuple[list[Example], Split]:
    data = leave_one_out(read_interactions(interactions), max_history)
    examples = {"test": data.test, "valid": data.valid}[split]
    if limit is not None and limit < len(examples):
        rng = np.random.default_rng(seed)
        examples = [examples[i] for i in sorted(rng.choice(len(examples), limit, replace=False))]
    return examples, data
