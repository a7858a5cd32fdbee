"""One direction of imports: ``offline/`` builds on ``service/``, never the reverse, so the
serving process (``python -m service``) needs no training or batch code."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports too
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_service_never_imports_offline() -> None:
    offenders = {
        str(path.relative_to(SERVICE.parent)): sorted(
            m for m in imported_modules(path) if m == "offline" or m.startswith("offline.")
        )
        for path in SERVICE.rglob("*.py")
    }
    assert {path: mods for path, mods in offenders.items() if mods} == {}
    assert len(offenders) > 30  # the walk saw the whole package
