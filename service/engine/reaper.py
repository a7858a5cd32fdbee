"""No orphaned engine: a process that starts vLLM takes its engine processes with it, however it
ends.

vLLM runs its engine core (and on CPU its workers) in processes it spawns. A parent stopped
during engine start-up (SIGTERM before any handler is installed) or killed outright (SIGKILL, the
OOM killer) would leave them running, re-parented to init, holding cores and memory. So the
parent starts a small reaper, in a session of its own, that keeps the list of the parent's
descendants (from ``/proc``, every ``POLL_S``) and, once the parent is gone for whatever reason,
kills the ones still running (each checked by its start time, so a reused pid is never hit)
and exits. A parent that stops cleanly closes its engine first; the reaper then finds nothing
left. The process group is left alone: Ctrl-C in a terminal still reaches the parent.

``python -m service.engine.reaper PID`` is the reaper itself (Linux; elsewhere nothing starts).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.2
PROC = Path("/proc")


def guard_descendants() -> subprocess.Popen[bytes] | None:
    """Start the reaper for this process; None where there is no ``/proc``."""
    if not (PROC / str(os.getpid()) / "stat").is_file():
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "service.engine.reaper", str(os.getpid())],
        start_new_session=True,  # neither the parent's signals nor its terminal reach it
        stdin=subprocess.DEVNULL,
        close_fds=True,
    )


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process; None when it is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0], int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: pid -> start time."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children.setdefault(st[0], []).append(int(entry.name))
            starts[int(entry.name)] = st[2]
    found: dict[int, int] = {}
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid not in found and pid in starts:
            found[pid] = starts[pid]
            todo.extend(children.get(pid, ()))
    return found


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] != "Z"  # a zombie is dead, only not yet reaped


def watch(parent: int) -> None:
    known: dict[int, int] = {}
    while _alive(parent):
        known.update(descendants(parent))
        time.sleep(POLL_S)
    known.pop(os.getpid(), None)
    for pid in list(known):  # children the orphans started since the last look
        known.update(descendants(pid))
    known.pop(os.getpid(), None)
    for pid, started in known.items():
        st = _stat(pid)
        if st is not None and st[2] == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # outlives a group-wide SIGTERM to do its job
    watch(int(sys.argv[1]))
