"""The package's shape: imports run one way (no cycle, the layers of docs/architecture.md),
and no function is longer than a reader can hold (80 lines)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "bkbench"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """bkbench modules that ``path`` imports anywhere (in functions too: a lazy import is
    still an import); ``from a import b`` counts as a.b when that is a module."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:   # bkbench.x.y.func -> bkbench.x.y
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported_modules(path, name, known) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "bkbench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import thing\n")
    (pkg / "b.py").write_text("from . import a\n")
    known = {"bkbench", "bkbench.a", "bkbench.b"}
    assert imported_modules(pkg / "a.py", "bkbench.a", known) == {"bkbench.b"}
    assert imported_modules(pkg / "b.py", "bkbench.b", known) == {"bkbench.a"}


def test_the_import_graph_of_the_package_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_layer_contracts_hold():
    """pyproject.toml's import-linter contracts (the layers of docs/architecture.md)."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e .[dev])")
    root = SRC.parent
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(SRC)}
    done = subprocess.run([exe, "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


MAX_FUNCTION_LINES = 80
# compiled kernels: a numba or Triton function is one kernel, not split for reading
KERNEL_DECORATORS = {"njit", "jit", "autotune", "heuristics", "vectorize", "guvectorize"}


def is_kernel(node: ast.FunctionDef) -> bool:
    """A numba/Triton-decorated function, or a Triton kernel jitted later (it reads its
    program id: ``tl.program_id``)."""
    if _decorator_names(node) & KERNEL_DECORATORS:
        return True
    return any(isinstance(n, ast.Attribute) and n.attr == "program_id"
               and getattr(n.value, "id", None) == "tl" for n in ast.walk(node))


def _decorator_names(node: ast.AST) -> set[str]:
    names = set()
    for d in getattr(node, "decorator_list", []):
        d = d.func if isinstance(d, ast.Call) else d
        names.add(d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", ""))
    return names


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (n lines)`` for each function longer than ``limit`` lines (its
    decorators and docstring included), compiled kernels left out."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if is_kernel(node):
                continue
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines = node.end_lineno - start + 1
            if lines > limit:
                out.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_long_functions_are_found_and_kernels_excused(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    triton = body + "    pid = tl.program_id(0)\n"
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n@numba.njit\ndef kernel():\n{body}"
                                   f"\ndef triton_kernel():\n{triton}\ndef short():\n    return 1\n")
    global SRC
    saved, SRC = SRC, tmp_path
    try:
        found = long_functions(tmp_path / "m.py")
    finally:
        SRC = saved
    assert found == [f"m.py:1 long ({MAX_FUNCTION_LINES + 1} lines)"]


# Long functions in modules being split on other branches (issue 25: report/, metrics/flops/,
# the command line, the BK-Core entry point); remove each line as its split lands.
def test_no_function_in_the_package_is_longer_than_80_lines():
    found = [f for path in sorted(PACKAGE.rglob("*.py")) for f in long_functions(path)]
    assert not found, "functions over 80 lines:\n" + "\n".join(found)
