"""The package's layers import one way: cli -> search -> workers -> (merge, backends,
estimators, tasks) -> io. A module may import its own layer or those below it, never above."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "evomerge"
# Lower number: lower layer. The zoo (the test fixture models) sits beside search; demo and cli on top.
LAYER = {"io": 0, "errors": 0, "merge": 1, "backends": 1, "estimators": 1, "tasks": 1,
         "workers": 2, "search": 3, "zoo": 3, "demo": 4, "cli": 4}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n.split(".")[1] for n in names if n.startswith("evomerge.") and len(n.split(".")) > 1}


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_its_own_layer_and_those_below(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    if own not in LAYER:
        pytest.skip(f"{own} is not layered")
    above = {name for name in _imports(path) if LAYER.get(name, -1) > LAYER[own]}
    assert not above, f"{path.relative_to(PACKAGE)} imports {sorted(above)} from a layer above {own}"


def test_no_lower_layer_imports_search():
    lower = [p for p in MODULES if p.relative_to(PACKAGE).parts[0] in ("workers", "merge", "backends",
                                                                       "estimators", "io", "tasks")]
    assert lower and not [p for p in lower if "search" in _imports(p)]
