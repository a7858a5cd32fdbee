"""One direction of imports. ``offline/`` builds on ``service/``, never the reverse, so the serving
process (``python -m service``) needs no training or batch code; inside ``service/`` the arrows run
down: app -> (api | runtime) -> (access | core) -> (storage, engine, contracts, config, errors,
metrics), and the contracts the offline side shares need nothing of the service but the engine
primitive they plan requests for."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"
GENERATED = "service.api._proto"  # protoc's stubs: they import only themselves and protobuf


@dataclass(frozen=True)
class Rule:
    """Modules under any of ``importers`` import nothing under ``forbidden``; with ``only``, no
    module of ``service`` outside ``only`` either."""

    name: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None

    def broken_by(self, imported: str) -> bool:
        if any(_under(imported, p) for p in self.forbidden):
            return True
        return (
            self.only is not None
            and _under(imported, "service")
            and not any(_under(imported, p) for p in self.only)
        )


TOP = ("service.app", "service.runtime")
RULES = (
    Rule("service never imports offline", ("service",), forbidden=("offline",)),
    Rule(
        "the shared contracts need only themselves and the engine primitive",
        ("service.contracts",),
        only=("service.contracts", "service.engine.base"),
    ),
    Rule(
        "access control sits below the runtime, the adapters and the core",
        ("service.access",),
        forbidden=(*TOP, "service.api", "service.core"),
    ),
    Rule("the adapters see a front end, never the runtime", ("service.api",), forbidden=TOP),
    Rule(
        "the core knows no transport and no access control",
        ("service.core",),
        forbidden=(*TOP, "service.api", "service.access"),
    ),
    Rule(
        "the runtime does not reach up into the adapters",
        ("service.runtime",),
        forbidden=("service.api", "service.app"),
    ),
    Rule(
        "storage, engines, settings, errors and metrics are below every use of them",
        (
            "service.storage",
            "service.engine",
            "service.config",
            "service.errors",
            "service.metrics",
        ),
        forbidden=(*TOP, "service.api", "service.access", "service.core"),
    ),
)


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(module: str, source: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` imports, function-level and TYPE_CHECKING imports too; relative
    imports resolved; ``from a import b`` counts as a and a.b (b may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # level 1: this package; each more level one package up
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def service_sources() -> dict[str, tuple[str, bool]]:
    """module -> (source, is a package's __init__), for every module of ``service``."""
    sources = {}
    for path in sorted(SERVICE.rglob("*.py")):
        name = module_name(path)
        if not _under(name, GENERATED):
            sources[name] = (path.read_text(), path.name == "__init__.py")
    return sources


def violations(
    sources: dict[str, tuple[str, bool]], rules: Iterable[Rule] = RULES
) -> dict[str, list[str]]:
    """Rule name -> 'module imports target' for every import that breaks it."""
    found: dict[str, list[str]] = {}
    for module, (source, is_package) in sources.items():
        imports = imported_modules(module, source, is_package)
        for rule in rules:
            if not any(_under(module, p) for p in rule.importers):
                continue
            for target in sorted(i for i in imports if rule.broken_by(i)):
                found.setdefault(rule.name, []).append(f"{module} imports {target}")
    return found


def test_imports_run_one_way() -> None:
    sources = service_sources()
    assert violations(sources) == {}
    # the walk saw the whole package, and every rule has modules to judge
    assert len(sources) > 50
    for rule in RULES:
        assert any(_under(m, p) for m in sources for p in rule.importers), rule.name


# One back-arrow per rule, added to a real module (or a new one) of the real tree: that rule,
# and no other, must name it.
PLANTED = {
    RULES[0].name: ("service.core.policy", "import offline.cli"),
    RULES[1].name: ("service.contracts.planted", "from service.storage.store import SnapshotStore"),
    RULES[2].name: ("service.access.gate", "from service.core import Recommender"),
    RULES[3].name: ("service.api.rest.router", "def f():\n    from service import runtime"),
    RULES[4].name: ("service.core.planted", "from service.access.gate import Gate"),
    RULES[5].name: ("service.runtime", "import service.api.rest"),
    RULES[6].name: ("service.storage.store", "from ..core.types import Source"),
}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_a_back_arrow_is_caught(rule: Rule) -> None:
    module, line = PLANTED[rule.name]
    sources = service_sources()
    source, is_package = sources.get(module, ("", False))
    sources[module] = (f"{source}\n{line}\n", is_package)
    found = violations(sources)
    assert list(found) == [rule.name]
    assert all(v.startswith(f"{module} imports ") for v in found[rule.name])


def test_relative_and_package_imports_resolve() -> None:
    assert "service.core.types" in imported_modules("service.storage.x", "from ..core import types")
    assert "service.api.rest.router" in imported_modules(
        "service.api.rest", "from .router import router", is_package=True
    )
    assert "service.runtime" in imported_modules("service.api.x", "from service import runtime")
