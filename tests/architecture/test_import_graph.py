"""The package's rooms and their imports (every import statement, also those inside functions): no cycle between
modules, and every import between rooms points down the layers named in hf_sparse_ift/__init__.py."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "hf_sparse_ift"
# Lower numbers are lower rooms: a module may import its own room and the rooms below it.
LAYERS = {
    "models": 0,
    "_lazy": 1,
    "errors": 1,
    "checks": 1,
    "resources": 1,
    "data": 2,
    "kernels": 2,
    "sparsity": 2,
    "training": 3,
    "evaluation": 3,
    "hub": 3,
    "study": 4,
    "cli": 5,
    "__init__": 5,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The hf_sparse_ift modules `path` imports (``from . import x`` counts as the module x when it is one)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("hf_sparse_ift")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("hf_sparse_ift"):
                target = node.module
            else:
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    return {name for name in found if name in MODULES}


SOURCES = [p for p in ROOT.rglob("*.py") if "builtin" not in p.parts]
MODULES = {_module_name(p): p for p in SOURCES}
GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def test_every_room_has_a_layer():
    assert {_room(m) for m in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    # The package itself (its version, its lazily loaded names) is no room: Python imports it before any module of it.
    up = sorted(t for t in GRAPH[module] if t != "hf_sparse_ift" and LAYERS[_room(t)] > LAYERS[_room(module)])
    assert not up, f"{module} imports {up}, from a higher room"


def test_no_import_cycle():
    """Cycles between modules; a package's __init__ importing its own submodules (lazily) is not one."""
    state, stack, cycles = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if MODULES[target].name == "__init__.py" and module.startswith(target + "."):
                continue  # a submodule importing its own package's names
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, cycles[:3]


def test_evaluation_imports_nothing_from_training():
    assert not [(m, t) for m in GRAPH if _room(m) == "evaluation" for t in GRAPH[m] if _room(t) == "training"]


def test_the_modeling_file_defines_no_autograd_function_and_no_from_pretrained():
    modeling = ast.parse((ROOT / "models" / "sparse_wide_gpt" / "modeling_sparse_wide_gpt.py").read_text())
    functions = {n.name for n in ast.walk(modeling) if isinstance(n, ast.FunctionDef)}
    assert "from_pretrained" not in functions
    assert not [
        n.name
        for n in ast.walk(modeling)
        if isinstance(n, ast.ClassDef) and any(ast.unparse(b).endswith("autograd.Function") for b in n.bases)
    ]
