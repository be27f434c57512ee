"""``python -m lwrs.testing`` usage errors: one line on stderr and exit status 2, apart from 1 ("does not conform")."""

from __future__ import annotations

import pytest

from lwrs.testing.__main__ import main

pytest.importorskip("torch")


@pytest.mark.parametrize("argv, says", [
    (["lwrs.backends.torch.LARS", "--option", "foo=1"], "TypeError: LARS.__init__() got an unexpected keyword argument 'foo'"),
    (["lwrs.backends.torch.LARS", "--fix", "nesterov=maybe"], "lars convention nesterov='maybe' is not one the core supports"),
    (["lwrs.backends.torch.LARS", "--fix", "nosuch=1"], "lars has no convention 'nosuch'"),
    (["lwrs.backends.torch.LARS", "--option", "momentum"], "--option must be NAME=VALUE, got 'momentum'"),
    (["lwrs.lars", "--option", "foo=1"], "unexpected keyword argument 'foo'"),
    (["nosuch_module_xyz.Opt"], "cannot import any module of 'nosuch_module_xyz.Opt'"),
    (["lwrs.backends.torch.NoSuch"], "cannot find lwrs.backends.torch.NoSuch"),
    # review-kit-3, 7: the wrong driver gave "DOES NOT CONFORM" (exit 1) or a traceback; --rst ignored the optimizer
    (["lwrs.lars", "--driver", "jax"], "could not take a first step on any problem"),
    (["lwrs.lars", "--rst", "page.rst"], "--rst writes the page of every installed implementation"),
])
def test_a_usage_error_is_one_line_and_exits_2(capsys, argv, says):
    printed = []
    with pytest.raises(SystemExit) as exit_:
        main(argv, out=printed.append)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and not printed
    assert err.count("\n") == 1 and err.startswith("python -m lwrs.testing: error: "), err
    assert says in err and "Traceback" not in err


def test_rst_to_a_path_that_cannot_be_written_is_one_line_and_an_existing_page_survives_a_failure(
        capsys, tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["--rst", str(blocked / "page.rst")], out=lambda _: None)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "cannot write" in err
    page = tmp_path / "page.rst"
    page.write_text("the old page")
    import lwrs.testing.__main__ as cli

    def broken():
        raise RuntimeError("a peer failed")

    monkeypatch.setattr(cli, "page", broken)
    with pytest.raises(RuntimeError):
        main(["--rst", str(page)], out=lambda _: None)
    assert page.read_text() == "the old page"  # it was truncated before the page was made


def test_a_functional_optimizer_under_the_jax_driver_is_a_usage_error(capsys, tmp_path, monkeypatch):
    """An init/step object of one's own run with ``--driver jax`` ended in an AttributeError traceback."""
    (tmp_path / "my_optimizers.py").write_text(
        "from types import SimpleNamespace\n"
        "def sgd(learning_rate, beta=0.9, eta=0.001, weight_decay=0.0):\n"
        "    return SimpleNamespace(init=lambda p: 0, step=lambda p, g, s: (p, s))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        main(["my_optimizers.sgd", "--driver", "jax"], out=lambda _: None)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
