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
