"""A traceable core: array step counts, where-based skipping, pytrees, update(), jax.jit.

Oracles: the eager core with a Python int step on NumPy float64 (itself checked against
the NumPy oracles in test_conformance.py), closed forms, and step() for update().
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest

import lwrs
from lwrs import schedules as S
from lwrs.table import OPTIMIZERS, REQUIRED

SCHEDULES = {
    "constant": S.constant(0.3),
    "linear_warmup": S.linear_warmup(2.0, 4, start=0.5),
    "polynomial_decay": S.polynomial_decay(1.0, 6, end=0.1, power=2.0),
    "cosine_decay": S.cosine_decay(1.0, 6, final=0.01),
    "step_decay": S.step_decay(1.0, [2, 4], factor=0.5),
    "warmup_cosine": S.warmup_cosine(2.0, 3, 8),
    "warmup_polynomial": S.warmup_polynomial(2.0, 3, 8),
    "tvlars_factor": S.tvlars_factor(decay_coefficient=0.7, delay_steps=3, alpha=0.5, gamma_min=0.01),
    "tvlars_factor_far": S.tvlars_factor(decay_coefficient=900.0, delay_steps=0),  # e^x would overflow
}


def namespaces():
    import array_api_strict as xs
    import torch

    out = [("numpy", np, lambda v: np.asarray(v)), ("array-api-strict", xs, lambda v: xs.asarray(v)),
           ("torch", torch, lambda v: torch.asarray(v))]
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        out.append(("jax", jnp, lambda v: jnp.asarray(v)))
    except ImportError:  # pragma: no cover - jax is in the test extra
        pass
    return out


NAMESPACES = namespaces()


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("lib", NAMESPACES, ids=lambda n: n[0])
def test_every_schedule_is_array_arithmetic_on_a_0d_step(lib, name):
    _, xp, make = lib
    schedule = SCHEDULES[name]
    for t in range(10):
        expected = schedule(t)
        got = schedule(make(t))  # an integer 0-d array: computed in the library's default float dtype
        value = float(np.asarray(got)) if not isinstance(got, float) else got
        rel = 1e-14 if isinstance(got, float) or np.asarray(got).dtype == np.float64 else 1e-6
        assert value == pytest.approx(expected, rel=rel, abs=1e-300), f"{name} at {t}"
        got64 = schedule(make(np.float64(t)))
        assert float(np.asarray(got64)) == pytest.approx(expected, rel=1e-14, abs=1e-300)


def problem(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    shapes = [(3, 2), (2,), (2, 2)]
    params = [rng.normal(size=s).astype(dtype) for s in shapes]
    grads = [[rng.normal(size=s).astype(dtype) for s in shapes] for _ in range(3)]
    per_sample = [[rng.normal(size=(4, *s)).astype(dtype) for s in shapes] for _ in range(3)]
    return params, grads, per_sample


def build(spec, **kw):
    required = {"learning_rate": S.warmup_cosine(0.5, 1, 5), "decay_coefficient": 0.3, "delay_steps": 1}
    args = {h.core_name: required[h.core_name] for h in spec.hyperparameters if h.default is REQUIRED}
    return spec.factory(**args, weight_decay=0.01, **kw)


def run(opt, params, grads, per_sample, *, init_step=0, convert=np.asarray, uses_stats=False):
    state = opt.init([convert(p) for p in params], step=init_step)
    ps = [convert(p) for p in params]
    diags = []
    for t in range(3):
        stats = lwrs.per_sample_norm_statistics([convert(s) for s in per_sample[t]]) if uses_stats else None
        ps, state, diag = opt.step(ps, [convert(g) for g in grads[t]], state, norm_stats=stats)
        diags.append(diag)
    return ps, state, diags


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=lambda s: s.name)
@pytest.mark.parametrize("lib", NAMESPACES[:3], ids=lambda n: n[0])
def test_an_array_step_count_gives_the_int_step_results(lib, spec, on_nonfinite):
    _, xp, make = lib
    params, grads, per_sample = problem()
    ref, ref_state, _ = run(build(spec), params, grads, per_sample, uses_stats=spec.uses_norm_stats)
    opt = build(spec, on_nonfinite=on_nonfinite)
    out, state, diags = run(opt, params, grads, per_sample, init_step=make(0), convert=make,
                            uses_stats=spec.uses_norm_stats)
    assert int(state.step) == 3 and ref_state.step == 3
    for a, b in zip(out, ref):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-13, atol=1e-15)
    assert not bool(diags[-1].skipped)


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=lambda s: s.name)
@pytest.mark.parametrize("lib", NAMESPACES[:3], ids=lambda n: n[0])
def test_skip_with_where_keeps_params_state_and_count(lib, spec):
    _, xp, make = lib
    params, grads, per_sample = problem(1)
    opt = build(spec, on_nonfinite="skip")
    ps, state, _ = run(opt, params, grads, per_sample, init_step=make(0), convert=make, uses_stats=spec.uses_norm_stats)
    bad = [make(g) for g in grads[0]]
    bad[1] = make(np.array([np.nan, 1.0]))
    stats = lwrs.per_sample_norm_statistics([make(s) for s in per_sample[0]]) if spec.uses_norm_stats else None
    new, new_state, diag = opt.step(ps, bad, state, norm_stats=stats)
    assert bool(diag.skipped) and int(new_state.step) == 3
    for a, b in zip(new, ps):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for old_arrays, new_arrays in zip(state[1:], new_state[1:]):
        for a, b in zip(old_arrays, new_arrays):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(diag.rates).tolist() == [0.0, 0.0, 0.0]
    assert np.asarray(diag.trust_ratios).tolist() == [1.0, 1.0, 1.0]
    updates, _, _ = opt.update(bad, state, ps, norm_stats=stats)
    assert all(np.all(np.asarray(u) == 0) for u in updates)


class Linear(NamedTuple):
    weight: object
    bias: object


def test_pytrees_give_the_flat_results_in_their_own_structure():
    params, grads, _ = problem(2)
    # leaf order: dict keys sorted -> "a" (a NamedTuple), then "b" (a list)
    tree = {"b": [params[2]], "a": Linear(params[0], params[1])}
    gtree = [{"b": [g[2]], "a": Linear(g[0], g[1])} for g in grads]
    mask = {"b": [False], "a": Linear(True, False)}
    flat_opt = lwrs.lars(0.5, eta=0.1, weight_decay=0.01, adapt_mask=[True, False, False])
    tree_opt = lwrs.lars(0.5, eta=0.1, weight_decay=0.01, adapt_mask=mask)
    flat, fstate = params, flat_opt.init(params)
    state = tree_opt.init(tree)
    for t in range(3):
        flat, fstate, fdiag = flat_opt.step(flat, grads[t], fstate)
        tree, state, diag = tree_opt.step(tree, gtree[t], state)
    assert isinstance(tree, dict) and isinstance(tree["a"], Linear) and isinstance(tree["b"], list)
    np.testing.assert_array_equal(tree["a"].weight, flat[0])
    np.testing.assert_array_equal(tree["a"].bias, flat[1])
    np.testing.assert_array_equal(tree["b"][0], flat[2])
    np.testing.assert_array_equal(diag.rates, fdiag.rates)
    assert diag.trust_ratios[1] == 1.0 and diag.trust_ratios[2] == 1.0 and diag.trust_ratios[0] != 1.0
    with pytest.raises(ValueError, match="adapt_mask has 2 entries but params has 3 layers"):
        lwrs.lars(0.5, adapt_mask={"a": Linear(True, False)}).step(tree, gtree[0], state)


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=lambda s: s.name)
@pytest.mark.parametrize("lib", NAMESPACES, ids=lambda n: n[0])
def test_params_plus_update_is_exactly_step_in_float32(lib, spec):
    name, xp, make = lib
    params, grads, per_sample = problem(3, np.float32)
    opt = build(spec)
    ps = {"w": [make(p) for p in params]}
    state = opt.init(ps)
    for t in range(3):
        g = {"w": [make(x) for x in grads[t]]}
        stats = lwrs.per_sample_norm_statistics([make(s) for s in per_sample[t]]) if spec.uses_norm_stats else None
        updates, ustate, udiag = opt.update(g, state, ps, norm_stats=stats)
        new, state, diag = opt.step(ps, g, state, norm_stats=stats)
        for w, u, n in zip(ps["w"], updates["w"], new["w"]):
            np.testing.assert_array_equal(np.asarray(w + u), np.asarray(n))
            assert u.dtype == n.dtype
        np.testing.assert_array_equal(np.asarray(udiag.rates), np.asarray(diag.rates))
        ps = new


def test_no_autograd_graph_is_needed_for_an_eager_torch_step():
    torch = pytest.importorskip("torch")
    w = [torch.ones(2, 2, dtype=torch.float64)]
    opt = lwrs.lars(0.1, on_nonfinite="skip")
    state = opt.init(w, step=torch.tensor(0))
    new, state, diag = opt.step(w, [torch.full((2, 2), 0.5, dtype=torch.float64)], state)
    assert state.step.dtype == torch.int64 and int(state.step) == 1 and not bool(diag.skipped)


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo's notes on array_api_compat's lru_caches
def test_torch_compile_traces_the_whole_step_without_a_graph_break():
    torch = pytest.importorskip("torch")
    params, grads, _ = problem(6)
    opt = lwrs.lars(S.warmup_cosine(1.0, 2, 10), eta=0.1, weight_decay=1e-3, on_nonfinite="skip")
    ps, gs = [torch.asarray(p) for p in params], [torch.asarray(g) for g in grads[0]]
    state = opt.init(ps, step=torch.tensor(1))
    compiled = torch.compile(lambda p, g, s: opt.step(p, g, s), backend="aot_eager", fullgraph=True)
    new, new_state, diag = compiled(ps, gs, state)
    ref, ref_state, ref_diag = opt.step(ps, gs, state)
    for a, b in zip(new, ref):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)
    assert int(new_state.step) == 2 and not bool(diag.skipped)
    bad = [torch.full_like(g, float("nan")) for g in gs]
    same, bad_state, bad_diag = compiled(ps, bad, state)
    assert bool(bad_diag.skipped) and int(bad_state.step) == 1
    for a, b in zip(same, ps):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- JAX -------------------------------------------------------------------------------------------

jax = pytest.importorskip("jax")
jnp = jax.numpy


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=lambda s: s.name)
def test_jit_of_the_whole_step_equals_eager_with_x64(spec):
    jax.config.update("jax_enable_x64", True)
    params, grads, per_sample = problem(4)
    ref, _, ref_diags = run(build(spec), params, grads, per_sample, uses_stats=spec.uses_norm_stats)
    opt = build(spec, on_nonfinite="skip")

    @jax.jit
    def train_step(ps, g, state, stats):
        return opt.step(ps, g, state, norm_stats=stats)

    ps = {"layers": [jnp.asarray(p) for p in params]}
    state = opt.init(ps, step=jnp.asarray(0))
    for t in range(3):
        stats = lwrs.per_sample_norm_statistics([jnp.asarray(s) for s in per_sample[t]]) if spec.uses_norm_stats else None
        ps, state, diag = train_step(ps, {"layers": [jnp.asarray(x) for x in grads[t]]}, state, stats)
    for a, b in zip(ps["layers"], ref):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(diag.rates), np.asarray(ref_diags[-1].rates), rtol=1e-12)
    assert int(state.step) == 3 and not bool(diag.skipped)
    bad = {"layers": [jnp.full(p.shape, jnp.nan) for p in params]}
    stats = lwrs.per_sample_norm_statistics([jnp.asarray(s) for s in per_sample[0]]) if spec.uses_norm_stats else None
    same, state2, diag2 = train_step(ps, bad, state, stats)
    assert bool(diag2.skipped) and int(state2.step) == 3
    for a, b in zip(same["layers"], ps["layers"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_raise_under_jit_says_to_use_skip():
    opt = lwrs.lars(0.1)
    ps = [jnp.ones((2, 2))]
    with pytest.raises(TypeError, match='on_nonfinite="raise" cannot check traced values.*Pass on_nonfinite="skip"'):
        jax.jit(lambda p, g, s: opt.step(p, g, s))(ps, ps, opt.init(ps, step=jnp.asarray(0)))


def test_grad_and_vmap_through_a_step():
    jax.config.update("jax_enable_x64", True)
    opt = lwrs.lars(0.5, eta=0.1, beta=0.0, on_nonfinite="skip")
    w = [jnp.asarray([[3.0, 4.0]])]
    g = [jnp.asarray([[0.0, 10.0]])]

    def loss(p):
        new, _, _ = opt.step(p, g, opt.init(p))
        return jnp.sum(new[0])

    # d/dw of sum(w - lr * eta * |w| / |g| * g): 1 - lr * eta * sum(g) / |g| * w / |w|
    expected = 1.0 - 0.5 * 0.1 * 10.0 / 10.0 * np.array([[3.0, 4.0]]) / 5.0
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(w)[0]), expected, rtol=1e-12)
    batched = jax.vmap(lambda p: opt.step([p], [p], opt.init([p]))[0][0])(jnp.ones((3, 2, 2)))
    assert batched.shape == (3, 2, 2)


def test_trust_ratio_options_may_be_traced_arrays():
    jax.config.update("jax_enable_x64", True)
    w, d, g = jnp.asarray([2.0, 3.0]), jnp.asarray([4.0, 1.0]), jnp.asarray([1.0, 1.0])

    @jax.jit
    def ratios(eta, eps, max_ratio):
        return lwrs.layer_trust_ratios(w, d, eta=eta, eps=eps, max_ratio=max_ratio, grad_norms=g)

    got = ratios(jnp.asarray(0.5), jnp.asarray(1.0), jnp.asarray(0.6))
    expected = lwrs.layer_trust_ratios(np.asarray(w), np.asarray(d), eta=0.5, eps=1.0, max_ratio=0.6,
                                       grad_norms=np.asarray(g))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-15)  # [0.2, 0.6]: the second is clipped
    assert expected.tolist() == [0.2, 0.6]


def test_larc_with_a_traced_rate():
    jax.config.update("jax_enable_x64", True)
    opt = lwrs.lars(S.linear_warmup(1.0, 2), eta=0.5, larc_clip=True, beta=0.0, on_nonfinite="skip")
    w, g = [np.array([[3.0, 4.0]])], [np.array([[0.0, 10.0]])]
    eager = [opt.step(w, g, opt.init(w, step=t))[2].rates for t in range(3)]
    step = jax.jit(lambda p, q, s: opt.step(p, q, s)[2].rates)
    traced = [step([jnp.asarray(w[0])], [jnp.asarray(g[0])], opt.init(w, step=jnp.asarray(t))) for t in range(3)]
    for a, b in zip(traced, eager):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-14)
    assert [float(r[0]) for r in eager] == [0.0, 0.25, 0.25]  # min(eta |w| / |g|, lr) with lr = 0, 0.5, 1


def test_jit_skips_a_step_that_would_overflow_float32():
    opt = lwrs.mnag(1e38, on_nonfinite="skip")
    w = [jnp.full((2, 2), 10.0, dtype=jnp.float32)]
    step = jax.jit(lambda p, g, s: opt.step(p, g, s))
    new, state, diag = step(w, [jnp.full((2, 2), 10.0, jnp.float32)], opt.init(w, step=jnp.asarray(0)))
    assert bool(diag.skipped) and int(state.step) == 0
    np.testing.assert_array_equal(np.asarray(new[0]), np.asarray(w[0]))


def test_errors_name_a_nested_layer_by_its_path():
    params = {"encoder": Linear(np.ones((2, 2)), np.ones(2)), "head": [np.ones((3, 2))]}
    grads = {"encoder": Linear(np.ones((2, 2)), np.array([0.1, np.nan])), "head": [np.ones((3, 2))]}
    opt = lwrs.lars(0.1)
    with pytest.raises(lwrs.NonFiniteError, match=r"layer 1 \(encoder\.bias\): gradient norm is not finite"):
        opt.step(params, grads, opt.init(params))
    grads["head"] = [np.ones((2, 3))]
    with pytest.raises(ValueError, match=r"layer 2 \(head\[0\]\): grads has shape \(2, 3\) but params has shape \(3, 2\)"):
        opt.step(params, grads, opt.init(params))
