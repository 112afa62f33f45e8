"""The package floors and the import graph, read from the source with `ast` (nothing is imported).

Each package is one floor of the pipeline; a module may import only its own floor or a lower one:

    0 clip_stage.core   1 clip_stage.data   2 clip_stage (AddressCLIP)   3 conversations
    4 llava_address (training)   5 llava_address.eval   6 llava_address.apps

Imports are collected at module level AND inside functions (a lazy import still couples the floors).
The module-level graph must have no cycle; a cycle that needs a function-level edge is reported too,
since it is the same coupling, merely deferred.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("clip_stage", "conversations", "llava_address")

# most specific prefix first
FLOORS = (
    ("clip_stage.core", 0),
    ("clip_stage.data", 1),
    ("clip_stage", 2),
    ("conversations", 3),
    ("llava_address.eval", 5),
    ("llava_address.apps", 6),
    ("llava_address", 4),
)


def floor_of(module: str) -> int:
    for prefix, floor in FLOORS:
        if module == prefix or module.startswith(prefix + "."):
            return floor
    raise AssertionError(f"{module}: in no floor")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import names (`a.b.c` may be a function `c` in module `a.b`)."""
    while name:
        if name in modules:
            return name
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = _resolve(alias.name, modules)
                    if target:
                        found.append((target, child.lineno, top))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_pkg else module.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    stem = ".".join(base + ([child.module] if child.module else []))
                else:
                    stem = child.module or ""
                for alias in child.names:
                    target = _resolve(f"{stem}.{alias.name}", modules)
                    if target:
                        found.append((target, child.lineno, top))
            visit(child, inner)

    visit(tree, True)
    # `if TYPE_CHECKING:` blocks never run; they are not couplings
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    skip.add(sub.lineno)
    return [f for f in found if f[1] not in skip and f[0] != module]


def _graph(level_only: bool) -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, _line, top in imports_of(module, path, modules):
            if top or not level_only:
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
            strong(v)
    return out


def _drop_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's `__init__` re-exporting its children is not a circle with them."""
    modules = set(graph)
    packages = {m for m in modules if (ROOT / m.replace(".", "/") / "__init__.py").exists()}
    return {m: {t for t in ts if t not in packages} for m, ts in graph.items()}


def test_every_module_sits_on_a_floor():
    for module in project_modules():
        floor_of(module)


def test_no_module_imports_a_higher_floor():
    modules = project_modules()
    bad = []
    for module, path in modules.items():
        mine = floor_of(module)
        for target, line, top in imports_of(module, path, modules):
            if floor_of(target) > mine:
                where = "module level" if top else "inside a function"
                bad.append(f"{path.relative_to(ROOT)}:{line} ({where}): {module} (floor {mine}) "
                           f"imports {target} (floor {floor_of(target)})")
    assert not bad, "imports reaching up a floor:\n" + "\n".join(bad)


def test_module_level_imports_have_no_cycle():
    cycles = _cycles(_drop_package_inits(_graph(level_only=True)))
    assert not cycles, "module-level import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_function_level_imports_have_no_cycle_either():
    cycles = _cycles(_drop_package_inits(_graph(level_only=False)))
    assert not cycles, "import circles through function-level imports: " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    # guard the walker itself: a lazy import and a relative import are both found
    modules = project_modules()
    src = ("from .fs import atomic_write\n"
           "def f():\n    from clip_stage.data import build\n    import llava_address.eval.scoring\n")
    fake = tmp_path / "probe.py"
    fake.write_text(src)
    found = imports_of("clip_stage.core._probe", fake, modules)
    assert ("clip_stage.core.fs", 1, True) in found
    assert ("clip_stage.data.build", 3, False) in found
    assert ("llava_address.eval.scoring", 4, False) in found
