"""The batch engines offline jobs use: vLLM's, or plain PyTorch asked the same requests."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from offline.errors import InputError
from service.contracts.model import ModelInfo
from service.engine.base import BatchEngine

EngineName = Literal["vllm", "torch"]
ENGINES = ("vllm", "torch")


def batch_engine(engine: str, model_dir: Path, info: ModelInfo) -> BatchEngine:
    """vLLM's offline engine, or the plain-PyTorch one (same requests, same answers to ~1e-5:
    the whole test split in minutes on a CPU)."""
    if engine not in ENGINES:
        raise InputError(None, f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "torch":
        from offline.decode.torch_engine import TorchBatchEngine

        return TorchBatchEngine(model_dir, info.token_ids)
    from service.engine.vllm_engine import VllmBatchEngine, VllmOptions

    return VllmBatchEngine(model_dir, VllmOptions())
