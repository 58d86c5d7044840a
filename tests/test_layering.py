"""The packages form one chain that follows the data flow, with no import cycles of any size.

compressor -> profilers -> predictors -> search -> deploy -> nasprune (orchestration: the CLI app and
the compress pipeline). Inside compressor the sub-packages form a chain too: core -> elastic ->
quant -> recovery, with ``compressor.cli`` (the model and recovery commands) above them all.

A module may import only its own layer and layers below it, at module level *and* inside functions:
a lazy import is still a dependency, and a cycle through lazy imports is still a cycle (it only
moves the failure from import time to the first call).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAIN = ["compressor", "profilers", "predictors", "search", "deploy", "nasprune"]
COMPRESSOR_CHAIN = ["core", "elastic", "quant", "recovery", "cli"]


def _imports(path: Path, known: dict[str, Path] | None = None) -> set[str]:
    """Every first-party module ``path`` imports, lazily or not, resolved to module names in ``known``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` depends on pkg.mod when it is a module, on pkg otherwise
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = {name for name in found if name.split(".")[0] in CHAIN}
    if known is None:
        return {name.rpartition(".")[0] if name.count(".") > 1 else name for name in found}
    resolved = set()
    for target in found:
        while target and target not in known:  # `from pkg.mod import x` where x is a name
            target = target.rpartition(".")[0]
        if target:
            resolved.add(target)
    return resolved


def _modules() -> dict[str, Path]:
    out = {}
    for package in CHAIN:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _rank(module: str) -> tuple[int, int]:
    """(package rank, sub-package rank): a module may import modules of rank <= its own."""
    parts = module.split(".")
    top = CHAIN.index(parts[0])
    if parts[0] != "compressor" or len(parts) == 1:
        return top, len(COMPRESSOR_CHAIN) if parts[0] == "compressor" else 0
    return top, COMPRESSOR_CHAIN.index(parts[1])


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_every_compressor_module_is_in_a_sub_package():
    loose = [p.name for p in (ROOT / "compressor").glob("*.py") if p.stem not in ("__init__", "cli")]
    assert not loose, f"compressor/ modules outside core/elastic/quant/recovery: {loose}"
    for sub in COMPRESSOR_CHAIN[:-1]:
        assert (ROOT / "compressor" / sub / "__init__.py").exists()


def test_imports_follow_the_data_flow():
    violations = []
    for name, targets in _graph().items():
        for target in targets:
            if target == "compressor":  # the package root holds only __version__
                continue
            if _rank(target) > _rank(name):
                violations.append(f"{name} imports {target}")
    assert not violations, "imports against the data flow:\n" + "\n".join(sorted(violations))


def test_no_import_cycles_lazy_imports_included():
    cycles = _cycles(_graph())
    assert not cycles, "module import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_lazy_violation_and_a_lazy_cycle(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from deploy.bundle import read_manifest\n")
    assert _imports(bad) == {"deploy.bundle"}
    assert _rank("compressor.core.errors") < _rank("compressor.elastic.extract") < _rank("profilers.api")
    assert _rank("compressor.recovery.train") > _rank("compressor.quant.quantize")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert _cycles({"a": {"b"}, "b": set()}) == []
