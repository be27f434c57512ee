"""The core (lwrs/) is written against the array API only: it imports no array library."""

from __future__ import annotations

import ast
import pathlib

import lwrs

ARRAY_LIBRARIES = {"numpy", "torch", "cupy", "jax", "jaxlib", "array_api_strict", "dask", "tensorflow"}
CORE = pathlib.Path(lwrs.__file__).parent


def imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_imports_no_array_library():
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 7, f"expected the core modules under {CORE}, found {files}"
    offenders = {f.name: sorted(imported_roots(f) & ARRAY_LIBRARIES) for f in files}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_backends_are_installed_as_a_subpackage():
    import lwrs.backends

    assert pathlib.Path(lwrs.backends.__file__).parent.name == "backends"
