"""The package's shape, checked: imports between its modules sit at module top and point one way (no
cycle), no module grows past one screenful of concerns, and importing any module loads no heavy library
(so `--help`, `--dry-run` and config loading stay fast; the heavy imports live inside functions)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "lowvram_ft"
MAX_LINES = 650  # "about 600": past it a module is holding more than one concern
HEAVY = ("torch", "transformers", "trl", "peft", "unsloth", "datasets", "accelerate", "bitsandbytes", "matplotlib")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package's modules an import statement loads (a name imported from a package may be a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "lowvram_ft"]
    if node.level:
        package = (module if path.name == "__init__.py" else module.rpartition(".")[0]).split(".")
        target = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "lowvram_ft":
        return []
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> the package modules it imports, [(module, line, target) of imports not at module top])."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    nested = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported_modules(module, path, node):
                    if target != module:
                        edges[module].add(target)
                        if id(node) not in top:
                            nested.append((module, node.lineno, target))
    return edges, nested


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_the_packages_modules():
    edges, _ = import_graph()
    assert cycles(edges) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_between_the_packages_modules_are_at_module_top():
    _, nested = import_graph()
    assert nested == [], "\n".join(f"{m}:{line} imports {t} inside a function" for m, line, t in nested)


def test_no_module_past_about_600_lines():
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}


def test_importing_every_module_loads_no_heavy_library():
    modules = sorted(m for m in MODULES if not m.endswith("__main__"))
    code = (f"import sys\nfor m in {modules!r}:\n    __import__(m)\n"
            f"print(sorted(set({HEAVY!r}) & {{n.split('.')[0] for n in sys.modules}}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
