"""The package's import graph, read from the source with `ast` (nothing is imported).

- Only `openrlhf_bonesoup/integration/` imports OpenRLHF (docs/architecture.md): every `import openrlhf...`
  and `from openrlhf... import`, wherever it stands in a module (top level, a function, TYPE_CHECKING).
- The demos (`openrlhf_bonesoup/demo/`) are not the library: only the CLI and the demos import them.
- No import cycle among the package's own modules. The cycle check counts module-level imports only
  (those at the top of a module, in a module-level `if`/`try` too, but not under `if TYPE_CHECKING:`):
  they run when the module is imported, so a cycle of them can break start-up. An import inside a
  function runs when the function is called, and is often how a light module defers a heavy one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "openrlhf_bonesoup"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_name(path: Path) -> str:
    parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported_names(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """Absolute names of the modules an import statement imports; `from a import b` gives `a.b` when
    that is one of the package's modules (a submodule), else `a`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per dot after the first
        package = (module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]).split(".")
        package = ".".join(package[: len(package) - node.level + 1])
        base = f"{package}.{base}" if base else package
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith("TYPE_CHECKING")


def module_level_imports(body: list[ast.stmt]):
    """Import statements that run when the module is imported: the body, module-level if/try/with
    blocks included, function and class bodies and `if TYPE_CHECKING:` excluded."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and not is_type_checking(node):
            yield from module_level_imports(node.body)
            yield from module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from module_level_imports(block)
        elif isinstance(node, ast.With):
            yield from module_level_imports(node.body)


def trees() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def openrlhf_imports(tree: ast.Module, module: str) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for name in imported_names(node, module):
                if name == "openrlhf" or name.startswith("openrlhf."):
                    found.append(f"line {node.lineno}: {name}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules of each cycle: every strongly connected component of more than one module."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's algorithm; the package has a few dozen modules
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the package's modules it imports at module level."""
    graph = {module: set() for module in modules}
    for module, tree in modules.items():
        for node in module_level_imports(tree.body):
            graph[module] |= {name for name in imported_names(node, module) if name in modules and name != module}
    return graph


def test_the_package_is_found():
    assert {f"{PACKAGE}.combiners", f"{PACKAGE}.integration.worker", f"{PACKAGE}.cli"} <= MODULES.keys()


def test_only_integration_imports_openrlhf():
    outside = {
        module: found
        for module, tree in trees().items()
        if not module.startswith(f"{PACKAGE}.integration") and (found := openrlhf_imports(tree, module))
    }
    assert not outside, f"only {PACKAGE}/integration/ may import openrlhf (docs/architecture.md): {outside}"


def test_only_the_cli_imports_the_demos():
    demo = f"{PACKAGE}.demo"
    outside = {
        module: sorted(names)
        for module, tree in trees().items()
        if not module.startswith((f"{demo}.", f"{PACKAGE}.cli")) and module != demo
        if (
            names := {
                name
                for node in ast.walk(tree)
                if isinstance(node, ast.Import | ast.ImportFrom)
                for name in imported_names(node, module)
                if name == demo or name.startswith(f"{demo}.")
            }
        )
    }
    assert not outside, f"the library imports the demos: {outside}"


def test_no_import_cycle_among_the_package_modules():
    found = cycles(import_graph(trees()))
    assert not found, f"module-level import cycles: {found}"


# The checks themselves, on small made-up modules: each fails where it should.


@pytest.mark.parametrize(
    "source, found",
    [
        ("import openrlhf", ["line 1: openrlhf"]),
        ("import openrlhf.models as m", ["line 1: openrlhf.models"]),
        ("def f():\n    from openrlhf.models import get_llm_for_sequence_regression", ["line 2: openrlhf.models"]),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from openrlhf import utils", ["line 3: openrlhf"]),
        ("import openrlhf_bonesoup\nfrom openrlhf_bonesoup import combiners", []),
        ("import openrlhfx", []),
    ],
)
def test_openrlhf_imports_are_found_anywhere(source, found):
    assert openrlhf_imports(ast.parse(source), f"{PACKAGE}.combiners") == found


def test_a_cycle_is_found_and_function_level_imports_do_not_count():
    a, b, c = (f"{PACKAGE}.{m}" for m in ("coefficients", "soup", "files"))
    modules = {
        a: ast.parse(f"import {b}"),
        b: ast.parse(f"from {PACKAGE} import files"),
        c: ast.parse(f"try:\n    from {PACKAGE}.coefficients import clean\nexcept ImportError:\n    pass"),
    }
    assert cycles(import_graph(modules)) == [sorted([a, b, c])]
    modules[c] = ast.parse(f"def f():\n    from {PACKAGE}.coefficients import clean")
    assert cycles(import_graph(modules)) == []
    modules[c] = ast.parse(f"from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import {a}")
    assert cycles(import_graph(modules)) == []
