"""Layering: the miniworld is one world behind the core's interface (recap_dagster.world),
so no module outside ``recap_dagster/miniworld/`` imports it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "recap_dagster"
MINIWORLD = "recap_dagster.miniworld"


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _miniworld_importers() -> dict[str, list[str]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        if relative.startswith("recap_dagster/miniworld/"):
            continue
        hits = [
            name
            for name in _imports(ast.parse(path.read_text(encoding="utf-8")))
            if name == MINIWORLD or name.startswith(MINIWORLD + ".")
        ]
        if hits:
            found[relative] = sorted(set(hits))
    return found


def test_nothing_outside_the_miniworld_imports_it() -> None:
    offenders = _miniworld_importers()
    assert offenders == {}, f"import the world interface (recap_dagster.world) instead: {offenders}"


def test_the_scan_sees_imports() -> None:
    # Guard against a scan that finds nothing.
    assert _imports(ast.parse("from recap_dagster import miniworld")) == [
        "recap_dagster",
        "recap_dagster.miniworld",
    ]
    assert "recap_dagster.miniworld.world" in _imports(
        ast.parse("import recap_dagster.miniworld.world as w")
    )
