"""Where the bench runs the service and its load generators."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from offline.bench.runner import CpuSplit
from offline.localproc import pinned_to


def test_a_pinned_child_runs_on_the_given_cpus() -> None:
    cpu = min(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
        check=True,
        capture_output=True,
        text=True,
        preexec_fn=pinned_to({cpu}),
    )
    assert out.stdout.strip() == f"[{cpu}]"
    assert pinned_to(None) is None


@pytest.mark.parametrize(
    ("cpus", "service", "load"),
    [
        (range(2), None, None),
        (range(4), {0, 1, 2}, {3}),
        (range(8), {0, 1, 2, 3, 4, 5}, {6, 7}),
    ],
)
def test_the_load_gets_its_own_cpus_only_where_the_machine_has_them(
    monkeypatch: pytest.MonkeyPatch, cpus: range, service: set[int] | None, load: set[int] | None
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(cpus))
    split = CpuSplit.of_this_machine()
    assert (split.service, split.load) == (service, load)
    assert ("not pinned" in split.note) == (load is None)
