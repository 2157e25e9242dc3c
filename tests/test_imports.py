"""No kdkit module imports in a circle, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "kdkit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The kdkit modules ``path`` imports anywhere in its body (resolved to known modules)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from kdkit import losses` imports the module kdkit.losses; `from kdkit.x import f`
            # imports kdkit.x.
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(path, name, known) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def is_package_init(name: str) -> bool:
    return (SRC / Path(*name.split(".")) / "__init__.py").is_file()


def test_the_import_graph_is_read():
    edges = graph()
    assert "kdkit.distiller" in edges and "kdkit.capture" in edges["kdkit.distiller"]
    assert "kdkit.losses" in edges["kdkit"]  # `from kdkit import losses`


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from kdkit.config import x\n")
    assert imported(source, "kdkit.m", {"kdkit.config", "kdkit.m"}) == {"kdkit.config"}


def test_no_kdkit_module_imports_in_a_circle():
    # A package's __init__ re-exports its submodules, which import their siblings through the
    # package name: `kdkit.cache.store -> kdkit.cache` is the parent, not a circle.
    edges = {
        name: {t for t in targets if not (is_package_init(t) and name.startswith(t + "."))}
        for name, targets in graph().items()
    }
    cycle = find_cycle(edges)
    assert cycle is None, f"kdkit modules import in a circle: {' -> '.join(cycle or [])}"
