"""Package boundaries: peer/, client/ and bootstrap/ import swarm/ and never each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("peer", "client", "bootstrap")


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("role", ROLES)
def test_role_imports_no_other_role(role):
    others = set(ROLES) - {role}
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & others)
        for path in (ROOT / role).rglob("*.py")
        if imported_packages(path) & others
    }
    assert not offenders, f"{role}/ must not import {sorted(others)}: {offenders}"


def test_swarm_core_imports_no_role():
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & set(ROLES))
        for path in (ROOT / "swarm").rglob("*.py")
        if imported_packages(path) & set(ROLES)
    }
    assert not offenders, f"swarm/ must not import role packages: {offenders}"


def imported_modules(path: Path) -> set[str]:
    """Full names of the modules a file imports, at any depth of the file (function-level imports too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_swarm_modules_import_in_one_direction():
    """No import cycle among swarm/'s modules, counting imports inside functions (a cycle hidden in a
    function is still two modules that cannot be understood, or loaded, one without the other)."""
    modules = {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
               for path in (ROOT / "swarm").rglob("*.py")}
    edges = {name: {m for m in imported_modules(path) if m in modules and m != name}
             for name, path in modules.items()}
    for name in edges:  # a package's __init__ re-exporting its modules is no cycle of theirs
        edges[name] -= {p for p in edges[name] if name.startswith(p + ".")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(edges[name]):
            assert state.get(other) != 1, f"import cycle: {' -> '.join(path + [name, other])}"
            if other not in state:
                visit(other, path + [name])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [])
