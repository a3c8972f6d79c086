"""The package layout docs/architecture.md describes: imports only downward, no cycles, and
only the command line renders tables. Read from every import statement with Python's ast."""

from __future__ import annotations

import ast
from pathlib import Path

import brainseg

SRC = Path(brainseg.__file__).parent
#: docs/architecture.md "Packages": each may import the core and the packages before it.
ORDER = ["core", "data", "model", "inference", "evaluation", "train", "export", "cli"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["brainseg", *parts])] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The brainseg modules ``path`` imports anywhere (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("brainseg"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("brainseg.")}
    return {m for m in found if m in modules}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ORDER) else "core"


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        m: _imports(p, modules) - {m, "brainseg"}
        for m, p in modules.items()
        if m not in ("brainseg", "brainseg.__main__")  # the root's lazy entry points, -m
    }


def test_packages_import_only_downward() -> None:
    upward = [
        f"{m} -> {d}"
        for m, deps in _graph().items()
        for d in deps
        if ORDER.index(_package(d)) > ORDER.index(_package(m))
    ]
    assert upward == []


def test_no_import_cycles_between_modules() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join([*path[path.index(d) :], d]))
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_layout_has_the_documented_packages() -> None:
    packages = {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert packages == set(ORDER[1:])
    docs = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name in ORDER[1:]:
        assert f"  {name}/" in docs


def test_only_the_command_line_renders_tables() -> None:
    renders = []
    for m, path in _modules().items():
        if _package(m) == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("table", "result"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("console", "con"):
                    renders.append(f"{m}:{node.lineno} console.{node.attr}")
    assert renders == []
