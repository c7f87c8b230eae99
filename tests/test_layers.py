"""Imports run one way: core (the modules at the package root) <- distill <- compress <- export <- devices <- apps.

Compression builds on distillation: QAT distils with the shared trainer and KD's taps, and pruning
writes its students in the teacher-student layer plan (`distill/blocks.py`) that block-level KD
pairs layers by. Read with `ast` from the sources, so a lazy import inside a function counts as
much as one at the top.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "distill": 1, "compress": 2, "export": 3, "devices": 4, "apps": 5}


def _layer(module: str) -> str:
    head = module.split(".")[0]
    return head if head in LAYERS else "core"


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[0] not in ("tests", "benchmarks") and not parts[0].startswith("."):
            found[".".join(p for p in parts if p != "__init__") or "__init__"] = path
    return found


def _imports() -> list[tuple[str, str, list[str], int]]:
    """(module, imported module, names, line) for every relative import of the package, lazy ones included."""
    modules, found = _modules(), []
    for module, path in modules.items():
        package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = [*package[: len(package) - node.level + 1], *([node.module] if node.module else [])]
                names = [alias.name for alias in node.names]
                # `from . import x` names a module; `from .x import y` a module's attribute
                targets = {".".join([*base, n]) if ".".join([*base, n]) in modules else ".".join(base) for n in names}
                found += [(module, target, names, node.lineno) for target in targets]
    return found


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted((module, target, line) for module, target, _, line in _imports()
                    if LAYERS[_layer(target)] > LAYERS[_layer(module)])
    assert upward == []


def test_no_import_cycle_not_even_through_a_function_level_import():
    edges: dict[str, set[str]] = {}
    for module, target, _, _ in _imports():
        edges.setdefault(module, set()).add(target)
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(module):] + [module])}")
        if module in done:
            return
        path.append(module)
        for target in edges.get(module, ()):
            visit(target)
        path.pop()
        done.add(module)

    for module in list(edges):
        visit(module)


def test_no_private_name_is_imported_from_another_module():
    private = [(module, line, name) for module, _, names, line in _imports() for name in names if name.startswith("_")]
    assert private == []
