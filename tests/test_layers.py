"""The layering of the code, checked: import-linter's contracts (pyproject.toml) hold, no module takes part in an
import cycle, and no package imports another package's private (underscored) names."""

import ast
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("engine", "hierui", cache_dir=None)


def test_the_import_contracts_hold():
    from importlinter.api import read_configuration
    from importlinter.application.use_cases import lint_imports

    assert len(read_configuration()["contracts_options"]) >= 4, "pyproject.toml declares the import contracts"
    assert lint_imports(cache_dir=None, no_logo=True), "lint-imports: a contract is broken (run it for the report)"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_module_is_part_of_an_import_cycle(graph):
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _package(module: str) -> str:
    """The package a module belongs to for the public-surface rule: engine.<pkg> or hierui.<pkg>."""
    return ".".join(module.split(".")[:2])


def test_packages_import_only_each_others_public_names():
    offences = []
    for path in sorted([*ROOT.glob("engine/**/*.py"), *ROOT.glob("hierui/**/*.py")]):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if node.module.split(".")[0] not in ("engine", "hierui"):
                continue
            if _package(node.module) == _package(module):
                continue
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if private:
                offences.append(f"{module} imports {', '.join(private)} from {node.module}")
    assert offences == [], "\n".join(offences)
