"""The README's examples run, and CI runs the README's test command."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3")]
    assert len(ci_lines) == 1
    assert ci_lines[0] in [block.strip() for block in code_blocks("bash")]


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
