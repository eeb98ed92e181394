"""The package's structure: no import cycles, one entry point into the converter, torch only there.

Static checks over the source (every ``import``, at module level or inside a function), so they
cost nothing and hold for code paths no other test happens to run.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# installed package name -> source folder (pyproject.toml's package-dir)
PACKAGES = {"segface_jax": REPO / "segface_jax", "segface_jax.convert": REPO / "convert",
            "segface_jax.train": REPO / "train"}


def _modules() -> dict[str, Path]:
    mods = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([package, *parts])] = path
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> list[str]:
    """The modules ``path`` imports: ``from a import b`` names ``a.b`` where that is a module
    (importing a submodule runs its package's ``__init__`` too, but that is no edge of ours)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods
                      else node.module for a in node.names]
    return names


def _import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: {n for n in _imports(path, mods) if n in mods and n != name}
            for name, path in mods.items()}


def test_no_import_cycles():
    """A cycle (as converter -> hub -> converter was) makes the import order matter and the
    pieces impossible to read or reuse alone."""
    graph = _import_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(
                path[path.index(dep):] + [node, dep] if dep in path else [node, dep])
            if dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_outside_code_reaches_the_converter_through_its_entry_point():
    """``segface_jax.convert``'s ``__init__`` is the documented way in; its submodules are the
    converter's own business (tests and benchmarks may look inside)."""
    mods = _modules()
    inside = []
    for name, path in mods.items():
        if name.startswith("segface_jax.convert"):
            continue
        inside += [f"{path.relative_to(REPO)} imports {n}" for n in _imports(path, mods)
                   if n.startswith("segface_jax.convert.") and n in mods]
    assert not inside, inside


def test_torch_is_imported_only_by_the_converter():
    """Nor tensorboardX, which imports torch wherever torch is installed."""
    mods = _modules()
    offenders = [f"{path.relative_to(REPO)} imports {n}" for name, path in mods.items()
                 if not name.startswith("segface_jax.convert")
                 for n in _imports(path, mods)
                 if n.split(".")[0] in ("torch", "torchvision", "tensorboardX")]
    assert not offenders, offenders
