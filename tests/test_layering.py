"""The packages form one chain that follows the data flow, with no import cycles.

compressor (core) -> profilers -> predictors -> deploy -> nasprune (orchestration: CLI app,
pipeline, search driver). A package may import only itself and packages below it, at module
level *and* inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAIN = ["compressor", "profilers", "predictors", "deploy", "nasprune"]


def _imports(path: Path, with_lazy: bool = True) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = ast.walk(tree) if with_lazy else tree.body
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in CHAIN}


def _modules() -> dict[str, Path]:
    out = {}
    for package in CHAIN:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def test_packages_import_only_downward():
    violations = []
    for name, path in _modules().items():
        rank = CHAIN.index(name.split(".")[0])
        for target in _imports(path):
            if CHAIN.index(target.split(".")[0]) > rank:
                violations.append(f"{name} imports {target}")
    assert not violations, "imports against the data flow:\n" + "\n".join(violations)


def test_no_module_level_import_cycles():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target in _imports(path, with_lazy=False):
            while target and target not in modules:  # `from pkg.mod import x` where x is a name
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, "module import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from deploy.bundle import read_manifest\n")
    assert _imports(bad) == {"deploy.bundle"}
