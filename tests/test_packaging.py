"""The wheel a user installs: license, type marker, every package, package data, metadata, entry point."""

from __future__ import annotations

import configparser
import email
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

import lwrs

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _setuptools_can_build() -> bool:
    """The declared build backend is importable here (then the build needs no download)."""
    try:
        import setuptools
    except ImportError:
        return False
    needed = PYPROJECT["build-system"]["requires"][0].split(">=")[1]
    have = tuple(int(part) for part in setuptools.__version__.split(".")[:2])
    return have >= tuple(int(part) for part in needed.split("."))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(ROOT)]
    if _setuptools_can_build():
        command.insert(4, "--no-build-isolation")
    subprocess.run(command, check=True, cwd=out, timeout=300)
    (path,) = out.glob("lwrs-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (member,) = [n for n in wheel.namelist() if n.split("/")[0].endswith(".dist-info") and n.endswith("/" + name)]
    return wheel.read(member).decode()


def _source_packages() -> dict[str, pathlib.Path]:
    """Every package of the tree under the name it is installed as (backends/ becomes lwrs.backends)."""
    found = {}
    for top, prefix in ((ROOT / "lwrs", "lwrs"), (ROOT / "backends", "lwrs.backends")):
        for init in top.rglob("__init__.py"):
            relative = init.parent.relative_to(top)
            if "__pycache__" in relative.parts or (top.name == "lwrs" and relative.parts[:1] == ("backends",)):
                continue  # lwrs/backends is the development symlink to backends/
            found[".".join((prefix, *relative.parts))] = init.parent
    return found


def test_license_and_type_marker_are_in_the_wheel(wheel):
    names = wheel.namelist()
    license_text = _dist_info(wheel, "licenses/LICENSE")
    assert license_text == (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "lwrs developers" in license_text
    assert "lwrs/py.typed" in names


def test_every_package_and_its_data_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    packages = _source_packages()
    assert {"lwrs", "lwrs.backends", "lwrs.backends.torch"} <= set(packages)
    for module, folder in packages.items():
        installed = module.replace(".", "/")
        for source in folder.iterdir():
            if source.is_file() and source.suffix in {".py", ".cpp"}:
                assert f"{installed}/{source.name}" in names, f"{source.relative_to(ROOT)} missing from the wheel"


def test_metadata_says_what_the_package_is(wheel):
    metadata = email.message_from_string(_dist_info(wheel, "METADATA"))
    assert metadata["Name"] == "lwrs"
    assert metadata["Version"] == lwrs.__version__, "the wheel's version is lwrs.__version__ (what --version prints)"
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Author"] == "lwrs developers"
    classifiers = metadata.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and "Programming Language :: Python :: 3" in classifiers
    extras = set(metadata.get_all("Provides-Extra"))
    assert extras == set(PYPROJECT["project"]["optional-dependencies"])
    assert "nvidia" not in "".join(metadata.get_all("Requires-Dist")), "no CUDA wheel is a declared dependency"


def test_the_entry_point_names_a_function_in_the_wheel(wheel):
    entry_points = configparser.ConfigParser()
    entry_points.read_string(_dist_info(wheel, "entry_points.txt"))
    module, function = entry_points["console_scripts"]["lwrs"].split(":")
    assert f"{module.replace('.', '/')}.py" in wheel.namelist()
    source = wheel.read(f"{module.replace('.', '/')}.py").decode()
    assert f"def {function}(" in source


def test_the_readme_says_what_every_extra_installs():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What each extra installs", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    named = {row.split("`")[1] for row in rows}
    assert named == set(PYPROJECT["project"]["optional-dependencies"]), named
    for row in rows:  # and its row names every distribution the extra declares (the review found sybil missing)
        extra, installs = row.split("|")[1].strip(" `"), row.split("|")[2]
        listed = {name.lower().replace("_", "-") for name in installs.split("`")[1::2]}
        declared = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")
                    for req in PYPROJECT["project"]["optional-dependencies"][extra]}
        assert declared <= listed, (extra, declared - listed)


def test_lwrs_version_prints_the_wheels_version(wheel):
    """`lwrs --version` (the console script's function) says the version the wheel's metadata declares."""
    metadata = email.message_from_string(_dist_info(wheel, "METADATA"))
    entry_points = configparser.ConfigParser()
    entry_points.read_string(_dist_info(wheel, "entry_points.txt"))
    module, function = entry_points["console_scripts"]["lwrs"].split(":")
    done = subprocess.run([sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())",
                           "--version"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"lwrs {metadata['Version']}"
