"""Per-epoch training checkpoints, so a killed ``thinkahead train`` continues where it stopped.

The checkpoint sits beside the output directory (``.<out>.ckpt.pt``), is replaced atomically
after every epoch and removed when the model directory is written. A run resumes only a
checkpoint of the same inputs and settings (``run_identity``); anything else starts afresh.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from service.contracts.manifest import sha256_hex

log = logging.getLogger(__name__)
CHECKPOINT_SCHEMA = 1


class _Identified(Protocol):
    def model_dump_json(self, *, exclude: set[str]) -> str: ...


@dataclass
class RunState:
    """Everything the epoch loop carries from one epoch to the next."""

    epoch: int = 0
    step: int = 0
    stale: int = 0
    finished: bool = False
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    best_model: dict[str, torch.Tensor] | None = None
    # the AveragedModel of the validated epochs so far (``tail_average``), its state_dict
    average: dict[str, torch.Tensor] | None = None
    # filled on load
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    numpy_rng: dict[str, Any] = field(default_factory=dict)
    torch_rng: torch.Tensor | None = None


# what the epoch loop carries, and what only a loaded checkpoint fills in
_CARRIED = (
    "epoch",
    "step",
    "stale",
    "finished",
    "elapsed_s",
    "history",
    "best",
    "best_model",
    "average",
)
_LOADED = ("model", "optimizer", "numpy_rng", "torch_rng")


def checkpoint_path(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.ckpt.pt"


_ADDED_OFF: dict[str, object] = {
    "reasoning": False,
    "alignment": False,
    "rationale_rate": 0.5,
    "tail_average": False,
    "distill_levels": 2,
}


def run_identity(cfg: _Identified, data: Any) -> str:
    """Inputs and settings that must match for a checkpoint to be resumed (not ``resume``
    itself, nor the time limit, nor the thread count)."""
    exclude = {"resume", "max_minutes", "threads", "low_memory"}
    # settings added since runs were checkpointed: left at their off values they change
    # nothing, so a run killed before they existed still resumes
    exclude |= {name for name, off in _ADDED_OFF.items() if getattr(cfg, name, off) == off}
    settings = cfg.model_dump_json(exclude=exclude)
    return sha256_hex(settings.encode(), data.data_hash.encode(), data.catalog.version.encode())


class Checkpoint:
    def __init__(self, path: Path, identity: str) -> None:
        self.path = path
        self.identity = identity

    def save(
        self,
        state: RunState,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        rng: np.random.Generator,
    ) -> None:
        body = {
            "schema": CHECKPOINT_SCHEMA,
            "identity": self.identity,
            **{name: getattr(state, name) for name in _CARRIED},
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(body, tmp)
        os.replace(tmp, self.path)

    def load(self) -> RunState | None:
        if not self.path.is_file():
            return None
        try:
            body = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a torn or foreign file: start afresh, say so
            log.warning("ignoring unreadable checkpoint %s: %s", self.path, exc)
            return None
        if body.get("schema") != CHECKPOINT_SCHEMA or body.get("identity") != self.identity:
            log.warning("ignoring checkpoint %s: other inputs or settings", self.path)
            return None
        # a checkpoint from before a carried field existed leaves it at its default
        return RunState(**{name: body[name] for name in (*_CARRIED, *_LOADED) if name in body})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def rss_gb() -> float:
    """Resident memory of this process now (0 where /proc is not there)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
