"""Errors the CLI turns into a one-line message and a non-zero exit code."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input: names the file and, where it helps, the line or the count."""

    def __init__(self, path: Path | str | None, message: str, line: int | None = None) -> None:
        where = "" if path is None else f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")
        self.path = path
        self.line = line
