"""The conformance kit (lwrs.testing): it names each peer's known conventions, and catches planted bugs.

The peers run themselves (timm's Lars loaded from its file, pytorch_optimizer's LARS, optax.lars,
torch.optim.SGD); the expected conventions are read off their source, independently of the kit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lwrs
from lwrs.backends.torch.conformance import assert_implements as torch_assert_implements
from lwrs.backends.torch.conformance import check as torch_check
from lwrs.backends.torch.conformance import load_timm_lars
from lwrs.testing import ConformanceError, FunctionalDriver, assert_implements, battery, check, conventions
from lwrs.testing.__main__ import main, page_report


def timm_report(**options):
    return page_report("timm.optim.Lars", "lars", **options)  # the docs page's run, shared with its test


def unmatched(report):
    return {r.problem: r.divergence for r in report.best.problems if not r.matched}


def test_timm_default_conventions():
    report = timm_report()
    assert report.best.convention == dict(weight_decay_form="sum_of_norms", nesterov=False, adapt="all_if_decay",
                                          decay="all", eps=1e-8, larc_clip=False)
    assert report.best.max_error < 1e-13
    assert set(unmatched(report)) == {"varying_lr"}  # timm multiplies a buffer of raw steps by the current lr
    assert any("outside the momentum buffer" in d for d in report.diagnoses)
    assert not report.conforms and "DOES NOT CONFORM" in report.text()


def test_timm_trust_clip_at_zero_norm_layers_with_lr_above_one():
    report = timm_report(trust_clip=True)
    assert report.best.convention["larc_clip"] is True
    div = unmatched(report)["large_lr"]
    assert (div.step, div.layer_name) == (0, "fc1.weight")  # the zero-initialised layer, lr = 1.5
    assert "implied trust ratio 0.666667 (= 1/lr)" in div.note
    assert any("trust_clip" in d for d in report.diagnoses)


def test_pytorch_optimizer_conventions():
    report = page_report("pytorch_optimizer.LARS", "lars")
    assert report.best.convention == dict(weight_decay_form="sum_of_norms", nesterov=False, adapt="ndim>1",
                                          decay="ndim>1", eps=0.0, larc_clip=False)
    div = unmatched(report)
    assert set(div) == {"varying_lr", "zero_gradient"}
    zero = div["zero_gradient"]
    assert (zero.step, zero.layer_name) == (0, "frozen.weight")
    assert "implied trust ratio 2.5 (= eta/lambda)" in zero.note  # eta 0.1, weight decay 0.04
    assert any("eta/lambda" in d for d in report.diagnoses)


def test_optax_conventions():
    pytest.importorskip("optax")
    report = page_report("optax.lars", "lars")
    assert report.best.convention == dict(weight_decay_form="norm_of_sum", nesterov=False, adapt="all",
                                          decay="all", eps=0.0, larc_clip=False)
    assert set(unmatched(report)) == {"zero_gradient"}  # lr inside the buffer: the varying rate matches
    assert "(= eta/lambda)" in unmatched(report)["zero_gradient"].note


def test_lwrs_torch_lars_conforms_with_its_own_defaults():
    from lwrs.backends.torch import LARS

    report = torch_assert_implements("lars", LARS, weight_decay_form="sum_of_norms", nesterov=True, adapt="ndim>1",
                                     decay="all", eps=0.0, larc_clip=False)
    assert len(report.matching) == 1 and report.best.max_error < 1e-13


def test_torch_sgd_is_heavy_ball_or_nesterov_with_lr_outside_the_buffer():
    for nesterov in (False, True):
        report = torch_check(torch.optim.SGD, "mnag", options=dict(nesterov=nesterov))
        assert report.best.convention == dict(nesterov=nesterov, decay="all")
        assert set(unmatched(report)) == {"varying_lr"}


@pytest.mark.parametrize("options, expected", [
    (dict(nesterov=False, weight_decay_form="norm_of_sum"), dict(nesterov=False, weight_decay_form="norm_of_sum")),
    (dict(larc_clip=True, eps=1e-6), dict(larc_clip=True, eps=1e-6)),
    (dict(adapt_mask=lambda w: True, weight_decay_mask=lambda w: w.ndim > 1), dict(adapt="all", decay="ndim>1")),
])
def test_the_core_itself_is_identified_under_each_option(options, expected):
    report = check(FunctionalDriver(lwrs.lars, xp=np, **options))
    assert [r.convention for r in report.matching] == [report.best.convention]
    assert {k: report.best.convention[k] for k in expected} == expected
    assert report.best.max_error == 0.0  # the same code in the same namespace


# ---- planted bugs ---------------------------------------------------------------------------------


class NumpyLars:
    """An independent heavy-ball LARS (sum-of-norms, biases excluded, lr inside the buffer), with planted bugs."""

    def __init__(self, learning_rate, beta, eta, weight_decay, bug=None):
        self.lr, self.beta, self.eta, self.wd, self.bug = learning_rate, beta, eta, weight_decay, bug

    def init(self, params):
        return (0, [np.zeros_like(w) for w in params])

    def step(self, params, grads, state):
        t, trace = state
        lr = self.lr(t) if callable(self.lr) else self.lr
        new_params, new_trace = [], []
        for k, (w, g, d) in enumerate(zip(params, grads, trace)):
            wd = 2 * self.wd if self.bug == "decay_twice" else self.wd
            u = g + wd * w
            wn, gn = np.linalg.norm(w), np.linalg.norm(g)
            ratio = 1.0
            if w.ndim > 1 and wn > 0 and gn > 0:
                ratio = self.eta * wn / (gn + self.wd * wn)
                if self.bug == "ratio" and k == 2 and t >= 3:
                    ratio = self.eta * wn / gn  # forgets the weight-decay term, on fc2.weight from step 3
            if self.bug == "crash" and t == 3 and wn < 2.0:
                raise FloatingPointError(f"planted crash in layer {k}")
            step = self.beta * d - lr * ratio * u
            new_trace.append(step)
            new_params.append(w + (d if self.bug == "momentum_lag" and t >= 2 else step))
        return new_params, (t + 1, new_trace)


def planted(bug):
    def make(learning_rate, beta, eta, weight_decay):
        return NumpyLars(learning_rate, beta, eta, weight_decay, bug)
    make.__name__ = make.__qualname__ = f"NumpyLars(bug={bug})"
    return FunctionalDriver(make, xp=np)


def test_the_independent_numpy_lars_without_a_bug_conforms():
    report = assert_implements("lars", planted(None), nesterov=False, weight_decay_form="sum_of_norms")
    assert report.best.max_error < 1e-13


@pytest.mark.parametrize("bug, where", [
    ("ratio", "step 3, layer 2 'fc2.weight'"),
    ("decay_twice", "step 0, layer 0 'fc1.weight'"),
    ("momentum_lag", "step 2, layer 0 'fc1.weight'"),
    ("crash", "problem 'mlp', step 3: the implementation raised FloatingPointError: planted crash in layer 2"),
])
def test_planted_bugs_are_caught_at_their_step_and_layer(bug, where):
    with pytest.raises(ConformanceError) as info:
        assert_implements("lars", planted(bug), nesterov=False)
    message = str(info.value)
    assert f"NumpyLars(bug={bug}) does not implement lars with nesterov=False" in message
    assert where in message, message
    if bug != "crash":  # a crash is reported with the step it happened at and the exception, values for the others
        assert "expected [" in message and "got [" in message
    assert "closest convention of the core overall" in message


def test_asking_for_a_convention_the_peer_does_not_follow_names_the_closest_one():
    with pytest.raises(ConformanceError) as info:
        torch_assert_implements("lars", load_timm_lars(), weight_decay_form="norm_of_sum")
    message = str(info.value)
    assert "problem 'mlp', step 0" in message
    assert "weight_decay_form='sum_of_norms', nesterov=False, adapt='all_if_decay'" in message


def test_an_optimizer_that_cannot_be_built_raises_instead_of_reporting():
    def make(learning_rate, momentum):  # takes no trust coefficient: a configuration error, not a finding
        return lwrs.lars(learning_rate, beta=momentum)

    with pytest.raises(TypeError, match="takes none of .* for eta"):
        check(FunctionalDriver(make, xp=np))


def test_unknown_conventions_are_refused_before_running():
    with pytest.raises(ValueError, match="lars has no convention 'nesterof'"):
        assert_implements("lars", planted(None), nesterof=True)
    with pytest.raises(ValueError, match="weight_decay_form='norm_of_sums' is not one the core supports"):
        conventions("lars", weight_decay_form="norm_of_sums")
    with pytest.raises(ValueError, match="kind='adam'"):
        conventions("adam")


def test_the_battery_is_seeded_and_has_the_special_layers():
    a, b = battery(), battery()
    assert a == b
    roles = {layer.role for p in a for layer in p.layers}
    assert roles == {"layer", "zero_init", "zero_gradient", "equilibrium"}
    eq = next(p for p in a if p.name == "near_equilibrium")
    params = eq.initial_params(np)
    g = eq.gradients(0, params)[1]
    assert np.linalg.norm(g + eq.weight_decay * params[1]) < 1e-2 * np.linalg.norm(g)


def test_command_line_prints_the_report_and_exits_by_conformance():
    lines = []
    assert main(["timm.optim.Lars"], out=lines.append) == 1
    assert lines[0].startswith("timm.optim.Lars: conformance with lwrs.lars")
    assert "outside the momentum buffer" in lines[0]
    lines.clear()
    assert main(["lwrs.lars", "--option", "nesterov=False", "--fix", "nesterov=False"], out=lines.append) == 0
    assert "CONFORMS" in lines[0]
    lines.clear()
    assert main(["lwrs.backends.torch.LAMB"], out=lines.append) == 0  # the kind follows the name
    assert lines[0].startswith("lwrs.backends.torch.LAMB: conformance with lwrs.lamb")


def test_lwrs_jax_lars_conforms_with_the_cores_defaults():
    pytest.importorskip("optax")
    from lwrs.backends import jax as lwrs_jax
    from lwrs.backends.jax.conformance import assert_implements as jax_assert_implements

    report = jax_assert_implements("lars", lwrs_jax.lars, weight_decay_form="sum_of_norms", nesterov=True,
                                   adapt="ndim>1", decay="all", eps=0.0, larc_clip=False)
    assert len(report.matching) == 1


def test_lamb_kind_identifies_optax_and_lwrs_own_lamb():
    from lwrs.backends.torch import LAMB

    ours = torch_assert_implements("lamb", LAMB, adapt="ndim>1", decay="all", eps=1e-6)
    assert len(ours.matching) == 1
    pytest.importorskip("optax")
    report = page_report("optax.lamb", "lamb")
    assert report.best.convention == dict(adapt="all", decay="all", eps=1e-6)
    div = unmatched(report)
    assert set(div) == {"zero_gradient"}  # |w| / |lambda w| = 1/lambda = 25 there; the core's ratio is 1
    assert "implied trust ratio 25" in div["zero_gradient"].note


def test_a_check_that_could_not_fail_is_refused():
    """An empty battery, tolerance=inf (or NaN, or negative) and a kind typo passed plain SGD as LARS, failed
    lwrs.lars itself, or raised a bare KeyError (review-kit-3, 9)."""
    import numpy as np

    import lwrs
    from lwrs.testing import FunctionalDriver, assert_implements, battery, check

    driver = FunctionalDriver(lwrs.lars, xp=np)
    with pytest.raises(ValueError, match="problems is empty"):
        assert_implements("lars", driver, problems=[p for p in battery() if p.name == "no such problem"])
    for tolerance in (float("inf"), float("nan"), -1.0, 1.0, True):
        with pytest.raises(ValueError, match=r"tolerance must be a relative tolerance in \[0, 1\)"):
            check(driver, tolerance=tolerance)
    with pytest.raises(ValueError, match=r"the conformance kit checks .*got kind='lasr'"):
        check(driver, "lasr")
    with pytest.raises(ValueError, match=r"the conformance kit checks .*got kind='lasr'"):
        FunctionalDriver(lwrs.lars, xp=np, kind="lasr")


def test_a_schedule_off_by_one_step_is_not_taken_for_torch_optims_order():
    """A rate schedule evaluated at t + 1 diverges at the first step, where the order of rate and momentum buffer
    cannot show (the buffer is empty): it was diagnosed as torch.optim.SGD's order (review-kit-3, 8)."""
    import numpy as np

    import lwrs
    from lwrs.testing import FunctionalDriver, check

    def clars_off_by_one(learning_rate, beta=0.9, eta=0.01, weight_decay=0.0):
        schedule = learning_rate if callable(learning_rate) else (lambda t: learning_rate)
        return lwrs.clars(lambda t: schedule(t + 1), beta=beta, eta=eta, weight_decay=weight_decay)

    report = check(FunctionalDriver(clars_off_by_one, xp=np, kind="clars"), "clars")
    text = "\n".join(report.diagnoses)
    assert "evaluated at another step" in text and "SGD's order" not in text
