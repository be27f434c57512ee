"""Three floors, imports pointing down only: applications -> backends -> core.

* core: every ``lwrs.*`` module except the two floors below and the command entry points;
* backends: ``lwrs.backends.*`` (the ``backends/`` folder, installed under that name);
* applications: ``lwrs.apps.*``, ``lwrs.__main__`` and ``lwrs.testing.__main__``.

Every import of every module is read from its source with :mod:`ast`, including
relative imports and imports inside functions, and resolved to a module name
through the package mapping of ``pyproject.toml`` (so an import loop through the
``lwrs.backends`` mapping is seen too). The checker is tested on planted violations.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parent.parent

APPLICATIONS, BACKENDS, CORE = "applications", "backends", "core"
RANK = {CORE: 0, BACKENDS: 1, APPLICATIONS: 2}
ENTRY_POINTS = ("lwrs.__main__", "lwrs.testing.__main__")


def floor(module: str) -> str:
    """The floor of an ``lwrs`` module name."""
    if module in ENTRY_POINTS or module == "lwrs.apps" or module.startswith("lwrs.apps."):
        return APPLICATIONS
    if module == "lwrs.backends" or module.startswith("lwrs.backends."):
        return BACKENDS
    return CORE


def package_dirs(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """``pyproject.toml``'s mapping from package name to folder (the installed names of the source folders)."""
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: root / folder for name, folder in setup["package-dir"].items()}


def source_modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """Every ``lwrs`` module, by its installed name, from the folders the mapping installs."""
    mapping = package_dirs(root)
    modules: dict[str, pathlib.Path] = {}
    for package, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts]
            if any(part in {"__pycache__"} or part.startswith(".") for part in parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            # a folder mapped elsewhere (e.g. lwrs/backends, a link to backends/) is named by its own mapping
            name = ".".join([package, *parts])
            owner = max((p for p in mapping if name == p or name.startswith(p + ".")), key=len)
            if mapping[owner] != folder and not path.is_relative_to(mapping[owner]):
                continue
            modules.setdefault(name, path)
    return modules


def imports_of(name: str, path: pathlib.Path) -> set[str]:
    """Absolute names of every module imported anywhere in the file (top level, functions, relative imports)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            found.add(base_name)
            found |= {f"{base_name}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def resolve(imported: str, modules: dict[str, pathlib.Path]) -> str | None:
    """The longest known ``lwrs`` module that ``imported`` names (or None for a third-party import)."""
    parts = imported.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def violations(modules: dict[str, pathlib.Path]) -> list[str]:
    """Every import that points up a floor, and every cycle between floors in the module graph."""
    graph: dict[str, set[str]] = {}
    bad = []
    for name, path in modules.items():
        targets = {t for t in (resolve(i, modules) for i in imports_of(name, path)) if t and t != name}
        graph[name] = targets
        for target in sorted(targets):
            if RANK[floor(target)] > RANK[floor(name)]:
                bad.append(f"{name} ({floor(name)}) imports {target} ({floor(target)})")
    # a cycle through more than one floor (impossible if the rule above holds, but checked on its own)
    index, low, stack, on_stack, counter = {}, {}, [], set(), [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len({floor(m) for m in component}) > 1:
                bad.append("import cycle across floors: " + " -> ".join(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return bad


def test_the_package_layers_point_down_only():
    modules = source_modules()
    floors = {floor(m) for m in modules}
    assert floors == {CORE, BACKENDS, APPLICATIONS}, floors
    assert {"lwrs.optimizers", "lwrs.backends.torch.optim", "lwrs.apps.cli", "lwrs.__main__"} <= set(modules)
    assert not any(m.startswith("lwrs.backends.backends") for m in modules)  # the link is not read twice
    assert violations(modules) == []


def test_python_dash_m_lwrs_and_the_console_script_reach_the_application():
    import lwrs.__main__ as entry
    from lwrs.apps.cli import main

    assert entry.main is main
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lwrs": "lwrs.apps.cli:main"}


# ---- the checker itself, on planted module sets --------------------------------------------------------

def _plant(tmp_path: pathlib.Path, files: dict[str, str]) -> dict[str, pathlib.Path]:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools]\npackage-dir = { "lwrs" = "lwrs", "lwrs.backends" = "backends" }\n')
    for rel, text in {"lwrs/__init__.py": "", "lwrs/apps/__init__.py": "", "backends/__init__.py": "", **files}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return source_modules(tmp_path)


def test_a_clean_planted_set_passes(tmp_path):
    modules = _plant(tmp_path, {
        "lwrs/core.py": "import math\n",
        "backends/kernel.py": "from lwrs import core\nimport lwrs.core\n",
        "lwrs/apps/tool.py": "from ..core import *\nfrom lwrs.backends import kernel\n",
    })
    assert set(modules) >= {"lwrs.core", "lwrs.backends.kernel", "lwrs.apps.tool"}
    assert violations(modules) == []


@pytest.mark.parametrize("files, culprit", [
    # core -> backend, at the top level
    ({"lwrs/core.py": "import lwrs.backends.kernel\n", "backends/kernel.py": ""}, "lwrs.core (core) imports lwrs.backends.kernel"),
    # core -> application, inside a function, relatively
    ({"lwrs/core.py": "def f():\n    from .apps import tool\n", "lwrs/apps/tool.py": ""},
     "lwrs.core (core) imports lwrs.apps.tool"),
    # backend -> application, relatively through the path mapping (backends/ is lwrs.backends)
    ({"backends/kernel.py": "from ..apps.tool import run\n", "lwrs/apps/tool.py": ""},
     "lwrs.backends.kernel (backends) imports lwrs.apps.tool"),
    # core -> the command entry point
    ({"lwrs/core.py": "import lwrs.__main__\n", "lwrs/__main__.py": ""}, "lwrs.core (core) imports lwrs.__main__"),
])
def test_a_planted_violation_is_found(tmp_path, files, culprit):
    found = violations(_plant(tmp_path, files))
    assert any(v.startswith(culprit) for v in found), found


def test_a_planted_cycle_through_the_mapping_is_found(tmp_path):
    modules = _plant(tmp_path, {
        "backends/kernel.py": "from lwrs.apps import tool\n",  # the upward arrow that closes the loop
        "lwrs/apps/tool.py": "def f():\n    from lwrs.backends import kernel\n",
    })
    found = violations(modules)
    assert any(v.startswith("import cycle across floors") and "lwrs.apps.tool" in v and "lwrs.backends.kernel" in v
               for v in found), found
