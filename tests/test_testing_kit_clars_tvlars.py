"""The conformance kit's CLARS and TVLARS kinds: lwrs's own paths conform, planted bugs are caught.

The oracles are independent NumPy implementations written here from the papers (CLARS eq. 5 with
exact per-sample statistics; TVLARS Algorithm 1 in the official code's special case), not the core.
"""

from __future__ import annotations

import numpy as np
import pytest

import lwrs
from lwrs.backends.torch.conformance import assert_implements as torch_assert_implements
from lwrs.testing import ConformanceError, FunctionalDriver, assert_implements, battery, check
from lwrs.testing.__main__ import main, page_report


def test_the_battery_hands_exact_statistics_of_centred_per_sample_gradients():
    p = battery()[0]
    w = p.initial_params(np)
    per_sample, g = p.per_sample_gradients(3, w), p.gradients(3, w)
    stats = p.norm_statistics(3, w)
    for k, (samples, mean) in enumerate(zip(per_sample, g)):
        norms = np.sqrt((samples.reshape(len(samples), -1) ** 2).sum(axis=1))
        np.testing.assert_allclose(samples.mean(axis=0), mean, atol=1e-15)
        np.testing.assert_allclose([stats.sum_norms[k], stats.sum_squared_norms[k]], [norms.sum(), (norms**2).sum()])
        assert norms.mean() > np.linalg.norm(mean)  # CLARS's factor is below 1: the kinds are told apart
    assert stats.count == 4
    np.testing.assert_array_equal(p.norm_statistics(3, w).sum_norms, stats.sum_norms)  # seeded


def test_lwrs_torch_clars_and_tvlars_conform_with_their_defaults():
    report = page_report("lwrs.backends.torch.CLARS", "clars")
    assert len(report.matching) == 1 and report.best.max_error < 1e-13
    assert report.best.convention == dict(weight_decay_form="sum_of_norms", nesterov=True, adapt="ndim>1",
                                          decay="all", eps=0.0, larc_clip=False)
    report = page_report("lwrs.backends.torch.TVLARS", "tvlars")
    assert len(report.matching) == 1 and report.best.convention["phi"] == "as_given"
    assert report.best.max_error < 1e-13


def test_lwrs_jax_clars_conforms():
    pytest.importorskip("optax")
    report = page_report("lwrs.backends.jax.clars", "clars")  # update(..., norm_stats=) every step
    assert len(report.matching) == 1 and report.best.convention["nesterov"] is True
    # lwrs.backends.jax.tvlars: its row of docs/conformance.rst, checked by tests/test_conformance_page.py


def test_functional_clars_conforms_and_lars_given_statistics_does_not():
    assert_implements("clars", FunctionalDriver(lwrs.clars, xp=np, kind="clars", larc_clip=True), larc_clip=True)
    with pytest.raises(ConformanceError) as info:  # lars reports the statistics but does not use them
        assert_implements("clars", FunctionalDriver(lwrs.lars, xp=np, kind="clars", name="lwrs.lars"))
    assert "problem 'mlp', step 0, layer 0 'fc1.weight'" in str(info.value)


def test_a_driver_built_for_another_kind_is_refused():
    with pytest.raises(ValueError, match="kind='lars' but is checked as kind='clars'"):
        check(FunctionalDriver(lwrs.clars, xp=np), "clars")


# ---- planted CLARS bugs -----------------------------------------------------------------------------


class NumpyClars:
    """Heavy-ball CLARS (eq. 5, sum of norms, biases excluded, lr inside the buffer), with planted bugs."""

    def __init__(self, learning_rate, beta, eta, weight_decay, bug=None):
        self.lr, self.beta, self.eta, self.wd, self.bug = learning_rate, beta, eta, weight_decay, bug

    def init(self, params):
        return (0, [np.zeros_like(w) for w in params])

    def step(self, params, grads, state, norm_stats):
        t, trace = state
        lr = self.lr(t) if callable(self.lr) else self.lr
        out, new_trace = [], []
        for k, (w, g, d) in enumerate(zip(params, grads, trace)):
            wn, gn = np.linalg.norm(w), np.linalg.norm(g)
            s1 = float(norm_stats.sum_norms[k])
            mean_norm = s1 if self.bug == "no_count" and t >= 2 else s1 / norm_stats.count
            ratio = 1.0
            if w.ndim > 1 and wn > 0 and mean_norm > 0:
                ratio = self.eta * wn / (mean_norm + self.wd * wn)
                if self.bug == "factor_squared" and k == 2 and t >= 4:
                    factor = (gn + self.wd * wn) / (mean_norm + self.wd * wn)
                    ratio *= factor  # the CLARS factor applied twice: LARS ratio times factor squared
            step = self.beta * d - lr * ratio * (g + self.wd * w)
            new_trace.append(step)
            out.append(w + step)
        return out, (t + 1, new_trace)


def planted_clars(bug):
    def make(learning_rate, beta, eta, weight_decay):
        return NumpyClars(learning_rate, beta, eta, weight_decay, bug)
    make.__name__ = make.__qualname__ = f"NumpyClars(bug={bug})"
    return FunctionalDriver(make, xp=np, kind="clars")


def test_the_independent_numpy_clars_conforms():
    report = assert_implements("clars", planted_clars(None), nesterov=False, adapt="ndim>1", decay="all", eps=0.0)
    assert report.best.max_error < 1e-13


@pytest.mark.parametrize("bug, where", [
    ("factor_squared", "step 4, layer 2 'fc2.weight'"),
    ("no_count", "step 2, layer 0 'fc1.weight'"),
])
def test_planted_clars_bugs_are_caught_at_their_step_and_layer(bug, where):
    with pytest.raises(ConformanceError) as info:
        assert_implements("clars", planted_clars(bug), nesterov=False)
    message = str(info.value)
    assert f"NumpyClars(bug={bug}) does not implement clars with nesterov=False" in message
    assert where in message and "expected [" in message, message


# ---- TVLARS: the official code's special case ----------------------------------------------------------


class OfficialTvlars:
    """TVLARS as the official code fixes phi: alpha 0.1, gamma_min 0, exp(lambda (t + 1)); norm of the sum,
    1-D tensors neither decayed nor adapted, heavy-ball with the lr inside the buffer. It takes no
    delay_steps, alpha or gamma_min: the driver must leave them out."""

    def __init__(self, lr, momentum, eta, weight_decay, decay_coefficient):
        self.lr, self.beta, self.eta, self.wd, self.lam = lr, momentum, eta, weight_decay, decay_coefficient

    def init(self, params):
        return (0, [np.zeros_like(w) for w in params])

    def step(self, params, grads, state):
        t, trace = state
        base = self.lr(t) if callable(self.lr) else self.lr
        lr = base / (0.1 + np.exp(self.lam * (t + 1)))
        out, new_trace = [], []
        for w, g, d in zip(params, grads, trace):
            u = g + self.wd * w if w.ndim > 1 else g
            wn, un = np.linalg.norm(w), np.linalg.norm(u)
            ratio = self.eta * wn / un if w.ndim > 1 and wn > 0 and np.linalg.norm(g) > 0 else 1.0
            step = self.beta * d - lr * ratio * u
            new_trace.append(step)
            out.append(w + step)
        return out, (t + 1, new_trace)


def test_the_official_tvlars_code_is_identified_as_such():
    report = check(FunctionalDriver(OfficialTvlars, xp=np, kind="tvlars"), "tvlars")
    assert report.conforms and report.best.max_error < 1e-13
    assert report.factor_values() == dict(phi=["official_code"], weight_decay_form=["norm_of_sum"],
                                          nesterov=[False], adapt=["ndim>1"], decay=["ndim>1"],
                                          eps=[0.0])
    with pytest.raises(ConformanceError, match="does not implement tvlars with phi='as_given'"):
        assert_implements("tvlars", FunctionalDriver(OfficialTvlars, xp=np, kind="tvlars"), phi="as_given")


def test_command_line_checks_clars_and_tvlars():
    lines = []
    assert main(["lwrs.backends.torch.CLARS"], out=lines.append) == 0
    assert "conformance with lwrs.clars" in lines[0] and "CONFORMS" in lines[0]
    lines.clear()
    assert main(["lwrs.tvlars", "--fix", "phi=official_code"], out=lines.append) == 1
    assert "DOES NOT CONFORM" in lines[0]


def test_torch_assert_implements_names_the_clars_kind():
    from lwrs.backends.torch import CLARS

    torch_assert_implements("clars", CLARS, options=dict(nesterov=False), nesterov=False)
