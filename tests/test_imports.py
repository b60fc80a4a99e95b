"""The package's import graph (every import, also inside functions), read with ``ast``:
``flwr`` only in ``cnfgnn/flower/`` and ``cnfgnn/deploy/`` (which drives Flower's processes
and CLI), and no import cycle among cnfgnn modules."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "cnfgnn"
#: The only packages that may import flwr.
FLOWER_PACKAGES = ("cnfgnn.flower", "cnfgnn.deploy")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], bool]:
    """(cnfgnn modules that ``name`` imports, whether it imports flwr)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    flwr = False
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            flwr |= target.split(".")[0] == "flwr"
            if target in modules and target != name:
                found.add(target)
    return found, flwr


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    graph, flwr_users = {}, []
    for name, path in modules.items():
        graph[name], uses_flwr = _imports(name, path, modules)
        if uses_flwr:
            flwr_users.append(name)
    return graph, flwr_users


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), leaving out a
    package's ``__init__`` importing its own submodules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [c for c in out if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]


def test_only_the_flower_and_deploy_packages_import_flwr():
    graph, flwr_users = _graph()
    assert "cnfgnn.flower.client_app" in flwr_users  # the walk sees flwr imports at all
    outside = [
        m for m in flwr_users if not any(m == p or m.startswith(p + ".") for p in FLOWER_PACKAGES)
    ]
    assert outside == [], f"modules outside {FLOWER_PACKAGES} import flwr: {outside}"


def test_no_import_cycle_among_cnfgnn_modules():
    graph, _ = _graph()
    assert "cnfgnn.api" in graph["cnfgnn.cli"]  # the walk sees cnfgnn imports at all
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": set()}) == [
        ["a.x", "a.y", "a.z"]
    ]
