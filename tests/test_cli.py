"""The README's main command, `lwrs demo`, end to end (short runs)."""

from __future__ import annotations

import pytest

from lwrs import cli
from lwrs.demo import ROSTER


def test_demo_prints_a_row_per_optimizer(capsys):
    assert cli.main(["demo", "--steps", "40", "--batch-size", "32", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[3:]]
    assert rows == [entry.name for entry in ROSTER]
    for line in out.splitlines()[3:]:
        final = float(line.split()[2])
        assert 0 <= final < 189, line  # every optimizer's best run made progress from f(w0) - f* = 189


@pytest.mark.parametrize("backend", ["array-api-strict", "torch"])
def test_demo_runs_on_other_backends(capsys, backend):
    pytest.importorskip({"torch": "torch", "array-api-strict": "array_api_strict"}[backend])
    assert cli.main(["demo", "--steps", "12", "--backend", backend]) == 0
    assert "clars" in capsys.readouterr().out


def test_demo_rejects_bad_options(capsys):
    assert cli.main(["demo", "--steps", "20", "--batch-size", "5000"]) == 2
    assert "batch_size must lie in [1, 2048], got 5000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--steps", "0"])
