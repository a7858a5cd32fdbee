"""One way to write an artifact directory: into a temporary sibling, swapped in when complete.

Catalogs (``thinkahead catalog build``), trained models (``thinkahead train``) and aligned
models (``thinkahead model add-item-tokens``) are all written through
:func:`atomic_directory`, so a reader (the service, the worker, an eval) finds the previous
directory or the new one, never half of one, and a failed job leaves the previous one in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DIR_MODE = 0o755
FILE_MODE = 0o644


@contextmanager
def atomic_directory(target: Path | str) -> Iterator[Path]:
    """Yield an empty directory beside ``target``; when the block ends without an exception,
    it replaces ``target`` (made world-readable: ``mkdtemp`` and ``mkstemp`` create owner-only
    entries, and the service may run as another user). On an exception, or if the swap itself
    fails, the temporary directory is removed and ``target`` is as it was.

    POSIX has no atomic exchange of two directories: the previous one is renamed aside, the new
    one renamed in, then the previous one removed, so for a moment ``target`` is absent (a
    reader sees "not there yet", never a mixture)."""
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.tmp-"))
    try:
        yield work
        _make_readable(work)
        _swap_in(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _make_readable(root: Path) -> None:
    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), DIR_MODE)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), FILE_MODE)


def _swap_in(work: Path, target: Path) -> None:
    if not target.exists() and not target.is_symlink():
        os.rename(work, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
    os.rename(target, old)
    try:
        os.rename(work, target)
    except BaseException:
        os.rename(old, target)  # put the previous directory back
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
