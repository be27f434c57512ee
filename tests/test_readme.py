"""The README's examples run, and CI runs the README's test command."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_commands_in_a_fresh_venv():
    """.ci/run makes a new virtual environment and runs the README's two commands in it, verbatim."""
    script = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in script.splitlines() if line.startswith("python3 -m pip install -e")]
    readme_commands = [block.strip() for block in code_blocks("bash")]
    assert len(commands) == 2, commands
    assert all(command in readme_commands for command in commands), commands
    assert "pytest" in commands[1] and "sphinx" in commands[1] and "lwrs quadratic" in commands[0]
    venv_at = script.index("-m venv")
    assert venv_at < script.index("activate") < script.index(commands[0]), "the venv must be made and used first"


@pytest.mark.parametrize("index", range(3))
def test_python_examples_run(index, capsys):
    blocks = code_blocks("python")
    assert len(blocks) == 3
    if "import torch" in blocks[index]:
        pytest.importorskip("torch")
    namespace: dict = {}
    exec(compile(blocks[index], f"README example {index}", "exec"), namespace)
    diag = namespace["diag"] if "diag" in namespace else namespace["opt"].diagnostics[0]
    assert not diag.skipped and tuple(diag.rates.shape) in {(2,), (4,)}
