"""The layering, read from the tree.

- The core packages (``CORE``) are plain Python: none imports Dagster, the Dagster layer or
  the miniworld.
- The Dagster layer (``DAGSTER_LAYER``) is the only code outside ``miniworld/`` that imports
  Dagster; the miniworld's own Dagster modules are its assets, definitions, resources and
  main job.
- The miniworld is one world behind the core's interface (``recap_dagster.evaluation.world``):
  nothing outside ``recap_dagster/miniworld/`` imports it.
- Every module lives in one of those places: the package's top holds only the composition
  roots, the entry point and the default locations.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "recap_dagster"

#: Plain-Python packages, one per stage or concern.
CORE = ("corpus", "captioner", "t2i", "evaluation", "storage", "training")
#: The Dagster layer: assets, resources, orchestration and the composition roots.
DAGSTER_LAYER = ("assets", "resources", "orchestration", "definitions", "definitions_k8s")
#: The rest of the package's top: the CLI entry point and the default locations.
TOP_MODULES = ("cli", "settings")
MINIWORLD = "miniworld"
#: The miniworld's Dagster modules; the rest of the miniworld is plain Python.
MINIWORLD_DAGSTER = ("assets", "definitions", "resources", "pipeline", "cli")
#: ``dagster_pipes`` is the external-process side of Pipes (no Dagster framework, no
#: instance): the standalone trainer reports its progress through it.
PIPES = "dagster_pipes"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, module: str = "", is_package: bool = False) -> list[str]:
    """Every module named by an import in ``tree`` (relative imports made absolute)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def _modules() -> dict[str, list[str]]:
    """Module name -> the modules it imports, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found[module] = _imports(tree, module, path.name == "__init__.py")
    return found


def _place(module: str) -> str:
    """Where a module of the package lives: a core package, the Dagster layer, the
    miniworld or the top."""
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    return parts[1]


def _in(name: str, *modules: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def _is_dagster(name: str) -> bool:
    top = name.split(".")[0]
    return (top == "dagster" or top.startswith("dagster_")) and top != PIPES


MODULES = _modules()


def test_every_module_has_its_place() -> None:
    known = {*CORE, *DAGSTER_LAYER, *TOP_MODULES, MINIWORLD, "root"}
    loose = sorted(m for m in MODULES if _place(m) not in known)
    assert loose == [], f"put these in a core package or the Dagster layer: {loose}"


def test_the_core_imports_neither_dagster_nor_the_dagster_layer_nor_the_miniworld() -> None:
    forbidden = [f"recap_dagster.{name}" for name in (*DAGSTER_LAYER, "cli", MINIWORLD)]
    offenders = {
        module: sorted({n for n in names if _is_dagster(n) or _in(n, *forbidden)})
        for module, names in MODULES.items()
        if _place(module) in CORE
    }
    offenders = {module: names for module, names in offenders.items() if names}
    assert offenders == {}, f"the core must stay plain Python: {offenders}"


def test_only_the_dagster_layer_imports_dagster() -> None:
    allowed = {*DAGSTER_LAYER, "cli"}
    miniworld_dagster = {f"recap_dagster.{MINIWORLD}.{name}" for name in MINIWORLD_DAGSTER}
    offenders = {
        module: sorted({n for n in names if _is_dagster(n)})
        for module, names in MODULES.items()
        if _place(module) not in allowed and module not in miniworld_dagster
    }
    offenders = {module: names for module, names in offenders.items() if names}
    assert offenders == {}, f"move Dagster code into the Dagster layer: {offenders}"


def test_nothing_outside_the_miniworld_imports_it() -> None:
    offenders = {
        module: sorted({n for n in names if _in(n, f"recap_dagster.{MINIWORLD}")})
        for module, names in MODULES.items()
        if _place(module) != MINIWORLD
    }
    offenders = {module: names for module, names in offenders.items() if names}
    assert offenders == {}, (
        f"import the world interface (recap_dagster.evaluation.world) instead: {offenders}"
    )


def test_the_layers_exist_as_folders() -> None:
    for name in (*CORE, "assets", "resources", "orchestration", MINIWORLD):
        assert (PACKAGE / name / "__init__.py").is_file(), name
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert top == sorted(("definitions", "definitions_k8s", *TOP_MODULES))


def test_the_scan_sees_imports() -> None:
    # Guard against a scan that finds nothing: absolute, dotted, lazy and relative imports.
    assert _imports(ast.parse("from recap_dagster import miniworld")) == [
        "recap_dagster",
        "recap_dagster.miniworld",
    ]
    assert "recap_dagster.miniworld.world" in _imports(
        ast.parse("import recap_dagster.miniworld.world as w")
    )
    lazy = ast.parse("def f():\n    import dagster as dg\n")
    assert _imports(lazy) == ["dagster"]
    relative = ast.parse("from ..assets import t2i")
    assert "recap_dagster.assets.t2i" in _imports(relative, "recap_dagster.corpus.reading")
    assert _is_dagster("dagster_k8s") and _is_dagster("dagster._core") and not _is_dagster(PIPES)
    assert len(MODULES) > 50 and any(_place(m) in CORE for m in MODULES)
