"""Imports run one way: core (the modules at the package root) <- distill / compress <- export <- devices <- apps.

Read with `ast` from the sources, so a lazy import inside a function counts as much as one at the top.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "distill": 1, "compress": 1, "export": 2, "devices": 3, "apps": 4}
# Edges still against the order, each to be removed rather than added to: MAC counting and latency tables live
# in devices/ but pruning and the slim VAE measure with them; QAT trains with distill's trainer and KD's taps
# while KD reads compress' block plans.
KNOWN = {
    ("compress.oneshot", "devices.macs"), ("compress.prune", "devices.macs"), ("compress.prune", "devices.lookup"),
    ("distill.vae", "devices.macs"), ("distill.kd", "compress.blocks"), ("compress.qat", "distill.kd"),
    ("compress.quantize", "distill.trainer"), ("compress.backends", "distill.trainer"), ("compress.quantize", "distill"),
}


def _layer(module: str) -> str:
    head = module.split(".")[0]
    return head if head in LAYERS else "core"


def _imports() -> list[tuple[str, str, bool, list[str], int]]:
    """(module, imported module, at top level, names, line) for every relative import of the package."""
    found = []
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in ("tests", "benchmarks") or relative.parts[0].startswith("."):
            continue
        parts = list(relative.with_suffix("").parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        module = ".".join(p for p in parts if p != "__init__") or "__init__"
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1]
                names = [alias.name for alias in node.names]
                targets = [".".join([*base, node.module])] if node.module else [".".join([*base, n]) for n in names]
                found += [(module, target, id(node) in top, names, node.lineno) for target in targets]
    return found


def test_no_module_imports_a_layer_above_its_own():
    upward = {(module, target) for module, target, *_ in _imports()
              if LAYERS[_layer(target)] > LAYERS[_layer(module)]
              or (_layer(target) != _layer(module) and LAYERS[_layer(target)] == LAYERS[_layer(module)])}
    assert upward - KNOWN == set(), "imports against the layer order"
    assert not any(_layer(target) == "apps" for _, target in upward), "apps/ is what users touch: nothing imports it"
    assert KNOWN - upward == set(), "an edge in KNOWN is gone: take it out of the list"


def test_no_private_name_is_imported_from_another_module():
    private = [(module, line, name) for module, _, _, names, line in _imports() for name in names if name.startswith("_")]
    assert private == []
