"""hpcdl.data reads in one direction: every module imports only modules before it in LAYERS."""
from __future__ import annotations

import ast
from pathlib import Path

import hpcdl.data

PACKAGE = Path(hpcdl.data.__file__).parent
OUTSIDE_THE_LINE = {"__init__", "convert", "shards"}  # the converter writes what sources read


def _data_imports(module: str) -> set[str]:
    """hpcdl.data modules `module` imports anywhere (top level or inside functions)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("hpcdl.data."):
                found.add(name.split(".")[2])
    return found - {module}


def test_every_data_module_is_on_the_line():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - OUTSIDE_THE_LINE
    assert modules == set(hpcdl.data.LAYERS), "add new modules to hpcdl.data.LAYERS in import order"


def test_imports_only_point_back_along_the_line():
    position = {name: i for i, name in enumerate(hpcdl.data.LAYERS)}
    for module in hpcdl.data.LAYERS:
        for imported in _data_imports(module):
            assert imported in position, f"{module} imports {imported}, which is not on the data line"
            assert position[imported] < position[module], \
                f"{module} imports {imported}, which comes after it: the data path would run in a circle"


def test_the_walker_sees_imports_inside_functions():
    assert "hdf5" in _data_imports("dataset") and "augment" in _data_imports("batches")
