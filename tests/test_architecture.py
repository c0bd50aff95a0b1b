"""The package's layering, checked on the source with ``ast`` (nothing is imported but ``patchattn`` itself):

- no import cycle between the modules of ``patchattn`` (imports inside functions count too);
- variants sit below patching: nothing under ``patchattn/variants/`` imports the modules that drive or load
  patched models.

An edge is an explicit import: ``from .x import y`` is an edge to ``patchattn.x``, or to ``patchattn.x.y`` when that
is a module; ``from . import __version__`` is an edge to the package's ``__init__``. The implicit import of parent
packages (``import patchattn.a.b`` runs ``patchattn/__init__.py`` first) is not an edge, or every module would be
in a cycle with the package.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

import pytest

import patchattn

PACKAGE = "patchattn"
#: what a variant must not import: the modules above it (patching, and what drives or loads patched models)
ABOVE_VARIANTS = ("patching", "planner", "training", "cli", "head_search", "loading")


def _package_dirs() -> dict[str, Path]:
    """Package name -> directory; ``patchattn.kernels`` lives outside ``patchattn/`` in an editable install."""
    dirs = {PACKAGE: Path(patchattn.__file__).parent}
    spec = importlib.util.find_spec(f"{PACKAGE}.kernels")
    if spec is not None and spec.submodule_search_locations:
        dirs[f"{PACKAGE}.kernels"] = Path(next(iter(spec.submodule_search_locations)))
    return dirs


def source_modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: name -> (file, is a package ``__init__``)."""
    modules: dict[str, tuple[Path, bool]] = {}

    def walk(name: str, directory: Path) -> None:
        for entry in sorted(os.listdir(directory)):
            path = directory / entry
            if entry == "__init__.py":
                modules[name] = (path, True)
            elif entry.endswith(".py"):
                modules[f"{name}.{entry[:-3]}"] = (path, False)
            elif path.is_dir() and (path / "__init__.py").is_file():
                walk(f"{name}.{entry}", path)

    for name, directory in _package_dirs().items():
        walk(name, directory)
    return modules


MODULES = source_modules()


def _resolve(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The package modules one import statement of ``module`` names."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in MODULES else origin
                   for alias in node.names]
    found = []
    for target in targets:
        if target != PACKAGE and not target.startswith(PACKAGE + "."):
            continue
        while target not in MODULES and "." in target:  # `import patchattn.x.y` of a name that is no module
            target = target.rsplit(".", 1)[0]
        found.append(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (top level, functions, classes)."""
    graph = {}
    for name, (path, is_package) in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = {target for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                       for target in _resolve(node, name, is_package) if target != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles as closed paths: in each strongly connected component of more than one module (Tarjan), the shortest
    cycle through each of its modules, without repeats, so every module in a cycle shows up in one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles, seen = [], set()
    for component in sorted(components, key=min):
        for start in sorted(component):
            cycle = _cycle_through(graph, component, start)
            key = frozenset(zip(cycle, cycle[1:]))
            if key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return cycles


def _cycle_through(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest cycle through ``start`` (breadth first, inside its strongly connected ``component``)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_the_walk_sees_the_package():
    assert {"patchattn", "patchattn.patching", "patchattn.variants", "patchattn.variants.act",
            "patchattn.head_search", "patchattn.kernels"} <= set(MODULES)
    graph = import_graph()
    assert "patchattn.variants.act" in graph["patchattn.variants"]  # `from . import act, ...`
    assert "patchattn.variants.base" in graph["patchattn.variants.act"]  # `from .base import ...`
    assert "patchattn.patching" in graph["patchattn.head_search"]


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    graph = {"a": {"b", "c"}, "b": {"a"}, "c": {"a"}}
    assert find_cycles(graph) == [["a", "b", "a"], ["c", "a", "c"]]


def test_no_import_cycle_inside_the_package():
    cycles = find_cycles(import_graph())
    for cycle in cycles:
        print("import cycle: " + " -> ".join(cycle))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(f"{PACKAGE}.variants")))
def test_variants_do_not_import_what_sits_above_them(module):
    above = {f"{PACKAGE}.{name}" for name in ABOVE_VARIANTS}
    bad = sorted(t for t in import_graph()[module] if t in above or any(t.startswith(a + ".") for a in above))
    assert not bad, f"{module} imports {bad}: variants must not depend on the modules that patch or load models"


# -- generic code names no variant ------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent
GENERIC = [*sorted(str(p.relative_to(REPO)) for p in (REPO / "patchattn" / "training").glob("*.py")), "patchattn/patching.py",
           *sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").glob("*.py"))]


def variant_names_used(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` for every variant name used as a string literal (the whole string) or as an identifier
    (variable, attribute, argument, function/class name, or a part of an imported module's dotted path)."""
    names = set(patchattn.VARIANTS)
    found = []

    def hit(node: ast.AST, text: str | None) -> None:
        if text in names:
            found.append((node.lineno, text))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            hit(node, node.value.strip())
        elif isinstance(node, ast.Name):
            hit(node, node.id)
        elif isinstance(node, ast.Attribute):
            hit(node, node.attr)
        elif isinstance(node, ast.arg):
            hit(node, node.arg)
        elif isinstance(node, ast.keyword) and node.arg is not None:
            hit(node.value, node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            hit(node, node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            module = getattr(node, "module", None) or ""
            for part in module.split("."):
                hit(node, part)
            for alias in node.names:
                for part in alias.name.split("."):
                    hit(node, part)
                hit(node, alias.asname)
    return sorted(found)


def test_the_variant_name_finder_finds_names():
    source = ('import patchattn.variants.moh\nfrom patchattn.variants import sigmoid as s\nx = "gated"\n'
              'if v.variant == "act": pass\ndef f(hyper=1): return cfg.lawcat\n"""the exact attention"""\n')
    assert [name for _, name in variant_names_used(source)] == ["moh", "sigmoid", "gated", "act", "hyper", "lawcat"]


@pytest.mark.parametrize("path", GENERIC)
def test_generic_code_names_no_variant(path):
    used = variant_names_used((REPO / path).read_text(encoding="utf-8"))
    assert not used, (f"{path} names variants {used} (line, name): call the variant's hooks through the registry "
                      "(get_variant(name).calibrate / .auxiliary_loss) instead")
