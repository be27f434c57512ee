"""Every optimizer, on every backend, against the independent NumPy float64 oracle.

Namespace, device, shape and dtype are checked before values (backends.assert_array),
so a backend cannot pass by silently turning into NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest

import lwrs
from array_backends import assert_array
from oracles import LambOracle, LayerwiseOracle, tvlars_phi

SHAPES = [(4, 3), (3,), (2, 2, 3), (5,)]
BATCH = 6
STEPS = 4


def make_problem(seed=0):
    """Initial weights (one 2-D layer zero-initialised) and per-step per-sample gradients."""
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s) for s in SHAPES]
    params[2] = np.zeros(SHAPES[2])  # zero weight norm: ratio 1, weight decay still applies
    per_sample = [[rng.normal(loc=0.3, size=(BATCH, *s)) for s in SHAPES] for _ in range(STEPS)]
    return params, per_sample


def ramp(t):
    return 0.05 * (1 + t)


# name: (lwrs factory, oracle kwargs, uses per-sample statistics)
CONFIGS = {
    "mgd": (lambda: lwrs.mgd(0.1, weight_decay=0.01), dict(kind="mgd", lr=0.1, beta=0.0, weight_decay=0.01), False),
    "mnag-ramp": (lambda: lwrs.mnag(ramp, beta=0.9), dict(kind="mnag", lr=ramp, beta=0.9), False),
    "mnag-heavy-ball": (lambda: lwrs.mnag(0.1, beta=0.5, nesterov=False),
                        dict(kind="mnag", lr=0.1, beta=0.5, nesterov=False), False),
    "lars": (lambda: lwrs.lars(ramp, eta=0.02, weight_decay=0.01),
             dict(kind="lars", lr=ramp, eta=0.02, weight_decay=0.01), False),
    "lars-norm-of-sum": (lambda: lwrs.lars(0.5, eta=0.02, weight_decay=0.05, weight_decay_form="norm_of_sum"),
                         dict(kind="lars", lr=0.5, eta=0.02, weight_decay=0.05, form="norm_of_sum"), False),
    "lars-larc": (lambda: lwrs.lars(0.02, eta=0.05, larc_clip=True, beta=0.5),
                  dict(kind="lars", lr=0.02, eta=0.05, larc=True, beta=0.5), False),
    "lars-clip-eps-masks": (
        lambda: lwrs.lars(1.0, eta=0.5, eps=1e-3, max_ratio=0.1, adapt_mask=[True, True, False, True],
                          weight_decay_mask=[True, False, True, False], weight_decay=0.1),
        dict(kind="lars", lr=1.0, eta=0.5, eps=1e-3, max_ratio=0.1, adapt=[True, True, False, True],
             decay=[True, False, True, False], weight_decay=0.1), False),
    "clars": (lambda: lwrs.clars(ramp, eta=0.02, weight_decay=0.01),
              dict(kind="clars", lr=ramp, eta=0.02, weight_decay=0.01), True),
    "clars-norm-of-sum": (lambda: lwrs.clars(0.5, eta=0.02, weight_decay=0.05, weight_decay_form="norm_of_sum"),
                          dict(kind="clars", lr=0.5, eta=0.02, weight_decay=0.05, form="norm_of_sum"), True),
    "lars-with-stats": (lambda: lwrs.lars(0.5, eta=0.02), dict(kind="lars", lr=0.5, eta=0.02), True),
    "tvlars": (lambda: lwrs.tvlars(2.0, decay_coefficient=0.5, delay_steps=1, eta=0.02, weight_decay=0.01),
               dict(kind="tvlars", lr=2.0, eta=0.02, weight_decay=0.01,
                    phi=lambda t: tvlars_phi(t, decay=0.5, delay=1)), False),
}


def stats_for(backend, dtype, samples, params_now, name):
    """Per-sample statistics as a user would compute them; decayed samples for norm_of_sum CLARS."""
    if name == "clars-norm-of-sum":
        samples = [s + 0.05 * w[None] for s, w in zip(samples, params_now)]
    return lwrs.per_sample_norm_statistics(backend.layers(samples, dtype))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_momentum_family_matches_oracle(backend, name, dtype):
    factory, oracle_kwargs, uses_stats = CONFIGS[name]
    params0, per_sample = make_problem()
    oracle = LayerwiseOracle(params0, **oracle_kwargs)
    opt = factory()
    params = backend.layers(params0, dtype)
    state = opt.init(params)
    for t in range(STEPS):
        grads_np = [s.mean(axis=0) for s in per_sample[t]]
        stats = stats_for(backend, dtype, per_sample[t], oracle.mom.w, name) if uses_stats else None
        record = oracle.step(grads_np, per_sample[t] if uses_stats else None)
        params, state, diag = opt.step(params, backend.layers(grads_np, dtype), state, norm_stats=stats)
        wn, gn, factor, rate = (np.array(col) for col in zip(*record))
        assert_array(diag.weight_norms, wn, backend, dtype, what=f"{name} step {t} weight norms")
        assert_array(diag.grad_norms, gn, backend, dtype, what=f"{name} step {t} grad norms")
        assert_array(diag.rates, rate, backend, dtype, what=f"{name} step {t} rates")
        assert_array(diag.clars_factors, factor, backend, dtype, what=f"{name} step {t} CLARS factors")
        assert state.step == t + 1 and diag.step == t and not diag.skipped
    # float32 steps compound round-off over the rates; values are O(1)
    atol = 0 if dtype == "float64" else 1e-5
    for k, w in enumerate(params):
        assert_array(w, oracle.mom.w[k], backend, dtype, atol=atol, what=f"{name} layer {k} weights")
    trace = oracle.mom.trace()
    if trace is not None:
        for k, d in enumerate(state.trace):
            assert_array(d, trace[k], backend, dtype, rtol=1e-9 if dtype == "float64" else 1e-4,
                         atol=1e-12 if dtype == "float64" else 1e-5, what=f"{name} layer {k} trace")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_lamb_matches_oracle(backend, dtype):
    params0, per_sample = make_problem(1)
    oracle = LambOracle(params0, lr=0.05, weight_decay=0.01)
    opt = lwrs.lamb(0.05, weight_decay=0.01)
    params = backend.layers(params0, dtype)
    state = opt.init(params)
    for t in range(STEPS):
        grads_np = [s.mean(axis=0) for s in per_sample[t]]
        record = oracle.step(grads_np)
        params, state, diag = opt.step(params, backend.layers(grads_np, dtype), state)
        wn, gn, ratio, rate = (np.array(col) for col in zip(*record))
        rtol = None if dtype == "float64" else 1e-4  # Adam's division by sqrt(v) amplifies float32 round-off
        assert_array(diag.trust_ratios, ratio, backend, dtype, rtol=rtol, what=f"lamb step {t} ratios")
        assert_array(diag.rates, rate, backend, dtype, rtol=rtol, what=f"lamb step {t} rates")
    for k, w in enumerate(params):
        assert_array(w, oracle.w[k], backend, dtype, rtol=1e-9 if dtype == "float64" else 1e-4,
                     atol=0 if dtype == "float64" else 1e-5, what=f"lamb layer {k}")
    for k in range(len(params)):
        assert_array(state.first_moment[k], oracle.m[k], backend, dtype, rtol=1e-9 if dtype == "float64" else 1e-4,
                     atol=1e-12 if dtype == "float64" else 1e-6, what=f"lamb m {k}")


def test_inputs_are_not_mutated(backend):
    """Beyond read-only NumPy: every backend's inputs keep their values after a step."""
    params0, per_sample = make_problem(2)
    grads_np = [s.mean(axis=0) for s in per_sample[0]]
    for factory, _, uses_stats in CONFIGS.values():
        opt = factory()
        params = backend.layers(params0)
        grads = backend.layers(grads_np)
        state = opt.init(params)
        state_before = [backend.to_numpy(d).copy() for d in state.trace]
        stats = lwrs.per_sample_norm_statistics(backend.layers(per_sample[0])) if uses_stats else None
        for _ in range(2):
            opt.step(params, grads, state, norm_stats=stats)
        for k in range(len(SHAPES)):
            np.testing.assert_array_equal(backend.to_numpy(params[k]), params0[k])
            np.testing.assert_array_equal(backend.to_numpy(grads[k]), grads_np[k])
            np.testing.assert_array_equal(backend.to_numpy(state.trace[k]), state_before[k])


def _table_case(spec):
    """The optimizer with the table's defaults (plus the required values and weight decay) and its oracle kwargs."""
    d = spec.defaults()
    kwargs = dict(learning_rate=ramp, weight_decay=0.01)
    if spec.name == "tvlars":
        kwargs.update(decay_coefficient=0.5, delay_steps=1)
    oracle = dict(lr=ramp, weight_decay=0.01)
    if spec.name == "lamb":  # the LAMB oracle takes a constant rate
        kwargs["learning_rate"] = oracle["lr"] = 0.05
        oracle.update(b1=d["beta1"], b2=d["beta2"], eps=d["eps"])
        return kwargs, oracle
    oracle.update(kind=spec.name, beta=d.get("beta", 0.0), eta=d.get("eta", 1.0), nesterov=d.get("nesterov", True),
                  form=d.get("weight_decay_form", "sum_of_norms"), eps=d.get("eps", 0.0),
                  max_ratio=d.get("max_ratio"), larc=d.get("larc_clip", False))
    if spec.name == "tvlars":
        oracle["phi"] = lambda t: tvlars_phi(t, decay=0.5, delay=1, alpha=d["alpha"], gamma_min=d["gamma_min"])
    return kwargs, oracle


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("spec", lwrs.table.OPTIMIZERS, ids=lambda s: s.name)
def test_every_optimizer_of_the_table_with_its_defaults_matches_oracle(backend, spec, dtype):
    """Adding an optimizer to lwrs.table makes it run here, with the table's defaults, on every backend."""
    kwargs, oracle_kwargs = _table_case(spec)
    params0, per_sample = make_problem(3)
    oracle = (LambOracle if spec.name == "lamb" else LayerwiseOracle)(params0, **oracle_kwargs)
    opt = spec.factory(**kwargs)
    params = backend.layers(params0, dtype)
    state = opt.init(params)
    for t in range(STEPS):
        grads_np = [s.mean(axis=0) for s in per_sample[t]]
        stats = lwrs.per_sample_norm_statistics(backend.layers(per_sample[t], dtype)) if spec.uses_norm_stats else None
        if spec.name == "lamb":
            record = oracle.step(grads_np)
        else:
            record = oracle.step(grads_np, per_sample[t] if spec.uses_norm_stats else None)
        params, state, diag = opt.step(params, backend.layers(grads_np, dtype), state, norm_stats=stats)
        rate = np.array([r[3] for r in record])
        assert_array(diag.rates, rate, backend, dtype, rtol=None if dtype == "float64" else 1e-4,
                     what=f"{spec.name} step {t} rates")
    weights = oracle.w if spec.name == "lamb" else oracle.mom.w
    for k, w in enumerate(params):
        assert_array(w, weights[k], backend, dtype, rtol=1e-9 if dtype == "float64" else 1e-4,
                     atol=0 if dtype == "float64" else 1e-5, what=f"{spec.name} layer {k} weights")
