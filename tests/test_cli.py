"""The README's main command, `lwrs quadratic`, end to end (short runs)."""

from __future__ import annotations

import json

import pytest

from lwrs.apps import cli
from lwrs.apps.quadratic import ROSTER


def test_quadratic_prints_the_table_and_writes_the_figure(capsys, tmp_path):
    assert cli.main(["quadratic", "--steps", "40", "--batch-size", "32", "--seed", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("optimizer")) + 2
    rows = lines[start:start + len(ROSTER)]
    assert [row.split()[0] for row in rows] == [entry.name for entry in ROSTER]
    assert "binding condition" in out and "bound on the mean criterion" in out
    record = json.loads((tmp_path / "quadratic.json").read_text())
    for run in record["runs"]:
        assert 0 <= run["final_loss"] < record["constants"]["initial_gap"], run  # every best run made progress
    assert record["theorem2"]["mean_criterion"] <= record["theorem2"]["bound"]
    png = (tmp_path / "quadratic.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("backend", ["array-api-strict", "torch"])
def test_quadratic_runs_on_other_backends(capsys, tmp_path, backend):
    pytest.importorskip({"torch": "torch", "array-api-strict": "array_api_strict"}[backend])
    assert cli.main(["quadratic", "--steps", "12", "--backend", backend, "--out", str(tmp_path)]) == 0
    assert "clars" in capsys.readouterr().out


def test_quadratic_rejects_bad_options(capsys, tmp_path):
    assert cli.main(["quadratic", "--steps", "20", "--batch-size", "5000", "--out", str(tmp_path)]) == 2
    assert "batch_size must lie in [1, 2048], got 5000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["quadratic", "--steps", "0"])


def test_the_docs_record_is_what_the_default_command_produces(capsys, tmp_path):
    """docs/images/quadratic.json (shown on the Theory page) must match a fresh default run."""
    import pathlib

    committed = json.loads((pathlib.Path(__file__).parent.parent / "docs" / "images" / "quadratic.json").read_text())
    assert cli.main(["quadratic", "--out", str(tmp_path)]) == 0
    fresh = json.loads((tmp_path / "quadratic.json").read_text())
    assert fresh["command"] == committed["command"]
    assert_same_record(fresh["theorem2"], committed["theorem2"])
    assert [run["name"] for run in fresh["runs"]] == [run["name"] for run in committed["runs"]]
    for a, b in zip(fresh["runs"], committed["runs"]):
        assert_same_record(a, b)


def assert_same_record(fresh: dict, committed: dict) -> None:
    """Numbers equal to 1e-9 relative (1e-15 absolute), everything else (strings, bools) exactly."""
    assert fresh.keys() == committed.keys()
    for key, value in committed.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert fresh[key] == pytest.approx(value, rel=1e-9, abs=1e-15), key
        else:
            assert fresh[key] == value, key


def test_record_comparison_tells_numbers_from_strings():
    assert_same_record({"a": 1.0 + 1e-12, "s": "x", "flag": False}, {"a": 1.0, "s": "x", "flag": False})
    with pytest.raises(AssertionError):
        assert_same_record({"a": 1.0, "s": "y"}, {"a": 1.0, "s": "x"})
    with pytest.raises(AssertionError):
        assert_same_record({"a": 1.1, "s": "x"}, {"a": 1.0, "s": "x"})


def test_the_quadratic_compares_every_optimizer_of_the_table():
    from lwrs import table

    names = [e.name for e in ROSTER]
    assert [n for n in names if n != "lars+warmup"] == list(table.names())
    assert names.index("lars+warmup") == names.index("lars") + 1


@pytest.mark.parametrize("command", [["quadratic", "--steps", "10"], ["reproduce", "--from", "docs/results/results.json"],
                                     ["train", "--dataset", "digits", "--epochs", "1"]])
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(capsys, tmp_path, command):
    """``--out`` was made only after the whole run: a path that is a file lost every result, with a traceback
    and exit 1 (review-cli-3, 6)."""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert cli.main([*command, "--out", str(blocked / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lwrs {command[0]}: cannot write to --out ") and err.count("\n") == 1
    assert not (tmp_path / "quadratic.json").exists()


def test_reproduce_from_a_bad_file_or_with_training_options_is_refused_in_one_line(capsys, tmp_path):
    """Tracebacks for a missing or invalid file, and --only/--quick/--jobs accepted and ignored (review-cli-3, 10)."""
    pytest.importorskip("matplotlib")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    for source, reason in ((tmp_path / "missing.json", "No such file"), (bad_json, "Expecting"),
                           (empty, "missing 'preset'")):
        assert cli.main(["reproduce", "--from", str(source), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "is not a results.json of lwrs reproduce" in err and reason in err and err.count("\n") == 1
    for extra in (["--quick"], ["--only", "fig1"], ["--jobs", "3"]):
        assert cli.main(["reproduce", "--from", "docs/results/results.json", *extra, "--out", str(tmp_path / "o")]) == 2
        assert f"{extra[0]} has no use with --from" in capsys.readouterr().err


def test_a_non_number_for_a_count_option_gets_a_plain_message(capsys):
    with pytest.raises(SystemExit):
        cli.main(["quadratic", "--steps", "abc"])
    err = capsys.readouterr().err
    assert "argument --steps: must be a positive integer, got 'abc'" in err and "_positive" not in err


def test_train_names_a_bad_momentum_as_its_option(capsys, tmp_path):
    """It said "group 0: momentum must lie in [0.0, 1.0)", about a group the user never made (review-cli-3, 12)."""
    assert cli.main(["train", "--dataset", "digits", "--momentum", "1.5", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "lwrs train: momentum must lie in [0, 1), got 1.5\n"
