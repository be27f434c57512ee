"""The CLARS theorems, executed: constants recovered numerically, bounds that hold and are not vacuous.

All runs use fixed seeds, so the numbers are deterministic; the bands below leave room for
round-off differences between platforms and are justified next to each assertion.
"""

from __future__ import annotations

import math
import statistics

import array_api_compat.numpy as xnp
import numpy as np
import pytest

import lwrs
from lwrs import theory
from lwrs.problems import LayeredQuadratic
from lwrs.apps.quadratic import theory_run

# The notes' setting: K = 4 layers, L_k = 1, 4, 16, 64, M_k growing towards the top.
BLOCK = LayeredQuadratic.make(dims=(4, 4, 4, 4), lipschitz=(1.0, 4.0, 16.0, 64.0), scale_spread=(0.5, 1.0, 2.0, 3.0),
                              noise=(0.5,) * 4, n=256, seed=0)
# The coupled variant: L_g = 76.3 > max_k L_k = 72.
COUPLED = LayeredQuadratic.make(dims=(4, 4, 4, 4), lipschitz=(1.0, 4.0, 16.0, 64.0), scale_spread=1.0,
                                noise=(0.5,) * 4, coupling=8.0, n=256, seed=0)
SEEDS = range(5)
T = 2000


def as_numpy(layers):
    return [np.asarray(x) for x in layers]


# ---- constants ------------------------------------------------------------------------------


def hessian_vector(problem, v):
    """H v = grad f(c + v) - grad f(c) = grad f(c + v), since grad f(c) = 0."""
    return as_numpy(problem.full_grads([np.asarray(c) + vk for c, vk in zip(problem.centers, v)]))


def power_iteration(apply, v, iterations=3000):
    for _ in range(iterations):
        w = apply(v)
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in w))
        v = [x / norm for x in w]
    return norm


@pytest.mark.parametrize("problem", [BLOCK, COUPLED], ids=["block", "coupled"])
def test_lipschitz_constants_recovered_by_power_iteration(problem):
    rng = np.random.default_rng(0)
    start = [rng.normal(size=len(c)) for c in problem.centers]
    lg = power_iteration(lambda v: hessian_vector(problem, v), start)
    assert lg == pytest.approx(problem.global_lipschitz, rel=1e-6)
    for k, lk in enumerate(problem.layer_lipschitz):
        def block(v, k=k):  # H restricted to layer k: perturb only block k, read only block k
            full = [np.zeros_like(x) for x in start]
            full[k] = v[0]
            return [hessian_vector(problem, full)[k]]
        assert power_iteration(block, [start[k]]) == pytest.approx(lk, rel=1e-6), f"layer {k}"
    if problem is COUPLED:
        assert problem.global_lipschitz > max(problem.layer_lipschitz) + 4


@pytest.mark.parametrize("problem", [BLOCK, COUPLED], ids=["block", "coupled"])
def test_variance_constants_recovered_from_per_sample_gradients(problem):
    """Assumption 2 with equality: E_i|g_ik - grad_k f|^2 = M_k |grad_k f|^2 + N_k at any w,
    so two points determine M_k and N_k; a third point checks the line."""
    rng = np.random.default_rng(1)
    everyone = range(problem.num_samples)
    points = [[np.asarray(c) + s * rng.normal(size=len(c)) for c in problem.centers] for s in (0.3, 2.0, 5.0)]
    lhs, rhs = [], []
    for w in points:
        g, f = as_numpy(problem.per_sample_grads(w, everyone)), as_numpy(problem.full_grads(w))
        lhs.append([float(np.mean(np.sum((gk - fk) ** 2, axis=1))) for gk, fk in zip(g, f)])
        rhs.append([float(np.sum(fk**2)) for fk in f])
    for k in range(len(problem.centers)):
        m_k = (lhs[1][k] - lhs[0][k]) / (rhs[1][k] - rhs[0][k])
        n_k = lhs[0][k] - m_k * rhs[0][k]
        assert m_k == pytest.approx(problem.variance_factors[k], rel=1e-9)
        assert n_k == pytest.approx(problem.noise_levels[k], rel=1e-7, abs=1e-12)
        assert lhs[2][k] == pytest.approx(m_k * rhs[2][k] + n_k, rel=1e-9)


# ---- Theorems 1 and 2 -----------------------------------------------------------------------


def monte_carlo_criterion(problem, gamma, beta, batch_size, steps=T):
    return statistics.mean(
        sum(theory_run(problem, xnp, gamma=gamma, beta=beta, batch_size=batch_size, steps=steps, seed=s)) / steps
        for s in SEEDS
    )


THEOREM_CASES = [(BLOCK, beta, b) for beta in (0.0, 0.5, 0.9) for b in (1, 8, 64)] + [
    (COUPLED, 0.0, 8), (COUPLED, 0.9, 8)
]


@pytest.mark.parametrize("problem, beta, batch_size", THEOREM_CASES,
                         ids=[f"{'block' if p is BLOCK else 'coupled'}-beta{b}-B{bs}" for p, b, bs in THEOREM_CASES])
def test_theorem_bound_holds_and_is_not_vacuous(problem, beta, batch_size):
    gap = problem.loss(problem.initial_params(xnp))
    c = problem.constants(batch_size=batch_size, beta=beta, steps=T, initial_gap=gap)
    limits = theory.theorem1_step_limits(c) if beta == 0 else theory.theorem2_step_limits(c)
    gamma = limits.largest
    bound = (theory.theorem1_bound(c, gamma) if beta == 0 else theory.theorem2_bound(c, gamma)).total
    criterion = monte_carlo_criterion(problem, gamma, beta, batch_size)
    ratio = criterion / bound
    # Measured 0.084-0.125 (block) and 0.14-0.15 (coupled); the notes measured 0.11-0.13 on a
    # similar problem. 5 seeds vary by at most 1.25x, so [0.04, 0.3] cannot fail by chance, while a
    # bound off by one of its factors (8, 1 - beta, kappa) or a wrong mNAG moves the ratio out of it.
    assert 0.04 <= ratio <= 0.3, f"criterion / bound = {ratio:.3f} (binding: {limits.binding})"
    if beta == 0:  # Theorem 2 at beta = 0 is looser than Theorem 1 and must hold too
        assert criterion <= theory.theorem2_bound(c, gamma).total


def test_corollary1_rate_decays_like_one_over_sqrt_t():
    """Large noise, B = 1 and L_k = 1..8 make Corollary 1's sqrt branch active and within every limit."""
    problem = LayeredQuadratic.make(dims=(4, 4, 4, 4), lipschitz=(1.0, 2.0, 4.0, 8.0), scale_spread=0.3,
                                    noise=(10.0,) * 4, condition=1.0, n=256, seed=0)
    gap = problem.loss(problem.initial_params(xnp))
    points = []
    for steps in (400, 1600, 6400):
        c = problem.constants(batch_size=1, beta=0.0, steps=steps, initial_gap=gap)
        gamma, rate = theory.corollary1(c)
        assert gamma < 1 / 8 and gamma <= theory.theorem1_step_limits(c).largest  # the sqrt branch, admissible
        crit = statistics.mean(sum(theory_run(problem, xnp, gamma=gamma, beta=0.0, batch_size=1, steps=steps,
                                              seed=s)) / steps for s in range(3))
        assert crit <= rate
        points.append((math.log(steps), math.log(crit)))
    slope = (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])
    # With gamma ~ 1/sqrt(T) the exact expectation here is a/sqrt(T) - b/T (the noise variance builds
    # up over the first 1/gamma steps), so the measured slope (-0.47) approaches -0.5 from above.
    # A constant step size would give a slope near 0 (a noise floor); the band excludes both that and
    # a rate faster than the theory's.
    assert -0.6 <= slope <= -0.4, slope


def test_corollary2_step_size_and_rate_formulas():
    c = BLOCK.constants(batch_size=8, beta=0.5, steps=10**6, initial_gap=BLOCK.loss(BLOCK.initial_params(xnp)))
    gamma, rate = theory.corollary2(c)
    expected_gamma = math.sqrt(8 * c.initial_gap / (c.steps * c.variance_floor * c.inverse_lipschitz_sum))
    assert gamma == pytest.approx(min(0.5 / 8, expected_gamma), rel=1e-14)
    # the rate is Theorem 2's bound at that gamma, loosened as published
    assert rate >= theory.theorem2_bound(c, gamma).total * (1 - 1e-12)


def test_corollary3_matches_theorem2_with_equal_constants():
    """Corollary 3 is Theorem 2 with L_k = L_g and M_k = M_g, scaled by K (criterion with q_k = 1/K)."""
    K, L, beta, B = 3, 5.0, 0.5, 16
    c = theory.ProblemConstants((L,) * K, L, (2.0,) * K, 0.7, B, beta, 4.0, 1000)
    gamma_g = 0.01
    limits, bound = theory.corollary3(c, gamma_g)
    thm2 = theory.theorem2_bound(c, gamma_g * L)  # gamma_k = gamma / L_k = gamma_g
    assert bound.total == pytest.approx(K * thm2.total, rel=1e-14)
    assert limits.largest == pytest.approx(theory.theorem2_step_limits(c).largest / L, rel=1e-14)


# ---- what the theory says about large batches -----------------------------------------------


def test_linear_scaling_where_the_variance_condition_binds():
    """(1 - beta) B / (8 L_k M_k) binds for B well below M_k: the admissible rate doubles with B."""
    c = {B: theory.ProblemConstants((10.0,) * 4, 10.0, (100.0,) * 4, 1.0, B, 0.5, 1.0, 100) for B in (1, 2, 4, 8, 16)}
    for B in (1, 2, 4, 8):
        small, large = theory.theorem2_step_limits(c[B]), theory.theorem2_step_limits(c[2 * B])
        assert small.binding == large.binding == "(1-b)B/(8 L_k M_k)"
        assert large.largest == pytest.approx(2 * small.largest, rel=1e-14)
    big = theory.ProblemConstants((10.0,) * 4, 10.0, (100.0,) * 4, 1.0, 4096, 0.5, 1.0, 100)
    assert theory.theorem2_step_limits(big).binding != "(1-b)B/(8 L_k M_k)"  # the scaling stops


def test_a_step_size_beyond_the_conditions_diverges():
    """gamma_k = 2.2 / L_k violates gamma_k < 2 / L_k: mGD blows up, while the admissible gamma converges."""
    gap = BLOCK.loss(BLOCK.initial_params(xnp))
    lwrs_rates = [2.2 / lk for lk in BLOCK.layer_lipschitz]
    params = BLOCK.initial_params(xnp)
    trace = lwrs.zeros_like_layers(params)
    for _ in range(150):
        params, trace = lwrs.momentum_step(params, BLOCK.full_grads(params), trace, lwrs_rates, beta=0.0)
    assert BLOCK.loss(params) > 1e6 * gap
    c = BLOCK.constants(batch_size=8, beta=0.0, steps=T, initial_gap=gap)
    assert not theory.rates_meet_theorem2(lwrs_rates, c)
    good = theory_run(BLOCK, xnp, gamma=theory.theorem1_step_limits(c).largest, beta=0.0, batch_size=8,
                      steps=300, seed=0)
    assert good[-1] < 0.1 * good[0]


# ---- Figure 2 and the CLARS factor ------------------------------------------------------------


def test_figure2_estimator_recovers_one_plus_mk_plus_m_over_grad_squared():
    w = [np.asarray(c) + 0.7 for c in BLOCK.centers]
    ratio = lwrs.gradient_variance_ratio(as_numpy(BLOCK.per_sample_grads(w, range(BLOCK.num_samples))))
    grads = as_numpy(BLOCK.full_grads(w))
    expected = [1 + m + n / float(np.sum(g**2)) for m, n, g in zip(BLOCK.variance_factors, BLOCK.noise_levels, grads)]
    np.testing.assert_allclose(ratio, expected, rtol=1e-10)


def test_clars_factor_lower_bound_and_monotone_in_mk():
    """Cauchy-Schwarz: mean|g_i| <= sqrt(mean|g_i|^2), so c_k >= 1 / sqrt(1 + M_k + N_k / |grad_k f|^2);
    and a larger spread of s_ik (larger M_k, same draws otherwise) lowers c_k."""
    factors = []
    for spread in (0.25, 0.5, 1.0, 2.0, 4.0):
        p = LayeredQuadratic.make(dims=(6, 6), lipschitz=(1.0, 4.0), scale_spread=(spread, spread),
                                  noise=(0.2, 0.2), n=512, seed=3)
        w = [np.asarray(c) + 1.0 for c in p.centers]
        samples = as_numpy(p.per_sample_grads(w, range(p.num_samples)))
        stats = lwrs.per_sample_norm_statistics(samples)
        c = lwrs.clars_factors(lwrs.layer_norms(as_numpy(p.full_grads(w))), stats.mean_norms())
        rho = lwrs.gradient_variance_ratio(samples)
        assert np.all(c >= 1 / np.sqrt(rho) - 1e-12)
        factors.append(c)
    factors = np.array(factors)
    assert np.all(np.diff(factors, axis=0) < 0), factors


# ---- the same trajectory on every backend -----------------------------------------------------


@pytest.mark.parametrize("name", ["torch", "array-api-strict"])
def test_trajectories_agree_across_backends(name):
    from lwrs.apps.quadratic import load_namespace

    pytest.importorskip({"torch": "torch", "array-api-strict": "array_api_strict"}[name])
    kw = dict(gamma=0.02, beta=0.9, batch_size=8, steps=200, seed=4)
    reference = theory_run(BLOCK, xnp, **kw)
    other = theory_run(BLOCK, load_namespace(name), **kw)
    np.testing.assert_allclose(other, reference, rtol=1e-9)
