"""mNAG against torch.optim.SGD, and the micro-steps of CLARS eq. (6) against eq. (4)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lwrs
from oracles import PaperMomentum

torch = pytest.importorskip("torch")

STEPS = 20


def quadratic_grads(w_list, rng_state):
    """Gradients of a fixed quadratic plus a fixed noise draw per step (same for both runs)."""
    a = [np.linspace(0.5, 2.0, w.size).reshape(w.shape) for w in w_list]
    return [ak * w + n for ak, w, n in zip(a, w_list, rng_state)]


def run_lwrs(schedule, beta, w0, noises):
    opt = lwrs.mnag(schedule, beta=beta)
    params = [np.array(w) for w in w0]
    state = opt.init(params)
    for t in range(STEPS):
        params, state, _ = opt.step(params, quadratic_grads(params, noises[t]), state)
    return params


def run_torch_sgd(schedule, beta, w0, noises):
    ps = [torch.tensor(w, dtype=torch.float64, requires_grad=True) for w in w0]
    # torch refuses nesterov=True without momentum; with beta = 0 both are plain SGD
    opt = torch.optim.SGD(ps, lr=schedule(0), momentum=beta, nesterov=beta > 0)
    for t in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = schedule(t)
        grads = quadratic_grads([p.detach().numpy() for p in ps], noises[t])
        for p, g in zip(ps, grads):
            p.grad = torch.tensor(g)
        opt.step()
    return [p.detach().numpy() for p in ps]


def run_lr_inside_recursion(schedule, beta, w0, noises):
    """The notes' recursion: d_t = beta d_{t-1} - lr_t g_t; w_{t+1} = w_t - lr_t g_t + beta d_t."""
    w = [np.array(x) for x in w0]
    d = [np.zeros_like(x) for x in w]
    for t in range(STEPS):
        g = quadratic_grads(w, noises[t])
        for k in range(len(w)):
            d[k] = beta * d[k] - schedule(t) * g[k]
            w[k] = w[k] - schedule(t) * g[k] + beta * d[k]
    return w


@pytest.fixture
def toy():
    rng = np.random.default_rng(3)
    w0 = [rng.normal(size=(3, 4)), rng.normal(size=5)]
    noises = [[0.1 * rng.normal(size=w.shape) for w in w0] for _ in range(STEPS)]
    return w0, noises


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_constant_rate_equals_torch_sgd_nesterov(toy, beta):
    w0, noises = toy
    ours = run_lwrs(lambda t: 0.1, beta, w0, noises)
    theirs = run_torch_sgd(lambda t: 0.1, beta, w0, noises)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-14)


def test_varying_rate_differs_from_torch_and_matches_lr_inside_recursion(toy):
    w0, noises = toy

    def ramp(t):
        return 0.02 + 0.02 * t  # a rate that changes every step, as LARS rates do

    ours = run_lwrs(ramp, 0.9, w0, noises)
    theirs = run_torch_sgd(ramp, 0.9, w0, noises)
    inside = run_lr_inside_recursion(ramp, 0.9, w0, noises)
    gap = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs))
    assert gap > 1e-2, f"the paper's order should differ from PyTorch's with a varying rate (gap {gap})"
    for a, b in zip(ours, inside):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


def test_velocity_from_trace_recovers_papers_v(toy):
    w0, noises = toy
    beta, rates = 0.7, [0.1, 0.03]
    oracle = PaperMomentum(w0, beta)
    params, trace = [np.array(w) for w in w0], lwrs.zeros_like_layers(w0)
    for t in range(5):
        g = quadratic_grads(params, noises[t])
        oracle.step(g, rates)
        params, trace = lwrs.momentum_step(params, g, trace, rates, beta=beta)
    v = lwrs.velocity_from_trace(params, trace, beta=beta)
    for k in range(2):
        np.testing.assert_allclose(params[k], oracle.w[k], atol=1e-14)
        np.testing.assert_allclose(v[k], oracle.v[k], atol=1e-14)


layer_rates = st.lists(st.floats(0.0, 2.0), min_size=1, max_size=5)


@given(beta=st.floats(0.0, 0.99), rates=layer_rates, seed=st.integers(0, 2**16), steps=st.integers(1, 3))
def test_k_microsteps_equal_one_full_step(beta, rates, seed, steps):
    """Eq. (6) block-restricted, applied for s = 0..K-1, reproduces eq. (4) for any beta and gamma_k."""
    rng = np.random.default_rng(seed)
    K = len(rates)
    params = [rng.normal(size=(k + 1, 2)) for k in range(K)]
    full_w, trace = list(params), lwrs.zeros_like_layers(params)
    micro_w, micro_v = list(params), list(params)  # v_0 = w_0
    for _ in range(steps):
        grads = [rng.normal(size=w.shape) for w in params]
        full_w, trace = lwrs.momentum_step(full_w, grads, trace, rates, beta=beta)
        stale = grads  # every micro-step uses the gradient at w_t
        for s in range(K):
            micro_w, micro_v = lwrs.block_microstep(micro_w, micro_v, stale, rates, beta=beta, block=s % K)
        expected_v = lwrs.velocity_from_trace(full_w, trace, beta=beta)
        for k in range(K):
            np.testing.assert_allclose(micro_w[k], full_w[k], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(micro_v[k], expected_v[k], rtol=1e-12, atol=1e-12)


def literal_microstep(w, v, g, rates, beta, block):
    """Eq. (6) read literally with full vectors: every block of v is rewritten at each micro-step."""
    v_new = [wk - (rates[k] * g[k] if k == block else 0.0) for k, wk in enumerate(w)]
    w_new = [vn + beta * (vn - vk) for vn, vk in zip(v_new, v)]
    return w_new, v_new


def test_literal_reading_of_eq6_does_not_compose():
    """The documented discrepancy: with beta != 0 the full-vector reading drifts away from eq. (4)."""
    rng = np.random.default_rng(0)
    params = [rng.normal(size=3) for _ in range(3)]
    grads = [rng.normal(size=3) for _ in range(3)]
    rates, beta = [0.1, 0.2, 0.3], 0.9
    full_w, _ = lwrs.momentum_step(params, grads, lwrs.zeros_like_layers(params), rates, beta=beta)
    w, v = list(params), list(params)
    for s in range(3):
        w, v = literal_microstep(w, v, grads, rates, beta, s)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(w, full_w)) > 1e-2
    w, v = list(params), list(params)
    for s in range(3):
        w, v = literal_microstep(w, v, grads, rates, 0.0, s)
    full0, _ = lwrs.momentum_step(params, grads, lwrs.zeros_like_layers(params), rates, beta=0.0)
    for a, b in zip(w, full0):  # with beta = 0 both readings agree
        np.testing.assert_allclose(a, b, atol=1e-15)


def test_first_step_moves_one_plus_beta_times_rate():
    w, g = [np.array([2.0, -1.0])], [np.array([1.0, 3.0])]
    out, _ = lwrs.momentum_step(w, g, lwrs.zeros_like_layers(w), [0.1], beta=0.9)
    np.testing.assert_allclose(out[0], w[0] - 1.9 * 0.1 * g[0], atol=1e-15)
