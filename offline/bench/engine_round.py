"""``thinkahead engine-profile``: what ONE engine round costs, and which knobs change it.

A round is what the service hands the engine for one recommend: a list of ``ScoreRequest``s
answered together. Four request sets are built from real users of the data set (one distinct
user per repetition, so the prefix cache never holds the history from an earlier repetition):

- ``minimal``: 1 request with a 2-token prompt (the round's fixed cost, no model work to speak
  of);
- ``c-step``: 1 request, the last-token step of an unchanged history (``<hist> a b`` -> c);
- ``think-ahead +1 event``: the whole think-ahead round of a user with one new event
  (``plan_think_ahead`` on the snapshot computed without it, co-visitation of the fresh items,
  the served weights and pruning): ~150-token prompts, tens of requests sharing the history;
- ``full-decode step``: the last step of a 20-beam full decode (20 requests ``<hist> a b``).

Each variant (engine path x environment x engine option) runs in a FRESH subprocess, so
``LD_PRELOAD`` and the OpenMP settings are in place before anything loads. Engine paths:
``async`` (the service's ``VllmAsyncEngine``: AsyncLLM, engine core in its own process),
``llm`` (the offline ``LLM``, engine core in-process or not), ``thread`` (a prototype: the
in-process ``LLMEngine`` stepped by one thread behind an asyncio future, vLLM 0.32's AsyncLLM
itself cannot run its core in-process) and ``torch`` (``TorchBatchEngine``: the floor).
A ``profile`` variant runs the in-process engine under cProfile to split a round's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import itertools
import json
import os
import platform
import pstats
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.engine.base import ScoreRequest, TokenLogprobs

SETS = ("minimal", "c-step", "think-ahead +1 event", "full-decode step")
IOMP = str(Path(sys.prefix) / "lib" / "libiomp5.so")
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
MP_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


@dataclass(frozen=True)
class Variant:
    name: str
    engine: str  # async | llm | thread | torch
    env: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # VllmOptions fields
    extra: dict[str, Any] = field(default_factory=dict)  # engine kwargs VllmOptions lacks
    profile: bool = False
    submit: str = ""  # async only: "interleave": the ways of submitting a round, in turn


def _preload(*libs: str) -> dict[str, str]:
    return {"LD_PRELOAD": ":".join(libs)}


def variants() -> list[Variant]:
    """Every variant the profile knows, the service's configuration first."""
    inproc = {MP_ENV: "0"}
    return [
        Variant("async (service)", "async"),
        Variant("async +tcmalloc", "async", _preload(TCMALLOC)),
        Variant("async +iomp", "async", _preload(IOMP)),
        Variant("async +tcmalloc +iomp", "async", _preload(TCMALLOC, IOMP)),
        Variant("async +jemalloc", "async", _preload(JEMALLOC)),
        Variant("async bind nobind", "async", {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}),
        Variant(
            "async bind nobind, OMP 1",
            "async",
            {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"},
        ),
        Variant(
            "async bind 0-1 (OMP 2)",
            "async",
            {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
        ),
        Variant("async block 16", "async", options={"block_size": 16}),
        Variant("async block 64", "async", options={"block_size": 64}),
        Variant("async block 128", "async", options={"block_size": 128}),
        Variant("async no chunked prefill", "async", extra={"enable_chunked_prefill": False}),
        Variant("async enforce_eager", "async", options={"enforce_eager": True}),
        Variant(
            "async (service), engine-core step timing",
            "async",
            extra={"enable_logging_iteration_details": True},
        ),
        Variant(
            "async submit A/B",
            "async",
            extra={"enable_logging_iteration_details": True},
            submit="interleave",
        ),
        Variant("llm own process", "llm", {MP_ENV: "1"}),
        Variant("llm in-process", "llm", inproc),
        Variant("llm in-process +tcmalloc", "llm", {**inproc, **_preload(TCMALLOC)}),
        Variant("llm in-process OMP 1", "llm", {**inproc, "OMP_NUM_THREADS": "1"}),
        Variant("thread in-process (prototype)", "thread", inproc),
        Variant("llm in-process, cProfile", "llm", inproc, profile=True),
        Variant("torch floor", "torch"),
        Variant("torch floor OMP 1", "torch", {"OMP_NUM_THREADS": "1"}),
    ]


# ------------------------------------------------------------------------- request sets


@dataclass(frozen=True)
class Round:
    requests: list[ScoreRequest]
    # sent untimed just before: what the service computed for this user a moment earlier
    prime: list[ScoreRequest] = field(default_factory=list)


def _request_json(r: ScoreRequest) -> dict[str, Any]:
    return {"prompt": r.prompt, "allowed": r.allowed, "want": r.want, "top_n": r.top_n}


def _request_from(d: dict[str, Any]) -> ScoreRequest:
    want = d["want"]
    return ScoreRequest(
        tuple(d["prompt"]), tuple(d["allowed"]), tuple(want) if want else None, d["top_n"]
    )


def build_sets(
    model_dir: Path,
    catalog_dir: Path,
    interactions: Path,
    rounds: int,
    prefixes: int = 32,
    k: int = 10,
    beam: int = 20,
    min_items: int = 28,
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> dict[str, list[Round]]:
    """``rounds`` rounds per set, one test user each and different users in different sets
    (no set finds another's history in the prefix cache), users with at least ``min_items``
    history items (prompts of ~150 tokens and up). Beam searches run on the plain-PyTorch
    engine (the same answers as vLLM, tested), so no engine starts here."""
    from offline.decode.torch_engine import TorchBatchEngine
    from offline.eval_cli import load_covisit
    from offline.evaluate import select_examples
    from offline.thinkahead.prefixes import compute_prefixes
    from service.contracts.beam import BeamSearch
    from service.contracts.catalog import Catalog
    from service.contracts.constraint import Constraint
    from service.contracts.covisit import covisit_scores
    from service.contracts.fusion import ItemFeatures, covisit_prefixes
    from service.contracts.model import load_model_info, load_serving_config
    from service.contracts.scoring import plan_think_ahead

    catalog = Catalog.load(catalog_dir)
    info = load_model_info(model_dir, catalog)
    ids = info.token_ids
    serving = load_serving_config(model_dir)
    covisit = load_covisit(catalog_dir, catalog)
    examples, _ = select_examples(interactions, "test", info.max_history, None)
    long = [e for e in examples if len(e.history) >= min_items and catalog.code_of(e.target)]
    if len(long) < 3 * rounds:
        raise ValueError(f"{len(long)} users with >= {min_items} items, {3 * rounds} needed")
    order = np.random.default_rng(seed).permutation(len(long))
    groups = [[long[i] for i in order[g * rounds : (g + 1) * rounds]] for g in range(3)]
    progress(f"request sets: 3 x {rounds} users with >= {min_items} history items")
    floor = TorchBatchEngine(model_dir, ids)

    def history_of(items: Sequence[str]) -> list[Any]:
        return catalog.codes_of(items)[0][-info.max_history :]

    sets: dict[str, list[Round]] = {name: [] for name in SETS}
    # c-step: an unchanged history, the snapshot's best prefix holding more than one c
    stale = [history_of(e.history) for e in groups[0]]
    for history, snap in zip(
        stale, compute_prefixes(floor, ids, catalog, stale, prefixes, prefixes), strict=True
    ):
        prompt, constraint = ids.history(history), Constraint(catalog, history)
        sets["minimal"].append(
            Round(
                [
                    ScoreRequest(
                        (prompt[0], ids.sid_begin),
                        tuple(ids.level_ids("a", constraint.a_values())),
                        top_n=k,
                    )
                ]
            )
        )
        for p in snap.prefixes:
            cs = constraint.c_values(p.a, p.b)
            if len(cs) > 1:
                request = ScoreRequest(
                    (*prompt, int(ids.a[p.a]), int(ids.b[p.b])),
                    tuple(ids.level_ids("c", cs)),
                    top_n=max(k, 32),
                )
                sets["c-step"].append(Round([request]))
                break
    # think-ahead: the worker's snapshot from the history before the new event (the target)
    stale = [history_of(e.history) for e in groups[1]]
    for e, snap in zip(
        groups[1],
        compute_prefixes(floor, ids, catalog, stale, prefixes, prefixes),
        strict=True,
    ):
        items = [*e.history, e.target]
        fresh = history_of(items)
        scores = covisit_scores(items, covisit, set(items))
        plan = plan_think_ahead(
            ids.history(fresh),
            snap.prefixes,
            covisit_prefixes(catalog, scores, serving.covisit_candidates),
            Constraint(catalog, fresh),
            ids,
            k,
            serving.weights,
            ItemFeatures(catalog, scores),
            unchanged=False,
        )
        sets["think-ahead +1 event"].append(Round(plan.requests))
    # full decode: the last step (beams -> c) of a 20-beam search; its first step, untimed,
    # puts the history in the cache as the search's own first step would
    for e in groups[2]:
        fresh = history_of(e.history)
        search = BeamSearch(ids.history(fresh), ids, Constraint(catalog, fresh), max(beam, k))
        steps: list[list[ScoreRequest]] = []
        while not search.done:
            steps.append(search.requests())
            search.advance(floor.score_batch(steps[-1]))
        sets["full-decode step"].append(Round(steps[-1], steps[0]))
    return sets


def save_sets(sets: dict[str, list[Round]], path: Path) -> None:
    path.write_text(
        json.dumps(
            {
                n: [
                    {
                        "requests": [_request_json(r) for r in rnd.requests],
                        "prime": [_request_json(r) for r in rnd.prime],
                    }
                    for rnd in rs
                ]
                for n, rs in sets.items()
            }
        )
    )


def load_sets(path: Path) -> dict[str, list[Round]]:
    raw = json.loads(path.read_text())
    return {
        n: [
            Round(
                [_request_from(r) for r in rnd["requests"]],
                [_request_from(r) for r in rnd["prime"]],
            )
            for rnd in rs
        ]
        for n, rs in raw.items()
    }


# ------------------------------------------------------------------------- engines


class ThreadEngine:
    """Prototype: the in-process ``LLMEngine`` stepped by one thread; ``score`` awaits a future.
    Rounds arriving while others run join the next step (continuous batching)."""

    def __init__(self, model_dir: Path, options: Any) -> None:
        from service.engine.vllm_engine import VllmBatchEngine

        self._batch = VllmBatchEngine(model_dir, options)
        self._engine = self._batch._llm.llm_engine
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, daemon=True, name="engine")
        self._thread.start()

    async def score(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[TokenLogprobs]] = loop.create_future()
        self._inbox.put((list(requests), future, loop))
        return await future

    def _run(self) -> None:
        from service.engine.vllm_engine import read_logprobs, sampling_params, tokens_prompt

        pending: dict[str, tuple[list[Any], int]] = {}
        while True:
            item = self._inbox.get() if not pending else self._poll()
            while item is not None:
                if item == "stop":
                    return
                requests, future, loop = item
                job = [requests, [None] * len(requests), len(requests), future, loop]
                for i, r in enumerate(requests):
                    rid = f"t{next(self._ids)}"
                    self._engine.add_request(rid, tokens_prompt(r.prompt), sampling_params(r))
                    pending[rid] = (job, i)
                item = self._poll()
            for out in self._engine.step():
                if not out.finished:
                    continue
                job, i = pending.pop(out.request_id)
                job[1][i] = read_logprobs(out, job[0][i])
                job[2] -= 1
                if job[2] == 0:
                    job[4].call_soon_threadsafe(job[3].set_result, job[1])

    def _poll(self) -> Any:
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        self._inbox.put("stop")
        self._thread.join(timeout=30)
        self._batch.close()


STEP_LOG: list[tuple[float, int]] = []  # (engine-core step ms, prompt tokens computed)


def _capture_step_times() -> None:
    """Keep the engine core's per-step timing (``enable_logging_iteration_details``): the time
    from handing the step to the worker until its output is back, with the scheduled tokens.
    The round's wall time minus these is scheduling, IPC and the frontend."""
    from vllm.v1.metrics import loggers

    original = loggers.StatLoggerManager.record

    def record(self: Any, scheduler_stats: Any, *args: Any, **kwargs: Any) -> Any:
        details = getattr(scheduler_stats, "iteration_details", None)
        if details is not None and not details.is_dummy:
            STEP_LOG.append((details.elapsed_ms, details.num_ctx_tokens))
        return original(self, scheduler_stats, *args, **kwargs)

    loggers.StatLoggerManager.record = record  # type: ignore[method-assign]


def submit_scorers(engine: Any) -> dict[str, Callable[[list[ScoreRequest]], Awaitable[Any]]]:
    """Ways of handing one round to the same AsyncLLM, interleaved round by round in one
    process so that load on the machine hits them alike:
    ``service``: ``VllmAsyncEngine.score`` (raw ``TokensPrompt``s, each processed on vLLM's
    renderer thread pool); ``rendered``: ``tokens_input`` prompts, processed in the event
    loop; ``batched`` (a prototype): every request processed first, then all sent back to
    back, so the engine core finds more of the round queued when it starts a step."""
    from vllm.inputs import tokens_input

    from service.engine.vllm_engine import EngineError, read_logprobs, sampling_params

    llm = engine._llm

    async def rendered_one(request: ScoreRequest) -> TokenLogprobs:
        last = None
        async for out in llm.generate(
            tokens_input(list(request.prompt)), sampling_params(request), f"r{next(engine._ids)}"
        ):
            last = out
        if last is None:
            raise EngineError("engine returned nothing")
        return read_logprobs(last, request)

    async def rendered(requests: list[ScoreRequest]) -> list[TokenLogprobs]:
        return list(await asyncio.gather(*(rendered_one(r) for r in requests)))

    async def batched(requests: list[ScoreRequest]) -> list[TokenLogprobs]:
        tasks = await llm.get_supported_tasks()
        core = [
            llm.input_processor.process_inputs(
                f"b{next(engine._ids)}",
                tokens_input(list(r.prompt)),
                sampling_params(r),
                supported_tasks=tasks,
            )
            for r in requests
        ]
        queues = [await llm.add_request(c.request_id, c, c.sampling_params) for c in core]
        results = []
        for q, r in zip(queues, requests, strict=True):
            while True:
                out = q.get_nowait() or await q.get()
                if out.finished:
                    break
            results.append(read_logprobs(out, r))
        return results

    return {"service": engine.score, "rendered": rendered, "batched": batched}


def _patch_engine_kwargs(extra: dict[str, Any]) -> None:
    """Engine kwargs VllmOptions has no field for (this throwaway process only)."""
    if not extra:
        return
    import service.engine.vllm_engine as ve

    original = ve.engine_kwargs

    def patched(model_dir: Path | str, options: Any) -> dict[str, Any]:
        return {**original(model_dir, options), **extra}

    ve.engine_kwargs = patched  # type: ignore[assignment]


def _summary(ms: list[float], sizes: list[int]) -> dict[str, Any]:
    a = np.array(ms)
    return {
        "rounds": len(ms),
        "requests_mean": round(float(np.mean(sizes)), 1),
        "p50": round(float(np.percentile(a, 50)), 2),
        "p90": round(float(np.percentile(a, 90)), 2),
        "min": round(float(a.min()), 2),
        "mean": round(float(a.mean()), 2),
    }


def _fit(points: list[tuple[int, float]]) -> dict[str, float] | None:
    """ms = fixed + per_request * n over every measured round (least squares)."""
    if len({n for n, _ in points}) < 2:
        return None
    n = np.array([p[0] for p in points], dtype=float)
    ms = np.array([p[1] for p in points])
    slope, intercept = np.polyfit(n, ms, 1)
    return {"fixed_ms": round(float(intercept), 2), "per_request_ms": round(float(slope), 3)}


PROFILE_PARTS = (  # (label, function name, file path fragment): cumulative seconds
    ("engine step (all)", "step", "v1/engine/core.py"),
    ("scheduler.schedule", "schedule", "core/sched/scheduler.py"),
    ("execute_model (runner)", "execute_model", "v1/worker/"),
    ("prepare inputs", "_prepare_inputs", "v1/worker/"),
    ("model forward", "forward", "model_executor/models/llama.py"),
    ("sample (+ logprobs)", "sample_tokens", "v1/worker/"),
    ("sampler", "forward", "v1/sample/sampler.py"),
    ("scheduler.update_from_output", "update_from_output", "core/sched/scheduler.py"),
    ("output processor", "process_outputs", "v1/engine/output_processor.py"),
    ("input processor (add_request)", "add_request", "v1/engine/llm_engine.py"),
    ("kv cache allocate", "allocate_slots", "core/kv_cache_manager.py"),
)


def _profile_split(prof: cProfile.Profile, rounds: int) -> dict[str, Any]:
    stats = pstats.Stats(prof)
    raw = stats.stats  # type: ignore[attr-defined]
    parts: dict[str, Any] = {}
    for label, name, fragment in PROFILE_PARTS:
        hits = [(v[1], v[3]) for (f, _, fn), v in raw.items() if fn == name and fragment in f]
        if hits:
            calls = sum(h[0] for h in hits)
            cum = max(h[1] for h in hits)  # the outermost of same-named frames
            parts[label] = {"ms_per_round": round(cum * 1e3 / rounds, 2), "calls": calls}
    top = sorted(raw.items(), key=lambda kv: -kv[1][2])[:20]
    parts["top_self_time"] = [
        {"function": f"{Path(f).name}:{fn}", "ms_per_round": round(v[2] * 1e3 / rounds, 3)}
        for (f, _, fn), v in top
    ]
    return parts


async def _time_sets(
    sets: dict[str, list[Round]],
    scorers: dict[str, Callable[[list[ScoreRequest]], Awaitable[Any]]],
    warmup: int,
    result: dict[str, Any],
    profile: Sequence[str] = (),
    reset: Callable[[], Awaitable[Any]] | None = None,
) -> None:
    """Warm up on the first ``warmup`` rounds of each set, then time the rest one at a time
    (or, for the sets in ``profile``, run them under cProfile instead). With several
    ``scorers`` every round runs once per scorer, in rotating order, each time after
    ``reset`` (emptying the prefix cache, so each starts as cold as a new user); each scorer
    gets its own rows under ``modes``."""
    modes = list(scorers)
    ms: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    sizes: dict[str, dict[str, list[int]]] = {m: {} for m in modes}
    steps: dict[str, dict[str, list[list[tuple[float, int]]]]] = {m: {} for m in modes}
    for name, rounds in sets.items():
        for j, rnd in enumerate(rounds[:warmup]):
            score = scorers[modes[j % len(modes)]]
            await score(rnd.prime or rnd.requests)
            await score(rnd.requests)
        prof = cProfile.Profile() if name in profile else None
        runs = [
            (rnd, modes[(j + k) % len(modes)])
            for j, rnd in enumerate(rounds[warmup:])
            for k in range(len(modes))
        ]
        for rnd, mode in runs:
            score = scorers[mode]
            if reset is not None:
                await reset()
            if rnd.prime:
                await score(rnd.prime)
            if prof is not None:
                prof.enable()
            logged = len(STEP_LOG)
            t0 = time.perf_counter()
            await score(rnd.requests)
            elapsed = (time.perf_counter() - t0) * 1e3
            if prof is not None:
                prof.disable()
            ms[mode].setdefault(name, []).append(elapsed)
            sizes[mode].setdefault(name, []).append(len(rnd.requests))
            steps[mode].setdefault(name, []).append(STEP_LOG[logged:])
        if prof is not None:
            times = ms[modes[0]][name]
            result.setdefault("profile", {})[name] = {
                "rounds": len(times),
                "ms_p50_under_profiler": round(float(np.median(times)), 2),
                "parts": _profile_split(prof, len(times)),
            }
            print(f"  {name}: profiled", flush=True)
    for mode in modes:
        target = result if len(modes) == 1 else result.setdefault("modes", {}).setdefault(mode, {})
        target.setdefault("sets", {})
        points: list[tuple[int, float]] = []
        for name in ms[mode]:
            if name in profile:
                continue
            times, n = ms[mode][name], sizes[mode][name]
            points += list(zip(n, times, strict=True))
            row = target["sets"][name] = _summary(times, n)
            st = steps[mode][name]
            if any(st):
                step_ms = [sum(t for t, _ in x) for x in st]
                row["engine_step"] = {
                    "ms_p50": round(float(np.median(step_ms)), 2),
                    "outside_step_ms_p50": round(
                        float(np.median([m - t for m, t in zip(times, step_ms, strict=True)])), 2
                    ),
                    "steps_per_round": round(float(np.mean([len(x) for x in st])), 2),
                    "prompt_tokens_computed_mean": round(
                        float(np.mean([sum(k for _, k in x) for x in st])), 1
                    ),
                }
            if mode != modes[0]:  # paired: the same rounds, so per-round ratios
                first = ms[modes[0]][name]
                ratios = [t / f for t, f in zip(times, first, strict=True)]
                row[f"paired_ratio_to_{modes[0]}"] = {
                    "median": round(float(np.median(ratios)), 3),
                    "p25": round(float(np.percentile(ratios, 25)), 3),
                    "p75": round(float(np.percentile(ratios, 75)), 3),
                }
            label = name if len(modes) == 1 else f"{mode}, {name}"
            print(f"  {label}: p50 {row['p50']} ms", flush=True)
        target["fit"] = _fit(points)


def _sync(
    fn: Callable[[list[ScoreRequest]], Any],
) -> Callable[[list[ScoreRequest]], Awaitable[Any]]:
    async def call(requests: list[ScoreRequest]) -> Any:
        return fn(requests)

    return call


PROFILED_SETS = ("minimal", "think-ahead +1 event")


def run_variant(
    variant: Variant, sets_path: Path, model_dir: Path, catalog_dir: Path, warmup: int
) -> dict[str, Any]:
    """Runs in the variant's own process: start the engine, time every set's rounds."""
    sets = load_sets(sets_path)
    if variant.profile:
        sets = {n: sets[n] for n in PROFILED_SETS}
    result: dict[str, Any] = {"variant": asdict(variant), "sets": {}}
    profile = PROFILED_SETS if variant.profile else ()
    t0 = time.perf_counter()
    if variant.engine == "torch":
        import torch

        from offline.decode.torch_engine import TorchBatchEngine
        from service.contracts.catalog import Catalog
        from service.contracts.model import load_model_info

        info = load_model_info(model_dir, Catalog.load(catalog_dir))
        floor = TorchBatchEngine(model_dir, info.token_ids)
        result["startup_s"] = round(time.perf_counter() - t0, 1)
        result["torch_threads"] = torch.get_num_threads()
        asyncio.run(_time_sets(sets, {"": _sync(floor.score_batch)}, warmup, result, profile))
        return result

    from service.engine.vllm_engine import VllmAsyncEngine, VllmBatchEngine, VllmOptions

    _patch_engine_kwargs(variant.extra)
    if variant.extra.get("enable_logging_iteration_details"):
        _capture_step_times()
    options = VllmOptions(**variant.options)
    if variant.engine == "llm":
        engine = VllmBatchEngine(model_dir, options)
        result["startup_s"] = round(time.perf_counter() - t0, 1)
        asyncio.run(_time_sets(sets, {"": _sync(engine.score_batch)}, warmup, result, profile))
        engine.close()
        return result
    if variant.engine not in ("async", "thread"):
        raise ValueError(f"unknown engine {variant.engine!r}")

    async def main() -> None:
        # built inside the loop, as the service builds it
        served: Any = (
            ThreadEngine(model_dir, options)
            if variant.engine == "thread"
            else VllmAsyncEngine(model_dir, options, "bench")
        )
        result["startup_s"] = round(time.perf_counter() - t0, 1)
        scorers = submit_scorers(served) if variant.submit == "interleave" else {"": served.score}
        reset = served._llm.reset_prefix_cache if len(scorers) > 1 else None
        try:
            await _time_sets(sets, scorers, warmup, result, profile, reset)
        finally:
            closed = served.close()
            if asyncio.iscoroutine(closed):
                await closed

    asyncio.run(main())
    return result


# ------------------------------------------------------------------------- the profile


def load_averages() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def profile_engine_round(
    model_dir: Path,
    catalog_dir: Path,
    interactions: Path,
    out: Path,
    rounds: int = 50,
    warmup: int = 5,
    only: Sequence[str] = (),
    timeout_s: float = 300,
    command: str = "",
) -> dict[str, Any]:
    """Build the request sets, run every variant in its own process, write the report."""
    chosen = [v for v in variants() if not only or any(o in v.name for o in only)]
    if not chosen:
        raise ValueError(f"no variant matches {list(only)}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict[str, Any] = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "model": str(model_dir),
        "load_average_before": load_averages(),
        "rounds_per_set": rounds,
        "warmup_rounds": warmup,
        "variants": [],
    }
    manifest = model_dir / "manifest.json"
    if manifest.is_file():
        report["model_version"] = json.loads(manifest.read_text()).get("model_version")
    with tempfile.TemporaryDirectory(prefix="engine-round-") as tmp:
        sets_path = Path(tmp) / "sets.json"
        save_sets(build_sets(model_dir, catalog_dir, interactions, rounds + warmup), sets_path)
        sizes = {n: [len(r.requests) for r in rs] for n, rs in load_sets(sets_path).items()}
        report["request_sets"] = {
            n: {"rounds": len(s), "requests_min": min(s), "requests_max": max(s)}
            for n, s in sizes.items()
        }
        for i, variant in enumerate(chosen, 1):
            print(f"[{i}/{len(chosen)}] {variant.name}", flush=True)
            spec = Path(tmp) / f"variant-{i}.json"
            result_path = Path(tmp) / f"result-{i}.json"
            spec.write_text(
                json.dumps(
                    {
                        "variant": asdict(variant),
                        "sets": str(sets_path),
                        "model": str(model_dir),
                        "catalog": str(catalog_dir),
                        "warmup": warmup,
                        "out": str(result_path),
                    }
                )
            )
            env = {**os.environ, **variant.env}
            load_before = load_averages()
            at = time.strftime("%H:%M:%SZ", time.gmtime())
            t0 = time.monotonic()
            log_path = Path(tmp) / f"variant-{i}.log"
            with log_path.open("w") as log:
                # its own session: a timeout ends the variant's engine processes with it
                proc = subprocess.Popen(
                    [sys.executable, "-m", "offline.bench.engine_round", str(spec)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            output = log_path.read_text(errors="replace")
            rows = []
            if proc.returncode == 0 and result_path.is_file():
                row = json.loads(result_path.read_text())
                for mode, part in row.pop("modes", {}).items():
                    named = {**row, **part, "variant": {**row["variant"]}}
                    named["variant"]["name"] = f"{variant.name}: {mode}"
                    rows.append(named)
                print(
                    "".join(
                        ln
                        for ln in output.splitlines(True)
                        if ln.startswith("  ") and (": p50" in ln or ": profiled" in ln)
                    ),
                    end="",
                    flush=True,
                )
            else:
                why = "timed out" if proc.returncode == -signal.SIGKILL else "failed"
                row = {"variant": asdict(variant), "error": f"{why}: {output[-1500:]}"}
                print(f"  {why} (exit {proc.returncode}):\n{output[-1500:]}", flush=True)
            with contextlib.suppress(ProcessLookupError):  # engine processes left behind
                os.killpg(proc.pid, signal.SIGKILL)
            for r in rows or [row]:
                r["started_at"] = at
                r["wall_s"] = round(time.monotonic() - t0, 1)
                r["load_average_before"] = load_before
                r["load_average_after"] = load_averages()
                report["variants"].append(r)
    report["load_average_after"] = load_averages()
    if only:
        report = _merged(out / "engine-round.json", report)
    report["seconds"] = round(time.monotonic() - started, 1)
    (out / "engine-round.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "engine-round.md").write_text(render_markdown(report))
    return report


def _merged(path: Path, report: dict[str, Any]) -> dict[str, Any]:
    """A partial run (``only``) replaces its variants' rows in an earlier report of the same
    model and keeps the others, in the order of ``variants()``."""
    if not path.is_file():
        return report
    earlier = json.loads(path.read_text())
    if earlier.get("model_version") != report.get("model_version"):
        return report
    rows = {r["variant"]["name"]: r for r in earlier.get("variants", [])}
    rows.update({r["variant"]["name"]: r for r in report["variants"]})
    order = [v.name for v in variants()]
    report["variants"] = sorted(
        rows.values(),
        key=lambda r: (
            order.index(base)
            if (base := r["variant"]["name"].split(": ")[0]) in order
            else len(order)
        ),
    )
    report["partial_runs"] = [*earlier.get("partial_runs", []), report["command"]]
    return report


def _cell(row: dict[str, Any], name: str) -> str:
    s = row.get("sets", {}).get(name)
    return "-" if s is None else f"{s['p50']:.1f} / {s['p90']:.1f} / {s['min']:.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    sets = report["request_sets"]
    head = " | ".join(
        f"{n} ({sets[n]['requests_min']}-{sets[n]['requests_max']} req)"
        if sets[n]["requests_min"] != sets[n]["requests_max"]
        else f"{n} ({sets[n]['requests_min']} req)"
        for n in SETS
    )
    lines = [
        "# One engine round: fixed cost, per-request cost, knobs",
        "",
        f"Created {report['created_at']} by `{report['command']}` "
        f"({report['machine']['cpus']} CPUs, {report['machine']['platform']}); "
        f"model `{report['model']}` ({report.get('model_version')}). "
        f"{report['rounds_per_set']} timed rounds per set (one distinct user each, "
        f"after {report['warmup_rounds']} warm-up rounds), one round at a time, each variant in "
        "a fresh process.",
        "",
        f"Load averages (1/5/15 min): before {report['load_average_before']}, "
        f"after {report['load_average_after']}.",
        "",
        "Cells: p50 / p90 / min ms per round. Fit: ms = fixed + per-request x n, least squares "
        "over every timed round.",
        "",
        f"| variant | {head} | fit fixed ms | fit ms/request | start s | at, load before |",
        "|---" * (len(SETS) + 5) + "|",
    ]
    for row in report["variants"]:
        name = row["variant"]["name"]
        if "error" in row:
            lines.append(
                f"| {name} | failed: {row['error'].splitlines()[-1][:80]} |"
                + " |" * (len(SETS) + 3)
            )
            continue
        if not row.get("sets"):
            continue  # profile only: its own section below
        fit = row.get("fit") or {}
        cells = " | ".join(_cell(row, n) for n in SETS)
        lines.append(
            f"| {name} | {cells} | {fit.get('fixed_ms', '-')} | {fit.get('per_request_ms', '-')} "
            f"| {row.get('startup_s', '-')} | {row.get('started_at', '')} "
            f"{row.get('load_average_before', '')} |"
        )
    lines += summary_lines(report)
    for row in report["variants"]:
        for set_name, prof in (row.get("profile") or {}).items():
            lines += [
                "",
                f"## Where an in-process round goes: {row['variant']['name']}, "
                f'"{set_name}" ({prof["rounds"]} rounds, p50 {prof["ms_p50_under_profiler"]} '
                "ms under the profiler)",
                "",
                "Cumulative time per round under cProfile, which inflates Python-heavy parts; "
                "nested parts overlap.",
                "",
                "| part | ms per round | calls |",
                "|---|---|---|",
            ]
            parts = prof["parts"]
            lines += [
                f"| {label} | {part['ms_per_round']} | {part['calls']} |"
                for label, part in parts.items()
                if label != "top_self_time"
            ]
            lines += ["", "Top self time per round:", ""]
            lines += [
                f"- `{t['function']}` {t['ms_per_round']} ms" for t in parts["top_self_time"][:12]
            ]
    lines.append("")
    return "\n".join(lines)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The figures the table implies: the service's fixed and per-request cost, the floor,
    and every variant that moves a set's p50 by 10% or more against the service."""
    rows = {r["variant"]["name"]: r for r in report["variants"] if r.get("sets")}
    base = rows.get(variants()[0].name)
    if base is None:
        return []
    out = ["", "## Generated summary", ""]
    for name, row in rows.items():
        split = {n: st["engine_step"] for n, st in row["sets"].items() if "engine_step" in st}
        if not split:
            continue
        out += [
            f"Engine-core steps inside a round ({name}): the step is the engine core's wait "
            "for the worker process (model, sampler, log-probs); the rest of the round is the "
            "frontend, ZMQ, scheduling and output processing.",
            "",
            "| set | round p50 ms | step p50 ms | outside the step p50 ms | steps/round "
            "| prompt tokens computed |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {n} | {row['sets'][n]['p50']} | {st['ms_p50']} | {st['outside_step_ms_p50']} "
            f"| {st['steps_per_round']} | {st['prompt_tokens_computed_mean']} |"
            for n, st in split.items()
        ]
        out.append("")
    fit = base.get("fit") or {}
    out.append(
        f"- Service path ({base['variant']['name']}): a 1-request round with a 2-token prompt "
        f"takes {base['sets']['minimal']['p50']} ms p50; over all rounds ms ~= "
        f"{fit.get('fixed_ms')} + {fit.get('per_request_ms')} x requests."
    )
    for name, row in rows.items():
        if row is base:
            continue
        moved = []
        for set_name in SETS:
            a, b = base["sets"].get(set_name), row["sets"].get(set_name)
            if a and b and a["p50"] > 0 and abs(b["p50"] / a["p50"] - 1) >= 0.10:
                moved.append(f"{set_name} x{b['p50'] / a['p50']:.2f}")
        if moved:
            out.append(f"- {name}: " + ", ".join(moved) + " (p50 against the service path)")
    return out


def _worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    variant = Variant(**spec["variant"])
    result = run_variant(
        variant, Path(spec["sets"]), Path(spec["model"]), Path(spec["catalog"]), spec["warmup"]
    )
    Path(spec["out"]).write_text(json.dumps(result))
    sys.stdout.flush()
    # vLLM's engine processes and threads can hold the interpreter open after shutdown
    os._exit(0)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
