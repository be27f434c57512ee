"""Schedules: closed forms, the TVLARS factor's bounds and monotonicity, finiteness."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lwrs import schedules as S
from oracles import tvlars_phi

steps = st.integers(0, 10**7)
rates = st.floats(0.0, 1e3)
counts = st.integers(1, 10**5)


def barlow_twins_lr(step, base_lr, warmup_steps, max_steps):
    """The warm-up + cosine of the Barlow Twins code that the TVLARS paper compares against."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    step -= warmup_steps
    max_steps -= warmup_steps
    q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
    return base_lr * q + base_lr * 0.001 * (1 - q)


def test_warmup_cosine_equals_barlow_twins():
    s = S.warmup_cosine(4.0, 10, 100)
    for t in range(0, 101):
        assert s(t) == pytest.approx(barlow_twins_lr(t, 4.0, 10, 100), rel=1e-14, abs=1e-15)


def test_batch_scaling_rules():
    assert S.linear_scaling(0.1, 16384, 128) == pytest.approx(12.8)
    assert S.sqrt_scaling(0.1, 16384, 256) == pytest.approx(0.8)


def test_polynomial_and_step_decay_closed_forms():
    s = S.polynomial_decay(2.0, 10, end=0.5, power=2.0)
    assert s(3) == pytest.approx(1.5 * 0.7**2 + 0.5)
    assert s(10) == s(50) == 0.5
    d = S.step_decay(1.0, [60, 120, 150])
    assert [d(59), d(60), d(120), d(150), d(199)] == pytest.approx([1.0, 0.1, 0.01, 0.001, 0.001])


def test_warmup_polynomial_joins_at_the_peak():
    s = S.warmup_polynomial(3.0, 5, 25, power=2.0)
    assert s(0) == 0.0 and s(5) == 3.0
    assert s(15) == pytest.approx(3.0 * 0.5**2)


@given(steps, st.floats(1e-8, 1.0), st.floats(-1e4, 1e4), st.floats(1e-3, 10.0), st.floats(0.0, 1.0))
def test_tvlars_factor_matches_formula_and_bounds(t, decay, delay, alpha, gamma_min):
    phi = S.tvlars_factor(decay_coefficient=decay, delay_steps=delay, alpha=alpha, gamma_min=gamma_min)
    lower, upper = S.tvlars_factor_bounds(decay_coefficient=decay, delay_steps=delay, alpha=alpha, gamma_min=gamma_min)
    value = phi(t)
    assert lower <= value <= upper <= 1.0 / alpha + gamma_min
    x = decay * (t - delay)
    if x < 700:  # where the literal formula does not overflow
        assert value == pytest.approx(tvlars_phi(t, decay=decay, delay=delay, alpha=alpha, gamma_min=gamma_min),
                                      rel=1e-12, abs=1e-300)


@given(steps, st.integers(1, 10**6), st.floats(0.0, 1.0), st.floats(-1e4, 1e4))
def test_tvlars_factor_is_non_increasing(t, dt, decay, delay):
    phi = S.tvlars_factor(decay_coefficient=decay, delay_steps=delay)
    assert phi(t + dt) <= phi(t)


def test_tvlars_official_special_case():
    """The official code's 1 / (0.1 + exp(lambda (t + 1))), from parameters alone."""
    phi = S.tvlars_factor(decay_coefficient=1e-3, delay_steps=-1, alpha=0.1, gamma_min=0.0)
    for t in [0, 1, 10, 1000, 50000]:
        assert phi(t) == pytest.approx(1.0 / (0.1 + math.exp(1e-3 * (t + 1))), rel=1e-14)


def test_tvlars_factor_strictly_decreases_and_halves_at_the_delay():
    phi = S.tvlars_factor(decay_coefficient=0.01, delay_steps=500)
    assert phi(500) == pytest.approx(0.5)
    assert phi(0) > phi(499) > phi(500) > phi(501) > phi(5000) > 0


ALL_SCHEDULES = [
    lambda p, w, n: S.constant(p),
    lambda p, w, n: S.linear_warmup(p, w),
    lambda p, w, n: S.polynomial_decay(p, n),
    lambda p, w, n: S.cosine_decay(p, n, final=p * 0.01),
    lambda p, w, n: S.step_decay(p, [w, n]),
    lambda p, w, n: S.warmup_cosine(p, w, w + n),
    lambda p, w, n: S.warmup_polynomial(p, w, w + n),
    lambda p, w, n: S.tvlars_factor(decay_coefficient=1.0 / n, delay_steps=w),
]


@given(st.integers(0, len(ALL_SCHEDULES) - 1), rates, counts, counts, steps)
def test_every_schedule_is_finite_and_non_negative(which, peak, warmup, total, t):
    value = ALL_SCHEDULES[which](peak, warmup, total)(t)
    assert math.isfinite(value) and value >= 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: S.constant(-0.1), "value must lie in"),
        (lambda: S.linear_warmup(1.0, -5), "warmup_steps must be an int"),
        (lambda: S.warmup_cosine(1.0, 10, 10), "warmup_steps (10) must be less than total_steps (10)"),
        (lambda: S.tvlars_factor(decay_coefficient=-1.0, delay_steps=0), "decay_coefficient must lie in"),
        (lambda: S.tvlars_factor(decay_coefficient=1.0, delay_steps=0, alpha=0.0), "alpha must lie in (0.0"),
        (lambda: S.constant(1.0)(-1), "step must be an int >= 0, got -1"),
        (lambda: S.polynomial_decay(1.0, 10, power=float("nan")), "power must be finite"),
    ],
)
def test_bad_hyperparameters_are_named(call, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        call()


def test_a_schedule_that_returns_a_negative_rate_is_caught():
    checked = S.as_schedule("learning_rate", lambda t: 0.1 - 0.05 * t)
    assert checked(1) == pytest.approx(0.05)
    with pytest.raises(ValueError, match=r"learning_rate schedule returned -0.05.* at step 3"):
        checked(3)
