"""No orphaned engine: real processes. A parent that started the reaper and then child and
grandchild processes (as vLLM starts its engine core and workers) is killed outright; the
reaper kills what it left behind, and nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from service.engine.reaper import guard_descendants
    guard_descendants()
    child = subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys, time; "
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "print(g.pid, flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    grandchild = child.stdout.readline().strip()
    print(child.pid, grandchild, flush=True)
    time.sleep(120)
    """
)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_parent_takes_its_children_and_grandchildren_with_it() -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        child, grandchild = (int(x) for x in parent.stdout.readline().split())  # type: ignore[union-attr]
        time.sleep(0.6)  # the reaper has seen them
        assert alive(child) and alive(grandchild)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while (alive(child) or alive(grandchild)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child) and not alive(grandchild)
        assert bystander.poll() is None  # only the parent's descendants
    finally:
        bystander.kill()
        parent.kill()
