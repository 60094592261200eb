"""The package layers, read from the source: what may import what, and no import cycles.

Every import counts, also those inside functions: a cycle that only closes at call time still
breaks whoever imports the modules in another order (and makes them hard to reason about)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("node", "emulation", "testbed")
# package -> the packages of ours it may import (docs/architecture.md)
ALLOWED = {"node": set(), "emulation": {"node"}, "testbed": {"node", "emulation"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Modules of ours that `path` imports, anywhere in its body, resolved to module names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    out = {}
    for mod, path in modules.items():
        deps = set()
        for imp in imports_of(path):
            while imp and imp not in modules:  # `from pkg.mod import Class` names the module pkg.mod
                imp = imp.rpartition(".")[0]
            if imp and imp != mod:
                deps.add(imp)
        out[mod] = deps
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), excluding a package's
    __init__ re-exporting its own submodules."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if _reexport(v, w):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def _reexport(importer: str, imported: str) -> bool:
    """A package's __init__ importing its own submodules is how a package exports them."""
    return imported.startswith(importer + ".")


def test_the_graph_is_read():
    g = graph()
    assert "emulation.zygote" in g and "testbed.runner" in g
    assert "emulation.hostmem" in g["emulation.zygote"] and "node.protocol" in g["node.agent"]


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_the_layers_below_it(package):
    wrong = {(m, d) for m, deps in graph().items() if m.split(".")[0] == package
             for d in deps if d.split(".")[0] not in ALLOWED[package] | {package}}
    assert not wrong, f"imports across the layers: {sorted(wrong)}"


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"p": {"p.x"}, "p.x": {"p"}}) == []  # a package re-exporting its module
