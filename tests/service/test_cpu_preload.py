"""The server's one-time re-execution with vLLM's CPU libraries preloaded: what it adds, and
that it happens once, for real, in a child process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from service.engine.cpu_preload import SWITCH, preload_env, preload_libraries

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
IOMP = "/venv/lib/libiomp5.so"


def test_missing_libraries_are_put_first_and_the_rest_kept() -> None:
    env = preload_env({"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"}, [TCMALLOC, IOMP])
    assert env is not None
    assert env["LD_PRELOAD"] == f"{TCMALLOC}:{IOMP}:/opt/other.so"
    assert env["PATH"] == "/bin" and env[SWITCH] == "done"


def test_an_openmp_runtime_already_preloaded_is_not_joined_by_another() -> None:
    gomp = "/venv/lib/python3.11/site-packages/torch/lib/libgomp.so.1"
    env = preload_env({"LD_PRELOAD": gomp}, [TCMALLOC, IOMP])
    assert env is not None and env["LD_PRELOAD"] == f"{TCMALLOC}:{gomp}"
    assert preload_env({"LD_PRELOAD": f"{TCMALLOC}:{gomp}"}, [TCMALLOC, IOMP]) is None


def test_nothing_to_add_means_no_re_execution() -> None:
    # an image that preloads tcmalloc from its own path: matched by file name
    assert (
        preload_env({"LD_PRELOAD": "/usr/local/lib/libtcmalloc_minimal.so.4"}, [TCMALLOC]) is None
    )
    assert preload_env({}, []) is None
    assert preload_env({SWITCH: "0"}, [TCMALLOC]) is None  # turned off
    assert preload_env({SWITCH: "done"}, [TCMALLOC]) is None  # already re-executed once


def test_libraries_found_where_installed(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libiomp5.so").write_bytes(b"")
    tcmalloc = tmp_path / "libtcmalloc_minimal.so.4"
    tcmalloc.write_bytes(b"")
    assert preload_libraries(str(tmp_path), str(tcmalloc)) == [
        str(tcmalloc),
        str(tmp_path / "lib" / "libiomp5.so"),
    ]
    assert preload_libraries(str(tmp_path / "none"), str(tmp_path / "no-*.so")) == []


def test_a_process_re_executes_itself_once_with_the_same_argv(tmp_path: Path) -> None:
    """A real child: the library list is forced to one harmless preload (libc itself)."""
    places = (
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/libc.so.6",
        "/lib/aarch64-linux-gnu/libc.so.6",
    )
    libc = next(Path(p) for p in places if Path(p).exists())
    script = tmp_path / "child.py"
    script.write_text(
        "import json, os, sys\n"
        "import service.engine.cpu_preload as p\n"
        "p.cpu_vllm_installed = lambda: True\n"
        f"p.preload_libraries = lambda: [{str(libc)!r}]\n"
        "with open(sys.argv[1], 'a') as f:\n"
        "    f.write(json.dumps([sys.argv[2:], os.environ.get('LD_PRELOAD', '')]) + '\\n')\n"
        "p.reexec_with_cpu_preload()\n"
    )
    runs = tmp_path / "runs.jsonl"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, str(script), str(runs), "serve", "--x", "1"], env=env, timeout=60
    )
    assert done.returncode == 0
    seen = [json.loads(line) for line in runs.read_text().splitlines()]
    assert seen == [[["serve", "--x", "1"], ""], [["serve", "--x", "1"], str(libc)]]
