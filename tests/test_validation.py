"""Bad input: a clear error naming the layer and the value, never a silent NaN or a half-updated state."""

from __future__ import annotations

import re

import numpy as np
import pytest

import lwrs

torch = pytest.importorskip("torch")
xs = pytest.importorskip("array_api_strict")


def layers():
    return [np.ones((2, 3)), np.ones(3)], [np.full((2, 3), 0.1), np.full(3, 0.1)]


def step(opt, params, grads, **kw):
    return opt.step(params, grads, opt.init(params), **kw)


def raises(exc, text):
    return pytest.raises(exc, match=re.escape(text))


def test_layer_count_mismatch():
    params, grads = layers()
    with raises(ValueError, "grads has 1 layers but params has 2"):
        step(lwrs.lars(0.1), params, grads[:1])


def test_shape_mismatch_names_the_layer():
    params, grads = layers()
    with raises(ValueError, "layer 1: grads has shape (4,) but params has shape (3,)"):
        step(lwrs.lars(0.1), params, [grads[0], np.ones(4)])


def test_dtype_mismatch_names_the_layer():
    params, grads = layers()
    with raises(ValueError, "layer 0: grads has dtype float32 but params has dtype float64"):
        step(lwrs.mnag(0.1), params, [grads[0].astype(np.float32), grads[1]])


def test_state_from_another_model_is_rejected():
    params, grads = layers()
    opt = lwrs.lars(0.1)
    other = opt.init([np.ones((2, 3)), np.ones(4)])
    with raises(ValueError, "layer 1: trace has shape (4,) but params has shape (3,)"):
        opt.step(params, grads, other)
    with raises(TypeError, "state must be a MomentumState"):
        opt.step(params, grads, lwrs.lamb(0.1).init(params))


def test_mixed_array_libraries():
    params, grads = layers()
    with raises(TypeError, "layer 1 of grads is a torch array but layer 0 of params is a numpy array"):
        step(lwrs.lars(0.1), params, [grads[0], torch.ones(3, dtype=torch.float64)])


def test_mixed_devices_array_api_strict():
    cpu = xs.Device("CPU_DEVICE")
    other = xs.Device("device1")
    params = [xs.ones((2, 2), dtype=xs.float64, device=cpu), xs.ones(2, dtype=xs.float64, device=other)]
    with pytest.raises(ValueError, match=r"layer 1 of params is on device .*device1.* but layer 0 of params is on"):
        lwrs.lars(0.1).init(params)


def test_mixed_devices_torch_meta():
    params = [torch.ones(2, 2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)]
    grads = [torch.ones(2, 2, dtype=torch.float64), torch.ones(2, dtype=torch.float64, device="meta")]
    with pytest.raises(ValueError, match=r"layer 1 of grads is on device .*meta.* but layer 0 of params is on"):
        step(lwrs.lars(0.1), params, grads)


def test_params_must_be_a_sequence():
    with raises(TypeError, "params must be a list, tuple, dict or NamedTuple of per-layer arrays, got ndarray"):
        lwrs.lars(0.1).init(np.ones(3))
    with raises(ValueError, "params is empty"):
        lwrs.lars(0.1).init([])
    with raises(TypeError, "layer 0 of params has dtype int64; a real floating dtype is needed"):
        lwrs.lars(0.1).init([np.ones(3, dtype=np.int64)])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lwrs.lars(-0.1), "learning_rate must lie in [0.0, inf], got -0.1"),
        (lambda: lwrs.mnag(0.1, beta=1.0), "beta must lie in [0.0, 1.0), got 1.0"),
        (lambda: lwrs.lars(0.1, beta=-0.5), "beta must lie in [0.0, 1.0), got -0.5"),
        (lambda: lwrs.lars(0.1, eta=0.0), "eta must lie in (0.0, inf], got 0.0"),
        (lambda: lwrs.clars(0.1, weight_decay=-1e-4), "weight_decay must lie in [0.0, inf], got -0.0001"),
        (lambda: lwrs.lars(0.1, eps=float("nan")), "eps must be finite, got nan"),
        (lambda: lwrs.lars(0.1, max_ratio=0.0), "max_ratio must lie in (0.0, inf], got 0.0"),
        (lambda: lwrs.lars(0.1, max_ratio=0.1, larc_clip=True), "larc_clip and max_ratio cannot be combined"),
        (lambda: lwrs.lars(0.1, weight_decay_form="l2"), 'weight_decay_form must be "sum_of_norms" or "norm_of_sum"'),
        (lambda: lwrs.lamb(0.1, beta2=1.0), "beta2 must lie in [0.0, 1.0), got 1.0"),
        (lambda: lwrs.lamb(0.1, eps=0.0), "eps must lie in (0.0, inf], got 0.0"),
        (lambda: lwrs.tvlars(0.1, decay_coefficient=1e-3, delay_steps=0, alpha=-1.0), "alpha must lie in (0.0, inf], got -1.0"),
        (lambda: lwrs.lars(0.1, on_nonfinite="ignore"), 'on_nonfinite must be "raise" or "skip"'),
    ],
)
def test_impossible_hyperparameters(make, message):
    with raises(ValueError, message):
        make()


def test_mask_length_is_checked():
    params, grads = layers()
    with raises(ValueError, "adapt_mask has 3 entries but params has 2 layers"):
        step(lwrs.lars(0.1, adapt_mask=[True, True, False]), params, grads)


def test_clars_requires_statistics_of_the_right_size():
    params, grads = layers()
    with raises(ValueError, "clars needs norm_stats"):
        step(lwrs.clars(0.1), params, grads)
    bad = lwrs.NormStatistics(np.ones(3), np.ones(3), 4)
    with raises(ValueError, "norm_stats.sum_norms has shape (3,), expected (2,)"):
        step(lwrs.clars(0.1), params, grads, norm_stats=bad)
    with raises(ValueError, "norm_stats.count must be positive, got 0"):
        step(lwrs.clars(0.1), params, grads, norm_stats=lwrs.NormStatistics(np.ones(2), np.ones(2), 0))


@pytest.mark.parametrize("name", lwrs.table.names())
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_naming_the_layer(name, bad):
    params, grads = layers()
    grads[1] = grads[1].copy()
    grads[1][2] = bad
    opt = make_optimizer(name)
    stats = lwrs.NormStatistics(np.ones(2), np.ones(2), 3)
    with pytest.raises(lwrs.NonFiniteError, match=r"layer 1: gradient norm is not finite \(value (nan|inf)\) at step 0"):
        opt.step(params, grads, opt.init(params), norm_stats=stats)


def make_optimizer(name, **kw):
    extra = {"tvlars": dict(decay_coefficient=1e-3, delay_steps=10)}.get(name, {})
    return getattr(lwrs, name)(0.1, **extra, **kw)


@pytest.mark.parametrize("name", lwrs.table.names())
def test_skip_leaves_params_and_state_untouched(name):
    params, grads = layers()
    opt = make_optimizer(name, on_nonfinite="skip")
    stats = lwrs.NormStatistics(np.ones(2), np.ones(2), 3)
    params, state, _ = opt.step(params, grads, opt.init(params), norm_stats=stats)  # one good step first
    bad = [grads[0], np.array([0.1, np.nan, 0.1])]
    new_params, new_state, diag = opt.step(params, bad, state, norm_stats=stats)
    assert diag.skipped and new_state is state and new_state.step == 1
    for a, b in zip(new_params, params):
        np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(np.concatenate([np.ravel(p) for p in new_params])))


def test_nonfinite_statistics_raise():
    params, grads = layers()
    stats = lwrs.NormStatistics(np.array([1.0, np.inf]), np.ones(2), 3)
    with raises(lwrs.NonFiniteError, "layer 1: mean per-sample gradient norm is not finite"):
        step(lwrs.clars(0.1), params, grads, norm_stats=stats)


def test_nonfinite_parameter_raises():
    params, grads = layers()
    params[0] = np.full((2, 3), np.nan)
    with raises(lwrs.NonFiniteError, "layer 0: parameter norm is not finite"):
        step(lwrs.lars(0.1), params, grads)


def test_a_failing_schedule_leaves_no_half_updated_state():
    params, grads = layers()
    opt = lwrs.lars(lambda t: 0.1 if t == 0 else -1.0)
    state = opt.init(params)
    params1, state1, _ = opt.step(params, grads, state)
    trace_before = [d.copy() for d in state1.trace]
    with raises(ValueError, "learning_rate schedule returned -1.0 at step 1"):
        opt.step(params1, grads, state1)
    for a, b in zip(state1.trace, trace_before):
        np.testing.assert_array_equal(a, b)


def test_zero_norm_paths_emit_no_warnings_and_no_nan():
    """Zero weights and zero gradients together: where() keeps 0/0 out of both branches."""
    params = [np.zeros((2, 2)), np.zeros(2)]
    grads = [np.zeros((2, 2)), np.zeros(2)]
    stats = lwrs.NormStatistics(np.zeros(2), np.zeros(2), 4)
    for name in ["lars", "clars", "lamb"]:
        opt = make_optimizer(name)
        with np.errstate(all="raise"):
            new, _, diag = opt.step(params, grads, opt.init(params), norm_stats=stats)
        assert np.all(np.isfinite(diag.rates)) and all(np.all(np.isfinite(w)) for w in new)


# ---- a fresh-eyes review of the functional API (review-core-3) ------------------------------------------------


@pytest.mark.parametrize("grads, message", [
    ({"enc": np.full((4, 4), 0.1), "dec": np.full((4, 4), 0.5)},
     r"params is a dict with keys \['decoder', 'encoder'\], grads a dict with keys \['dec', 'enc'\]"),
    ([np.full((4, 4), 0.1), np.full((4, 4), 0.5)], r"params is a dict with keys .*, grads a list of 2"),
    ({"encoder": np.ones((4, 4)), "decoder": [np.ones((4, 4))]}, r"params at \['decoder'\] is a leaf, grads at"),
], ids=["other-keys", "list-for-dict", "nested"])
def test_grads_of_another_structure_are_refused(grads, message):
    """The leaves were paired by position: the decoder was stepped with the encoder's gradient (review-core-3, 1)."""
    opt = lwrs.lars(0.1, eta=0.01)
    params = {"encoder": np.ones((4, 4)), "decoder": np.full((4, 4), 2.0)}
    with pytest.raises(ValueError, match=message):
        opt.step(params, grads, opt.init(params))
    with pytest.raises(ValueError, match=message):
        opt.update(grads, opt.init(params), params)
    # a tuple of the layers of a list, in the same order, is the same structure
    layers = [np.ones((2, 2)), np.full((2,), 2.0)]
    new, _, _ = opt.step(layers, tuple(np.ones_like(w) for w in layers), opt.init(layers))
    assert isinstance(new, list)


@pytest.mark.parametrize("field", ["sum_norms", "sum_squared_norms"])
def test_negative_statistics_are_refused(field):
    """A negative sum of norms fell through to the ratio-1 rule: a step 100x the exact one (review-core-3, 3)."""
    w, g = [np.ones((2, 2)), np.ones((3, 3))], [np.ones((2, 2)), np.ones((3, 3))]
    opt = lwrs.clars(0.1, eta=0.01)
    good = lwrs.NormStatistics(np.array([8.0, 12.0]), np.array([16.0, 36.0]), 4)
    bad = good._replace(**{field: getattr(good, field) * np.array([1.0, -1.0])})
    with pytest.raises(ValueError, match=rf"layer 1: norm_stats.{field} is -\d+\.0; a sum of norms cannot be negative"):
        opt.step(w, g, opt.init(w), norm_stats=bad)
    skip = lwrs.clars(0.1, eta=0.01, on_nonfinite="skip")
    with pytest.raises(ValueError, match="cannot be negative"):  # not a non-finite value: refused under skip too
        skip.step(w, g, skip.init(w), norm_stats=bad)


def test_per_sample_statistics_take_the_params_pytree_in_its_layer_order():
    """A dict was refused with "params must be a ... dict ..., got dict"; the obvious workaround, a list of its
    values in insertion order, paired the statistics with the wrong layers (review-core-3, 2)."""
    params = {"w": np.ones((3, 3)), "v": np.ones((3, 2))}
    per_sample = {"w": np.ones((4, 3, 3)), "v": 5 * np.ones((4, 3, 2))}
    stats = lwrs.per_sample_norm_statistics(per_sample)
    by_layer = lwrs.per_sample_norm_statistics([per_sample["v"], per_sample["w"]])  # sorted keys: v, w
    np.testing.assert_array_equal(stats.sum_norms, by_layer.sum_norms)
    grads = {k: g.mean(axis=0) for k, g in per_sample.items()}
    opt = lwrs.clars(1.0, eta=0.01)
    _, _, diag = opt.step(params, grads, opt.init(params), norm_stats=stats)
    np.testing.assert_allclose(diag.clars_factors, [1.0, 1.0], rtol=1e-12)  # identical samples: factor 1
    assert lwrs.subsample_norm_statistics(per_sample, [0, 1]).count == 2
    assert len(lwrs.minibatch_gradients(per_sample, 2)) == 2
    np.testing.assert_allclose(lwrs.gradient_variance_ratio(per_sample), [1.0, 1.0])


@pytest.mark.parametrize("make", [lambda: lwrs.lars(0.1), lambda: lwrs.lamb(0.1), lambda: lwrs.mnag(0.1)],
                         ids=["lars", "lamb", "mnag"])
def test_a_0d_numpy_layer_stays_an_array(make):
    """NumPy's operators give 0-d results as scalars (np.float32): the new layer and its state were scalars, not
    arrays of the library (review-core-3, 11)."""
    opt = make()
    p = [np.array(2.0, np.float32), np.ones((2, 2), np.float32)]
    new, state, _ = opt.step(p, p, opt.init(p))
    update, _, _ = opt.update(p, opt.init(p), p)
    for x in [new[0], update[0], *[f[0] for f in state[1:]]]:
        assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape == ()


def test_lamb_warns_about_float16_layers():
    """LAMB's second moment underflows float16: with |g| = 0.01 the bias stepped 41.9 at lr 0.01 (review-core-3, 5).
    Now it says so, in the core, the torch class and the optax transformation; float32 and bfloat16 are quiet."""
    import warnings

    w = [np.ones((8, 8), np.float16), np.ones(8, np.float16)]
    with pytest.warns(RuntimeWarning, match="LAMB with float16 layers: its second moment"):
        lwrs.lamb(0.01).init(w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lwrs.lamb(0.01).init([x.astype(np.float32) for x in w])
    torch = pytest.importorskip("torch")
    from lwrs.backends.torch import LAMB

    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    p.grad = torch.full_like(p, 0.01)
    with pytest.warns(RuntimeWarning, match="LAMB with float16 layers"):
        LAMB([p], lr=0.01).step()
    q = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    q.grad = torch.full_like(q, 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LAMB([q], lr=0.01).step()
    pytest.importorskip("optax")
    import jax.numpy as jnp

    from lwrs.backends import jax as lj

    with pytest.warns(RuntimeWarning, match="LAMB with float16 layers"):
        lj.lamb(0.01).init({"w": jnp.ones(4, jnp.float16)})
