"""The package's layering, read from the source with ``ast`` (nothing is imported).

The subpackages are the pipeline, in this order; a module may import its own subpackage
and those before it, never one after it (the engine never imports the table, the table
never the plots). No two modules import each other (directly or around a loop), none
imports another module's private ``_name``, none grows past 400 lines, and no module name
shadows a standard-library module or a public function of the package.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wdanalysis"
#: bottom to top; ``errors`` is the one module every layer may use
ORDER = (
    "errors",
    "storage",
    "loaders",
    "weights",
    "engine",
    "table",
    "stats",
    "plots",
    "tracking",
    "train",
    "demo",
    "cli",
)
#: outside the order: the package's lazy re-exports, ``python -m`` and the old paths
SHELLS = {"wdanalysis", "wdanalysis.__main__", "wdanalysis.old_paths"}
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _import_nodes(path: Path, name: str | None = None):
    """``(node, [absolute dotted names it imports])`` for every import in ``path``."""
    package = name or _module_name(path)
    package = package if path.name == "__init__.py" else package.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield node, [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            # ``from wdanalysis.engine import c_kernel`` names the submodule; a plain name
            # (a class, a function) falls back to the module that defines it, below.
            yield node, [f"{base}.{alias.name}" for alias in node.names]


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every wdanalysis module ``path`` imports, at module level or inside functions."""
    found = set()
    for _, names in _import_nodes(path):
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) - {name} for name, path in modules.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return ORDER.index(parts[1]) if len(parts) > 1 and parts[1] in ORDER else None


def test_the_import_parser_sees_known_edges():
    graph = _graph()
    assert "wdanalysis.engine.streaming" in graph["wdanalysis.table.comparison"]
    assert "wdanalysis.engine.decomposition" in graph["wdanalysis.engine.streaming"]
    assert "wdanalysis.engine.c_kernel" in graph["wdanalysis.engine.decomposition"]


def test_every_module_has_a_place_in_the_order():
    homeless = [m for m in _modules() if m not in SHELLS and _layer(m) is None]
    assert not homeless, f"put these modules in a subpackage of ORDER: {homeless}"


@pytest.mark.parametrize("layer", ORDER)
def test_no_layer_imports_one_above_it(layer):
    graph = _graph()
    bad = {
        (source, target)
        for source, targets in graph.items()
        if _layer(source) == ORDER.index(layer)
        for target in targets
        # the root package only re-exports: the command line alone may use it (__version__)
        if (target == "wdanalysis" and layer != ORDER[-1])
        or (_layer(target) or 0) > ORDER.index(layer)
    }
    assert not bad, f"{layer} imports from above it: {sorted(bad)}"


def test_no_import_cycles_between_modules():
    # A package __init__ that re-exports is an edge to its modules, so cycles through
    # __init__ files count too; only the root's lazy re-exports are left out.
    graph = {k: v - {"wdanalysis"} for k, v in _graph().items() if k != "wdanalysis"}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(name: str, path: Path, known: set[str]) -> list[str]:
    """``from other import _x`` and ``other_module._x`` where other is a wdanalysis module."""
    found, aliases = [], {}
    for node, names in _import_nodes(path, name):
        for alias, full in zip(node.names, names, strict=True):
            if isinstance(node, ast.ImportFrom) and full in known:  # a module, bound by name
                aliases[alias.asname or alias.name] = full
            elif isinstance(node, ast.ImportFrom) and _private(alias.name):
                source = full.rpartition(".")[0]
                if source in known and source != name:
                    found.append(f"{source}.{alias.name}")
            elif isinstance(node, ast.Import) and alias.asname and full in known:
                aliases[alias.asname] = full
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _private(node.attr)
        ):
            found.append(f"{aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    modules = _modules()
    known = set(modules)
    bad = {
        name: uses for name, path in modules.items() if (uses := _private_uses(name, path, known))
    }
    assert not bad, f"make these public or keep them in their module: {bad}"


def test_the_private_name_check_can_fail(tmp_path):
    bad = PACKAGE / "table" / "bad.py"  # never written: only parsed, from tmp_path
    bad = tmp_path / bad.name
    bad.write_text(
        "from wdanalysis.table.comparison import _bind\n"
        "from wdanalysis.engine import streaming\n"
        "streaming._numel((1,))\n"
    )
    known = set(_modules())
    assert _private_uses("bad", bad, known) == [
        "wdanalysis.table.comparison._bind",
        "wdanalysis.engine.streaming._numel",
    ]


def test_no_module_over_400_lines():
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules: {long}"


def _exports(package: str) -> set[str]:
    """The names a package's ``__init__`` lists in ``__all__`` or its lazy ``_LAZY`` table."""
    tree = ast.parse((PACKAGE.parent / package.replace(".", "/") / "__init__.py").read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id in ("__all__", "_LAZY") for t in targets):
                value = node.value
                items = value.keys if isinstance(value, ast.Dict) else getattr(value, "elts", [])
                names |= {i.value for i in items if isinstance(i, ast.Constant)}
    return names


def test_module_names_shadow_no_standard_module_and_no_public_function():
    # ``wdanalysis.cli.main`` beside the function ``main`` that cli exports would be
    # shadowed by it; ``wdanalysis.compare`` likewise by :func:`wdanalysis.compare`.
    stdlib = set(sys.stdlib_module_names)
    modules = _modules()
    bad = []
    for name in modules:
        parent, _, leaf = name.rpartition(".")
        if parent and (leaf in stdlib or leaf in _exports(parent)):
            bad.append(name)
    assert not bad, f"rename: {bad}"
    assert "compare" in _exports("wdanalysis") and "main" in _exports("wdanalysis.cli")


@pytest.mark.parametrize("layer", [layer for layer in ORDER if layer != "errors"])
def test_every_subpackage_says_what_it_holds_and_may_import(layer):
    docstring = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
    assert docstring and "import" in docstring.lower(), f"wdanalysis/{layer}/__init__.py"
