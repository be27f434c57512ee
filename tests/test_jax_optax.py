"""lwrs.backends.jax: the optax transformations against the eager NumPy core, optax itself and optax's wrappers.

Float64 tests run inside ``jax.enable_x64(True)`` and float32 tests inside
``jax.enable_x64(False)``, so the setting neither leaks out nor depends on
other test modules.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import lwrs  # noqa: E402
from lwrs.backends import jax as lj  # noqa: E402

STEPS = 8


class Dense(NamedTuple):
    kernel: object
    bias: object


@jax.tree_util.register_pytree_node_class
class Scale:
    """A custom pytree node: one learnable scale vector."""

    def __init__(self, value):
        self.value = value

    def tree_flatten(self):
        return (self.value,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def _params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "hidden": (jnp.asarray(rng.normal(size=(5, 8)) / 2, dtype), jnp.asarray(rng.normal(size=8) / 10, dtype)),
        "out": Dense(jnp.asarray(rng.normal(size=(8, 3)) / 3, dtype), jnp.zeros(3, dtype)),
        "scale": Scale(jnp.asarray(1.0 + rng.normal(size=3) / 10, dtype)),
    }


def _loss(params, example):
    x, y = example
    (w1, b1), out = params["hidden"], params["out"]
    h = jnp.tanh(x @ w1 + b1)
    return jnp.sum((params["scale"].value * (h @ out.kernel + out.bias) - y) ** 2)


def _batch(dtype, n=16, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, 5)), dtype), jnp.asarray(rng.normal(size=(n, 3)), dtype)


def _options(name):
    """Built when called, so that a schedule's constants take the dtype of the current x64 setting."""
    return {
        "mnag": dict(learning_rate=0.05, beta=0.9, weight_decay=1e-3),
        # optax's own schedules return float32 for an int32 count even with x64: this one keeps float64
        "lars": dict(learning_rate=lambda t: 0.02 + 0.045 * jnp.minimum(t, 4), eta=0.2, weight_decay=1e-3),
        "lars_norm_of_sum": dict(learning_rate=0.1, eta=0.2, weight_decay=1e-2, weight_decay_form="norm_of_sum",
                                 nesterov=False, max_ratio=0.5),
        "clars": dict(learning_rate=0.1, eta=0.5, weight_decay=1e-3),
        "tvlars": dict(learning_rate=0.15, decay_coefficient=0.1, delay_steps=3, alpha=0.5, gamma_min=0.01, eta=0.2),
        "lamb": dict(learning_rate=0.01, weight_decay=1e-2, adapt_mask=lambda w: True),
    }[name]


NAMES = ["mnag", "lars", "lars_norm_of_sum", "clars", "tvlars", "lamb"]


def _factory(name):
    return name.split("_")[0]


@pytest.mark.parametrize("name", NAMES)
def test_jitted_step_equals_eager_numpy_core_in_float64(name):
    """The jitted optax update on a mixed pytree equals the NumPy float64 core step by step to 1e-12."""
    kind = _factory(name)
    with jax.enable_x64(True):
        options = _options(name)
        params = _params(jnp.float64)
        batch = _batch(jnp.float64)
        opt = getattr(lj, kind)(**options)
        core = getattr(lwrs, kind)(**options)
        leaves, treedef = jax.tree.flatten(params)
        core_params = [np.asarray(w) for w in leaves]
        core_state = core.init(core_params)
        state = opt.init(params)

        @jax.jit
        def train_step(params, state, batch):
            _, grads, stats = lj.grad_and_norm_statistics(_loss, params, batch)
            updates, state = opt.update(grads, state, params, norm_stats=stats)
            return optax.apply_updates(params, updates), state

        per_sample = jax.jit(jax.vmap(jax.grad(_loss), in_axes=(None, 0)))
        moved = 0.0
        for _ in range(STEPS):
            core_tree = treedef.unflatten([jnp.asarray(w) for w in core_params])
            ps = [np.asarray(g) for g in jax.tree.leaves(per_sample(core_tree, batch))]
            grads = [g.mean(axis=0) for g in ps]
            stats = lwrs.per_sample_norm_statistics(ps) if kind == "clars" else None
            core_params, core_state, diag = core.step(core_params, grads, core_state, norm_stats=stats)
            params, state = train_step(params, state, batch)
            for got, want in zip(jax.tree.leaves(params), core_params):
                np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
            for field in ("weight_norms", "grad_norms", "trust_ratios", "rates"):
                np.testing.assert_allclose(np.asarray(getattr(state.diagnostics, field)), getattr(diag, field),
                                           rtol=1e-12, atol=1e-15)
            if kind == "clars":
                np.testing.assert_allclose(np.asarray(state.diagnostics.clars_factors), diag.clars_factors, rtol=1e-12)
                assert np.min(diag.clars_factors) < 0.9    # the per-sample term is really in play
        assert isinstance(params["out"], Dense) and isinstance(params["scale"], Scale)
        moved = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(core_params, leaves))
        assert moved > 1e-3, "the trajectory must move for the comparison to mean anything"
        assert int(state.count) == STEPS and state.diagnostics.rates.dtype == jnp.float64


def _lars_pair(nesterov, form="norm_of_sum"):
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.5, warmup_steps=10, decay_steps=50, end_value=0.005)
    ours = lj.lars(schedule, beta=0.9, eta=0.01, weight_decay=1e-3, weight_decay_form=form,
                   adapt_mask=lambda w: True, nesterov=nesterov)
    theirs = optax.lars(schedule, weight_decay=1e-3, trust_coefficient=0.01, momentum=0.9, nesterov=nesterov)
    return ours, theirs


def _run(opt, params, batch, steps):
    grad = jax.grad(lambda p, b: jnp.mean(jax.vmap(_loss, in_axes=(None, 0))(p, b)))

    @jax.jit
    def train_step(params, state, batch):
        updates, state = opt.update(grad(params, batch), state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for _ in range(steps):
        params, state = train_step(params, state, batch)
    return params


@pytest.mark.parametrize("nesterov", [False, True])
def test_equals_optax_lars_in_float32_over_50_steps(nesterov):
    """optax.lars = lars(weight_decay_form="norm_of_sum", adapt_mask=all, nesterov=optax's, eta=trust_coefficient)."""
    with jax.enable_x64(False):
        params, batch = _params(jnp.float32), _batch(jnp.float32)
        ours, theirs = _lars_pair(nesterov)
        chained = [optax.chain(optax.clip_by_global_norm(1.0), o) for o in (ours, theirs)]
        for a, b in [(ours, theirs), tuple(chained)]:
            got, want = _run(a, params, batch, 50), _run(b, params, batch, 50)
            for x, y, w0 in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(params)):
                assert x.dtype == jnp.float32
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
                assert float(jnp.max(jnp.abs(y - w0))) > 1e-2    # every layer moved


def test_optax_lars_mapping_needs_norm_of_sum():
    """The mapping is not vacuous: the default form (sum of norms) gives another trajectory."""
    with jax.enable_x64(False):
        params, batch = _params(jnp.float32), _batch(jnp.float32)
        ours, theirs = _lars_pair(False, form="sum_of_norms")
        got, want = _run(ours, params, batch, 50), _run(theirs, params, batch, 50)
        assert max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want))) > 1e-4


def _grads(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape), w.dtype), params)


def test_multisteps_accumulates_like_one_big_batch():
    """optax.MultiSteps accumulates in float32 whatever the params' dtype, so this runs in float32."""
    with jax.enable_x64(False):
        params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.ones(3)}
        g1, g2 = _grads(params, 1), _grads(params, 2)
        multi = optax.MultiSteps(lj.lars(0.5, eta=0.1), every_k_schedule=2)
        state = multi.init(params)
        u1, state = jax.jit(multi.update)(g1, state, params)
        assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(u1))
        u2, state = jax.jit(multi.update)(g2, state, params)
        single = lj.lars(0.5, eta=0.1)
        mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
        want, _ = jax.jit(single.update)(mean, single.init(params), params)
        for x, y in zip(jax.tree.leaves(u2), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
            assert float(jnp.max(jnp.abs(y))) > 1e-3


def test_masked_leaves_other_layers_alone():
    with jax.enable_x64(True):
        params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
        grads = _grads(params, 3)
        opt = optax.masked(lj.lars(0.5, eta=0.1), {"w": True, "b": False})
        updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
        np.testing.assert_array_equal(np.asarray(updates["b"]), np.asarray(grads["b"]))  # passed through
        alone = lj.lars(0.5, eta=0.1)
        want, _ = alone.update({"w": grads["w"]}, alone.init({"w": params["w"]}), {"w": params["w"]})
        np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(want["w"]), rtol=1e-14)


def test_inject_hyperparams_learning_rate():
    with jax.enable_x64(True):
        params = _params(jnp.float64)
        grads = _grads(params, 4)
        opt = optax.inject_hyperparams(lj.lars)(learning_rate=0.1, eta=0.05, weight_decay=1e-3)
        state = opt.init(params)
        state.hyperparams["learning_rate"] = jnp.asarray(0.03)
        state.hyperparams["eta"] = jnp.asarray(0.02)
        updates, state = jax.jit(opt.update)(grads, state, params)
        plain = lj.lars(0.03, eta=0.02, weight_decay=1e-3)
        want, _ = jax.jit(plain.update)(grads, plain.init(params), params)
        for x, y in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12)


def test_masks_as_pytrees_callables_and_leaf_sequences_agree():
    with jax.enable_x64(True):
        params = {"w": jnp.ones((3, 2)), "b": jnp.full(2, 2.0)}
        grads = _grads(params, 5)
        results = []
        for mask in ({"w": False, "b": True}, lambda w: w.ndim == 1, [True, False]):  # leaf order: b, w
            opt = lj.lars(1.0, eta=0.1, beta=0.0, adapt_mask=mask)
            _, state = opt.update(grads, opt.init(params), params)
            results.append(np.asarray(state.diagnostics.trust_ratios))
        assert results[0][1] == 1.0 and results[0][0] != 1.0
        for r in results[1:]:
            np.testing.assert_array_equal(r, results[0])
        with pytest.raises(TypeError, match=r"adapt_mask for layer \['b'\] must be a bool"):
            lj.lars(1.0, adapt_mask={"w": True, "b": "yes"}).update(grads, lj.lars(1.0).init(params), params)


def test_nonfinite_skip_under_jit_and_raise_naming_the_layer():
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    bad = {"w": jnp.ones((3, 2)), "b": jnp.array([1.0, jnp.nan])}
    skip = lj.lars(0.1, on_nonfinite="skip")
    state = skip.init(params)
    updates, new = jax.jit(skip.update)(bad, state, params)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
    assert int(new.count) == 0 and bool(new.diagnostics.skipped)
    updates, new = jax.jit(skip.update)(params, new, params)
    assert int(new.count) == 1 and not bool(new.diagnostics.skipped)
    raising = lj.lars(0.1)
    with pytest.raises(lwrs.NonFiniteError, match=r"layer \['b'\]: gradient norm is not finite .* at step 0"):
        raising.update(bad, raising.init(params), params)
    with pytest.raises(Exception, match=r"layer \['b'\]: gradient norm is not finite"):
        jax.block_until_ready(jax.jit(raising.update)(bad, raising.init(params), params))


def test_bad_input_is_refused_clearly():
    params = {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match="eta"):
        lj.lars(0.1, eta=-1.0)
    with pytest.raises(ValueError, match="weight_decay_form"):
        lj.clars(0.1, weight_decay_form="sum")
    opt = lj.clars(0.1)
    with pytest.raises(ValueError, match="clars needs norm_stats"):
        opt.update(params, opt.init(params), params)
    bad_stats = lwrs.NormStatistics(jnp.ones(2), jnp.ones(2), 4)
    with pytest.raises(ValueError, match=r"norm_stats.sum_norms has shape \(2,\), but params has 1 layers"):
        opt.update(params, opt.init(params), params, norm_stats=bad_stats)
    with pytest.raises(ValueError, match=r"layer \['w'\]: updates has shape \(2, 3\)"):
        opt.update({"w": jnp.ones((2, 3))}, opt.init(params), params)
    with pytest.raises(ValueError, match="updates does not have the structure of params"):
        opt.update({"v": jnp.ones((3, 2))}, opt.init(params), params)
    with pytest.raises(ValueError, match="need params"):
        opt.update(params, opt.init(params))


@pytest.mark.parametrize("name", ["mnag", "lars", "clars", "tvlars", "lamb"])
def test_option_names_and_defaults_are_the_tables(name):
    def options(factory):
        return [(p.name, p.kind, p.default) for p in inspect.signature(factory).parameters.values()]

    assert options(getattr(lj, name)) == options(getattr(lwrs, name))
    spec = lwrs.table.spec(name)
    ours = inspect.signature(getattr(lj, name)).parameters
    assert list(ours) == [h.core_name for h in spec.hyperparameters]
    for h in spec.hyperparameters:
        want = inspect.Parameter.empty if h.default is lwrs.table.REQUIRED else h.default
        assert ours[h.core_name].default == want, h.core_name


def test_bfloat16_params_keep_their_dtype_and_float32_norms():
    with jax.enable_x64(False):
        params = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.bfloat16).reshape(3, 2), "b": jnp.ones(2, jnp.bfloat16)}
        grads = jax.tree.map(lambda w: jnp.full_like(w, 0.5), params)
        opt = lj.lars(0.1, weight_decay=1e-4)
        updates, state = jax.jit(opt.update)(grads, opt.init(params), params)
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
        assert state.diagnostics.rates.dtype == jnp.float32
        full = lj.lars(0.1, weight_decay=1e-4)
        p32 = jax.tree.map(lambda w: w.astype(jnp.float32), params)
        want, _ = full.update(jax.tree.map(lambda g: g.astype(jnp.float32), grads), full.init(p32), p32)
        for x, y in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y), rtol=2e-2)


def test_vmap_over_an_ensemble_equals_each_member():
    with jax.enable_x64(True):
        members = [_params(jnp.float64, seed) for seed in range(3)]
        grads = [_grads(p, 10 + i) for i, p in enumerate(members)]
        stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731
        opt = lj.lars(0.1, eta=0.05, on_nonfinite="skip")
        updates, _ = jax.jit(jax.vmap(opt.update))(stack(grads), jax.vmap(opt.init)(stack(members)), stack(members))
        for i, (p, g) in enumerate(zip(members, grads)):
            want, _ = opt.update(g, opt.init(p), p)
            for x, y in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
                np.testing.assert_allclose(np.asarray(x[i]), np.asarray(y), rtol=1e-12, atol=1e-15)


def test_grad_through_a_step_matches_finite_differences():
    with jax.enable_x64(True):
        opt = lj.lars(0.3, eta=0.1, weight_decay=1e-2)
        params, batch = _params(jnp.float64), _batch(jnp.float64)
        loss = lambda p: jnp.mean(jax.vmap(_loss, in_axes=(None, 0))(p, batch))  # noqa: E731

        def after_one_step(p):
            updates, _ = opt.update(jax.grad(loss)(p), opt.init(p), p)
            return loss(optax.apply_updates(p, updates))

        grad = jax.jit(jax.grad(after_one_step))(params)
        w = params["out"].kernel
        e = jnp.zeros_like(w).at[1, 2].set(1e-6)
        shifted = lambda s: {**params, "out": Dense(w + s * e, params["out"].bias)}  # noqa: E731
        fd = (after_one_step(shifted(1.0)) - after_one_step(shifted(-1.0))) / 2e-6
        np.testing.assert_allclose(float(grad["out"].kernel[1, 2]), float(fd), rtol=1e-6)
