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
])
def test_a_usage_error_is_one_line_and_exits_2(capsys, argv, says):
    printed = []
    with pytest.raises(SystemExit) as exit_:
        main(argv, out=printed.append)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and not printed
    assert err.count("\n") == 1 and err.startswith("python -m lwrs.testing: error: "), err
    assert says in err and "Traceback" not in err
