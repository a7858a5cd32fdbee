"""The one artifact-directory writer: a reader sees the old directory or the new one, never a
half-written one, and a failure anywhere leaves the old one in place with nothing beside it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from offline import fsutil
from offline.fsutil import atomic_directory


def siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def contents(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir())}


@pytest.fixture
def old(tmp_path: Path) -> Path:
    target = tmp_path / "artifact"
    target.mkdir()
    (target / "manifest.json").write_text("old manifest")
    (target / "weights.bin").write_text("old weights")
    return target


def test_success_replaces_the_whole_directory_readably(old: Path) -> None:
    with atomic_directory(old) as work:
        assert work.parent == old.parent and work.name.startswith(".artifact.tmp-")
        assert contents(old) == {"manifest.json": "old manifest", "weights.bin": "old weights"}
        (work / "manifest.json").write_text("new manifest")
        (work / "sub").mkdir(mode=0o700)
        (work / "sub" / "part").write_text("new part")
        os.chmod(work / "manifest.json", 0o600)
    assert siblings(old.parent) == ["artifact"]
    assert (old / "manifest.json").read_text() == "new manifest"
    assert not (old / "weights.bin").exists()  # replaced, not merged
    assert stat.S_IMODE(old.stat().st_mode) == 0o755
    assert stat.S_IMODE((old / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((old / "manifest.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((old / "sub" / "part").stat().st_mode) == 0o644


def test_failure_midway_leaves_the_old_directory_intact(old: Path) -> None:
    with pytest.raises(RuntimeError, match="killed while writing"), atomic_directory(old) as work:
        (work / "manifest.json").write_text("half a new manifest")
        raise RuntimeError("killed while writing")
    assert contents(old) == {"manifest.json": "old manifest", "weights.bin": "old weights"}
    assert siblings(old.parent) == ["artifact"]


def test_a_failed_swap_puts_the_old_directory_back(
    old: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_rename = os.rename

    def rename_in_fails(src: object, dst: object) -> None:
        if Path(str(src)).name.startswith(".artifact.tmp-"):
            raise OSError("rename failed")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(fsutil.os, "rename", rename_in_fails)
    with pytest.raises(OSError, match="rename failed"), atomic_directory(old) as work:
        (work / "manifest.json").write_text("new manifest")
    assert contents(old) == {"manifest.json": "old manifest", "weights.bin": "old weights"}
    assert siblings(old.parent) == ["artifact"]


def test_a_new_target_appears_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "deeper" / "model"
    with pytest.raises(ValueError), atomic_directory(target) as work:
        (work / "config.json").write_text("{}")
        raise ValueError("bad input")
    assert siblings(tmp_path / "deeper") == []
    with atomic_directory(target) as work:
        (work / "config.json").write_text("{}")
        assert not target.exists()
    assert contents(target) == {"config.json": "{}"}
    assert siblings(target.parent) == ["model"]
