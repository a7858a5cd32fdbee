"""No orphaned engine: a real ``thinkahead serve`` with the real vLLM engine, stopped while its
engine is starting (SIGTERM) or killed outright (SIGKILL), leaves none of its processes behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from offline.localproc import launch_env
from service.engine.reaper import descendants
from tests.helpers import free_ports

pytestmark = pytest.mark.vllm


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def engine_started(pid: int) -> dict[int, int]:
    """The serve process's descendants once vLLM's engine core is among them."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        found = descendants(pid)
        for child in found:
            try:
                with open(f"/proc/{child}/comm") as f:
                    name = f.read()
            except OSError:
                continue
            if "VLLM" in name or "EngineCore" in name:
                return found
        time.sleep(0.2)
    raise AssertionError("the engine core never started")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_serve_stopped_during_engine_start_up_leaves_no_engine(tiny_world, redis_url, sig) -> None:  # type: ignore[no-untyped-def]
    http_port, grpc_port = free_ports(2)
    env = launch_env(None)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the engine core in a process of its own
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "offline.cli", "serve",
            "--model", str(tiny_world.model_dir), "--catalog", str(tiny_world.catalog_dir),
            "--redis", redis_url,
            "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        started = engine_started(proc.pid)
        left = {p: s for p, s in started.items() if p != proc.pid}
        assert left  # the engine runs apart from the serving process
        os.kill(proc.pid, sig)
        proc.wait(timeout=120)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in left) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in left if alive(p)]
    finally:
        proc.kill()
