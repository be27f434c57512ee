"""Trust ratios: closed forms, the zero-norm convention, LARC, and the CLARS factor's bounds."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import lwrs

finite = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False)


def per_sample_batches(min_samples=1, max_samples=8):
    return st.integers(min_samples, max_samples).flatmap(
        lambda n: st.tuples(
            arrays(np.float64, (n, 3), elements=finite),
            arrays(np.float64, (n, 2, 2), elements=finite),
        )
    )


@given(per_sample_batches(), st.floats(0.0, 1.0))
def test_clars_factor_lies_in_zero_one(samples, weight_decay):
    """Triangle inequality: ||mean g_i|| <= mean ||g_i||, also with the weight-decay term added to both."""
    samples = list(samples)
    grads = [s.mean(axis=0) for s in samples]
    w_norms = np.array([1.5, 0.5])
    g_norms = lwrs.layer_norms(grads)
    assume(np.all(g_norms > 1e-6))  # a vanishing mini-batch gradient gives factor 0 (documented)
    stats = lwrs.per_sample_norm_statistics(samples)
    lars_den = lwrs.lars_denominators(w_norms, g_norms, weight_decay=weight_decay)
    clars_den = lwrs.clars_denominators(w_norms, stats.mean_norms(), weight_decay=weight_decay)
    c = lwrs.clars_factors(lars_den, clars_den)
    assert np.all(c > 0)
    assert np.all(c <= 1 + 1e-12)


@given(arrays(np.float64, (5,), elements=st.floats(0.1, 10.0)))
def test_clars_factor_is_one_when_all_samples_point_the_same_way(scales):
    direction = np.array([[1.0, -2.0], [0.5, 3.0]])
    samples = [scales[:, None, None] * direction]  # every sample is a positive multiple of one matrix
    stats = lwrs.per_sample_norm_statistics(samples)
    g = lwrs.layer_norms([samples[0].mean(axis=0)])
    np.testing.assert_allclose(lwrs.clars_factors(g, stats.mean_norms()), [1.0], rtol=1e-12)


def test_clars_factor_closed_form_two_opposed_samples():
    samples = [np.array([[3.0, 4.0], [-1.0, 0.0]])]  # mean (1, 2); norms 5 and 1
    stats = lwrs.per_sample_norm_statistics(samples)
    c = lwrs.clars_factors(lwrs.layer_norms([samples[0].mean(axis=0)]), stats.mean_norms())
    np.testing.assert_allclose(c, [np.sqrt(5.0) / 3.0], rtol=1e-15)


@given(st.floats(1e-3, 1e3), st.floats(1e-3, 1e3), st.floats(1e-4, 1.0), st.floats(0.0, 1e-2))
def test_lars_ratio_closed_form(w_norm, g_norm, eta, eps):
    r = lwrs.layer_trust_ratios(np.array([w_norm]), np.array([g_norm]), eta=eta, eps=eps)
    np.testing.assert_allclose(r, [eta * w_norm / (g_norm + eps)], rtol=1e-14)


@given(st.sampled_from([(0.0, 1.0), (1.0, 0.0), (0.0, 0.0)]), st.floats(1e-4, 1.0), st.floats(0.0, 1.0))
def test_ratio_is_one_at_zero_norms(norms, eta, eps):
    r = lwrs.layer_trust_ratios(np.array([norms[0]]), np.array([norms[1]]), eta=eta, eps=eps)
    assert r.tolist() == [1.0]


@given(
    w=arrays(np.float64, (2, 3), elements=st.floats(-5.0, 5.0)),
    wd=st.floats(0.0, 1.0),
    beta=st.floats(0.0, 0.95),
    kind=st.sampled_from(["lars", "clars", "tvlars"]),
    form=st.sampled_from(["sum_of_norms", "norm_of_sum"]),
)
def test_zero_gradient_gives_ratio_one_and_still_decays(w, wd, beta, kind, form):
    """A vanishing mini-batch gradient: ratio 1 (timm / apex), and the first step is -(1 + beta) lr wd w."""
    lr = 0.5
    kw = dict(decay_coefficient=1e-3, delay_steps=1e9) if kind == "tvlars" else {}
    opt = getattr(lwrs, kind)(lr, eta=0.1, beta=beta, weight_decay=wd, weight_decay_form=form, **kw)
    samples = np.stack([np.ones((2, 3)), -np.ones((2, 3))])  # per-sample gradients that cancel
    if form == "norm_of_sum":
        samples = samples + wd * w[None]
    stats = lwrs.per_sample_norm_statistics([samples])
    new, _, diag = opt.step([w], [np.zeros((2, 3))], opt.init([w]), norm_stats=stats)
    assert diag.trust_ratios.tolist() == [1.0]
    rate = float(diag.learning_rate)
    assert diag.rates.tolist() == [rate]
    np.testing.assert_allclose(new[0], w - (1 + beta) * rate * wd * w, rtol=1e-12, atol=1e-300)


@given(arrays(np.float64, (3,), elements=st.floats(0.0, 10.0)), st.floats(1e-4, 1.0))
def test_ratio_is_one_where_any_norm_vanishes(norms, eta):
    w_norm, g_norm, den = (np.array([v]) for v in norms)
    r = lwrs.layer_trust_ratios(w_norm, den, eta=eta, grad_norms=g_norm)
    floor = np.finfo(np.float64).smallest_normal * max(1.0, eta * norms[0])
    if np.all(norms > 0) and norms[2] >= floor:
        np.testing.assert_allclose(r, eta * w_norm / den, rtol=1e-14)
    else:  # a vanishing norm, or a denominator below the smallest normal number (a subnormal gradient norm)
        assert r.tolist() == [1.0]


def test_a_ratio_that_would_overflow_is_one_not_infinite():
    with np.errstate(all="raise"):
        r = lwrs.layer_trust_ratios(np.array([10.0, 10.0, 1e-3]), np.array([5e-324, 1e-300, 1e-308]), eta=1.0)
    np.testing.assert_allclose(r, [1.0, 1e301, 1.0], rtol=1e-15)  # 5e-324 and 1e-308 are subnormal
    r32 = lwrs.layer_trust_ratios(np.array([10.0], np.float32), np.array([1e-38], np.float32), eta=1.0)
    assert r32.tolist() == [1.0] and r32.dtype == np.float32


def test_zero_weights_get_ratio_one_and_momentum():
    w = [np.zeros((2, 2))]
    g = [np.ones((2, 2))]
    opt = lwrs.lars(0.1, eta=0.001, beta=0.9)
    state = opt.init(w)
    w1, state, diag = opt.step(w, g, state)
    assert diag.trust_ratios.tolist() == [1.0]
    np.testing.assert_allclose(w1[0], -0.1 * 1.9 * np.ones((2, 2)))
    np.testing.assert_allclose(state.trace[0], -0.1 * np.ones((2, 2)))


def test_weight_decay_forms_closed_forms():
    """timm / TF contrib: |g| + wd|w|; optax: |g + wd w|."""
    w = np.array([[3.0, 0.0]])
    g = np.array([[0.0, 4.0]])
    wd = 0.5
    for form, den in [("sum_of_norms", 4.0 + 0.5 * 3.0), ("norm_of_sum", np.hypot(1.5, 4.0))]:
        opt = lwrs.lars(1.0, eta=0.01, weight_decay=wd, weight_decay_form=form, beta=0.0)
        _, _, diag = opt.step([w], [g], opt.init([w]))
        np.testing.assert_allclose(diag.trust_ratios, [0.01 * 3.0 / den], rtol=1e-15)


def test_larc_clip_matches_apex_formula():
    """apex LARC clip: effective rate min(eta |w| / (|g| + wd |w| + eps), lr)."""
    w = [np.array([[3.0, 4.0]]), np.array([[0.3, 0.4]])]
    g = [np.array([[0.0, 0.1]]), np.array([[0.0, 10.0]])]
    lr, eta = 0.2, 0.02
    opt = lwrs.lars(lr, eta=eta, larc_clip=True, beta=0.0)
    _, _, diag = opt.step(w, g, opt.init(w))
    expected = [min(eta * 5.0 / 0.1, lr), min(eta * 0.5 / 10.0, lr)]
    np.testing.assert_allclose(diag.rates, expected, rtol=1e-14)
    assert expected[0] == lr and expected[1] < lr  # one layer clipped, one not


def test_max_ratio_clips_like_clars_code():
    r = lwrs.layer_trust_ratios(np.array([10.0, 1.0]), np.array([1.0, 1.0]), eta=0.1, max_ratio=0.1)
    np.testing.assert_allclose(r, [0.1, 0.1])
    r = lwrs.layer_trust_ratios(np.array([0.5, 1.0]), np.array([1.0, 1.0]), eta=0.1, max_ratio=0.1)
    np.testing.assert_allclose(r, [0.05, 0.1])


def test_default_mask_excludes_one_dimensional_layers():
    w = [np.ones((2, 2)), np.ones(2)]
    g = [np.ones((2, 2)), np.ones(2)]
    opt = lwrs.lars(1.0, eta=0.001)
    _, _, diag = opt.step(w, g, opt.init(w))
    np.testing.assert_allclose(diag.trust_ratios, [0.001, 1.0])


def test_lamb_ratio_closed_form_first_step():
    """At t = 1, m_hat = g and v_hat = g^2, so u = g / (|g| + eps) elementwise."""
    w = [np.array([[3.0, 4.0]])]
    g = [np.array([[2.0, -0.5]])]
    opt = lwrs.lamb(0.1, eps=1e-6)
    _, _, diag = opt.step(w, g, opt.init(w))
    u = g[0] / (np.abs(g[0]) + 1e-6)
    np.testing.assert_allclose(diag.trust_ratios, [5.0 / np.linalg.norm(u)], rtol=1e-14)
