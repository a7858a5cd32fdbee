"""vLLM in-process: AsyncLLM for the service, the offline ``LLM`` for batch jobs.

Both are built with ``logprobs_mode="processed_logprobs"`` so returned log-probs are
renormalised over ``allowed_token_ids`` (the constraint), prefix caching on, token-id prompts
only (``skip_tokenizer_init``). vLLM is imported lazily: a remote-mode replica never loads it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from service.engine.base import EngineError, ScoreRequest, TokenLogprobs, logprobs_to_ask, pick


class VllmOptions(BaseModel):
    """Engine construction knobs; defaults suit both this CPU box and a GPU."""

    dtype: str = "auto"
    max_model_len: int = Field(default=512, ge=16)
    max_logprobs: int = Field(default=256, ge=1)
    block_size: int | None = Field(default=None, description="None: 32 on CPU, vLLM default on GPU")
    kv_cache_bytes: int | None = Field(
        default=None, description="KV cache size; None: 256 MiB on CPU, fraction of GPU memory"
    )
    gpu_memory_utilization: float = Field(default=0.5, gt=0, le=1)
    enforce_eager: bool = False
    seed: int = 0
    multiprocessing: bool | None = Field(
        default=None,
        description="Offline LLM only: False runs the engine core in-process (starts in "
        "seconds), True in its own process; None: VLLM_ENABLE_V1_MULTIPROCESSING when set, "
        "else in-process on CPU (no IPC: ~1.5x the users/s of the think-ahead job on 2 cores) "
        "and vLLM's default on GPU (its own process overlaps scheduling with the GPU).",
    )


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_kwargs(model_dir: Path | str, options: VllmOptions) -> dict[str, Any]:
    cpu = on_cpu()
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "skip_tokenizer_init": True,
        "dtype": ("float32" if cpu else "auto") if options.dtype == "auto" else options.dtype,
        "enable_prefix_caching": True,
        "logprobs_mode": "processed_logprobs",
        "max_model_len": options.max_model_len,
        "max_logprobs": options.max_logprobs,
        "seed": options.seed,
        "enforce_eager": options.enforce_eager,
    }
    block_size = options.block_size or (32 if cpu else None)
    if block_size:
        kwargs["block_size"] = block_size
    if cpu:
        kwargs["kv_cache_memory_bytes"] = options.kv_cache_bytes or (256 << 20)
    elif options.kv_cache_bytes:
        kwargs["kv_cache_memory_bytes"] = options.kv_cache_bytes
    else:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    return kwargs


def sampling_params(request: ScoreRequest):  # type: ignore[no-untyped-def]
    from vllm import SamplingParams

    # Greedy: no sampler RNG per request; processed log-probs are the masked log-softmax.
    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        allowed_token_ids=list(request.allowed),
        logprobs=logprobs_to_ask(request),
    )


def tokens_prompt(token_ids: Sequence[int]):  # type: ignore[no-untyped-def]
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(token_ids))


def read_logprobs(output: Any, request: ScoreRequest) -> TokenLogprobs:
    completion = output.outputs[0]
    if not completion.logprobs:
        raise EngineError("engine returned no log-probs")
    return pick({t: lp.logprob for t, lp in completion.logprobs[0].items()}, request)


class VllmAsyncEngine:
    """AsyncLLM in the service's event loop; the engine core runs in its own process."""

    def __init__(self, model_dir: Path | str, options: VllmOptions, model_version: str) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_version = model_version
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(model_dir, options)))
        self._ids = itertools.count()
        self._closed = False

    async def _one(self, request: ScoreRequest) -> TokenLogprobs:
        last = None
        prompt = tokens_prompt(request.prompt)
        async for out in self._llm.generate(
            prompt, sampling_params(request), f"s{next(self._ids)}"
        ):
            last = out
        if last is None:
            raise EngineError("engine returned nothing")
        return read_logprobs(last, request)

    async def score(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]:
        if self._closed:
            raise EngineError("engine is closed")
        try:
            return list(await asyncio.gather(*(self._one(r) for r in requests)))
        except EngineError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # vLLM raises EngineDeadError, RuntimeError, ValueError...
            raise EngineError(f"vLLM failed: {type(exc).__name__}: {exc}") from exc

    async def check_health(self) -> bool:
        if self._closed or self._llm.errored:
            return False
        try:
            await self._llm.check_health()
        except Exception:
            return False
        return True

    def is_dead(self) -> bool:
        return bool(self._llm.errored) and not self._closed

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._llm.shutdown()


_MP_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


class VllmBatchEngine:
    """vLLM's offline ``LLM``: one ``generate`` call per batch, batched across users."""

    def __init__(self, model_dir: Path | str, options: VllmOptions) -> None:
        from vllm import LLM

        # vLLM reads this when the engine is built. In-process engines share process-global
        # distributed state: a process should hold at most one (tests: the session fixture).
        previous = os.environ.get(_MP_ENV)
        multiprocessing = options.multiprocessing
        if multiprocessing is None and previous is None and on_cpu():
            multiprocessing = False
        if multiprocessing is not None:
            os.environ[_MP_ENV] = "1" if multiprocessing else "0"
        try:
            self._llm = LLM(**engine_kwargs(model_dir, options))
        finally:
            if previous is None:
                os.environ.pop(_MP_ENV, None)
            else:
                os.environ[_MP_ENV] = previous

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]:
        if not requests:
            return []
        prompts = [tokens_prompt(r.prompt) for r in requests]
        params = [sampling_params(r) for r in requests]
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        return [read_logprobs(o, r) for o, r in zip(outputs, requests, strict=True)]

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        stop_token_ids: Sequence[int],
        seed: int,
    ) -> list[list[list[int]]]:
        from vllm import SamplingParams

        if not prompts:
            return []
        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                max_tokens=max_tokens,
                stop_token_ids=list(stop_token_ids),
                seed=seed + i,
            )
            for i in range(len(prompts))
        ]
        outputs = self._llm.generate([tokens_prompt(p) for p in prompts], params, use_tqdm=False)
        return [[list(c.token_ids) for c in o.outputs] for o in outputs]

    def close(self) -> None:
        engine = getattr(self._llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) if engine is not None else None
        if callable(shutdown):
            shutdown()
