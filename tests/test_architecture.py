"""The shape of the code: contracts in one leaf package, no core module importing a built-in
plugin, and no import cycle among prefkit's modules (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "prefkit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (``from a import b`` counts ``a``
    and, when ``a.b`` is a module, ``a.b``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def graph() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        targets = {t for t in imports_of(path) if t in MODULES and t != name}
        # importing a package runs its __init__, but a package's __init__ importing its own
        # submodules is not an arrow back up
        edges[name] = {t for t in targets if not name.startswith(t + ".")}
    return edges


def test_no_core_module_imports_a_builtin_plugin():
    offenders = {name: sorted(t for t in imports_of(path) if t.split(".")[0] == "prefkit_builtins")
                 for name, path in MODULES.items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_contracts_import_nothing_else_from_prefkit():
    for name, path in MODULES.items():
        if name == "prefkit.api" or name.startswith("prefkit.api."):
            outside = {t for t in imports_of(path) if t.split(".")[0] == "prefkit" and not t.startswith("prefkit.api")}
            assert not outside, (name, outside)


def test_no_import_cycle():
    _check_cycles(graph())


def test_the_cycle_check_can_fail():
    import pytest

    with pytest.raises(AssertionError, match="import cycle: a -> b -> a"):
        _check_cycles({"a": {"b"}, "b": {"a"}, "c": set()})
    _check_cycles({"a": {"b"}, "b": set()})


def _check_cycles(edges: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
