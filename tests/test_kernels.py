"""The core's public kernels (what a fast backend calls or is tested against), and input validation."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import lwrs
from lwrs import schedules as S
from oracles import tvlars_phi


def raises(exc, text):
    return pytest.raises(exc, match=re.escape(text))


@pytest.mark.parametrize("ratio", [1e-1, 1e-2, 1e-4, 1e-6])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_norm_of_sum_is_exact_near_the_weight_decay_equilibrium(ratio, dtype):
    """|g + wd w| with g = -wd w + delta, |delta| = ratio |wd w| (issue 13, item 5), against float64 on the same inputs."""
    rng = np.random.default_rng(0)
    wd = 0.5  # a power of two: wd * w is exact, so the direct sum is exact to rounding (Sterbenz)
    w = rng.normal(size=(512, 512)).astype(dtype)
    delta = rng.normal(size=w.shape)
    delta *= ratio * np.linalg.norm(wd * w.astype(np.float64)) / np.linalg.norm(delta)
    g = (-wd * w.astype(np.float64) + delta).astype(dtype)
    exact = np.linalg.norm(g.astype(np.float64) + wd * w.astype(np.float64))
    got = lwrs.rates.weight_decayed_norms([w], [g], weight_decays=[wd], weight_decay_form="norm_of_sum")
    assert got.dtype == dtype
    assert abs(float(got[0]) - exact) / exact < (1e-5 if dtype == np.float32 else 1e-12)
    if dtype == np.float32 and ratio <= 1e-4:  # the expanded form a fast path must not use
        gg, gw, ww = (float(np.sum(a * b, dtype=np.float32)) for a, b in ((g, g), (g, w), (w, w)))
        expanded = math.sqrt(max(np.float32(gg + 2 * wd * gw + wd * wd * ww), 0.0))
        assert abs(expanded - exact) / exact > 0.1


def test_sum_of_norms_form_and_per_layer_decays():
    w = [np.array([3.0, 4.0]), np.array([1.0])]
    g = [np.array([0.0, 1.0]), np.array([2.0])]
    got = lwrs.rates.weight_decayed_norms(w, g, weight_decays=[0.5, 0.0])
    np.testing.assert_allclose(got, [1.0 + 0.5 * 5.0, 2.0], rtol=1e-15)


def test_tvlars_schedule_applies_phi_once():
    target = S.linear_warmup(2.0, 3)
    s = S.tvlars_schedule(target, decay_coefficient=0.2, delay_steps=4, alpha=0.5, gamma_min=0.01)
    for t in range(8):
        assert s(t) == pytest.approx(target(t) * tvlars_phi(t, decay=0.2, delay=4, alpha=0.5, gamma_min=0.01),
                                     rel=1e-15)
    opt = lwrs.tvlars(2.0, decay_coefficient=0.2, delay_steps=4, alpha=0.5, gamma_min=0.01)
    w = [np.ones((2, 2))]
    diag = opt.step(w, w, opt.init(w, step=5))[2]
    assert diag.learning_rate == pytest.approx(2.0 * tvlars_phi(5, decay=0.2, delay=4, alpha=0.5, gamma_min=0.01))


def test_mnag_increments_match_the_paper_form():
    """v_{t+1} = w_t - r g, w_{t+1} = v_{t+1} + beta (v_{t+1} - v_t), v_0 = w_0 (CLARS eq. 4), two steps."""
    rng = np.random.default_rng(1)
    w0, g0, g1 = rng.normal(size=3), rng.normal(size=3), rng.normal(size=3)
    beta, r0, r1 = 0.9, 0.1, 0.3
    v1 = w0 - r0 * g0
    w1 = v1 + beta * (v1 - w0)
    v2 = w1 - r1 * g1
    w2 = v2 + beta * (v2 - v1)
    inc0, trace = lwrs.mnag_increments([g0], [np.zeros(3)], [r0], beta=beta)
    inc1, _ = lwrs.mnag_increments([g1], trace, np.array([r1]), beta=beta)
    np.testing.assert_allclose(w0 + inc0[0], w1, rtol=1e-15)
    np.testing.assert_allclose(w0 + inc0[0] + inc1[0], w2, rtol=1e-13, atol=1e-15)


def test_one_d_masks_are_the_table_defaults():
    params = [np.ones((2, 2)), np.ones(2)]
    adapt, decay = lwrs.masks.one_d_masks(params, exclude_1d=True, decay_1d=True)
    spec = lwrs.table.spec("lars")
    assert adapt == tuple(spec.adapt_default(w) for w in params)
    assert decay == tuple(spec.weight_decay_default(w) for w in params)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lwrs.lars("0.5"), "learning_rate must be a real number, got '0.5'"),
        (lambda: lwrs.lars(True), "learning_rate must be a real number, got True"),
        (lambda: lwrs.lars(0.1, eta=b"1"), "eta must be a real number, got b'1'"),
        (lambda: lwrs.lamb(0.1, beta1=False), "beta1 must be a real number, got False"),
        (lambda: lwrs.lars(0.1, larc_clip="false"), "larc_clip must be a bool (True or False), got 'false'"),
        (lambda: lwrs.clars(0.1, larc_clip=1), "larc_clip must be a bool (True or False), got 1"),
        (lambda: lwrs.mnag(0.1, nesterov="yes"), "nesterov must be a bool (True or False), got 'yes'"),
        (lambda: lwrs.tvlars(0.1, decay_coefficient="1e-3", delay_steps=0), "decay_coefficient must be a real number"),
    ],
)
def test_non_numbers_and_non_bools_are_refused(make, message):
    with raises(TypeError, message):
        make()


def test_numpy_numbers_and_bools_are_numbers_and_bools():
    opt = lwrs.lars(np.float32(0.5), eta=np.float64(0.1), larc_clip=np.bool_(False), nesterov=np.True_)
    w = [np.ones((2, 2))]
    assert opt.step(w, w, opt.init(w))[2].learning_rate == 0.5


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_torch_tensors_that_require_grad_keep_no_graph(name):
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(4, 3).double()
    opt = getattr(lwrs, name)(0.1)
    state = opt.init(list(model.parameters()))  # leaves that require grad
    for _ in range(3):
        params = list(model.parameters())
        loss = model(torch.randn(8, 4, dtype=torch.float64)).square().sum()
        grads = list(torch.autograd.grad(loss, params, create_graph=True))  # grads carry a graph too
        updates, _, _ = opt.update(grads, state, params)
        new, state, diag = opt.step(params, grads, state)
        arrays = [*new, *updates, *state[1], *(state[2] if name == "lamb" else ()), diag.rates, diag.weight_norms]
        assert all(a.grad_fn is None and not a.requires_grad for a in arrays)
        with torch.no_grad():
            for p, w in zip(params, new):
                p.copy_(w)
    assert all(not p.requires_grad for p in opt.init(list(model.parameters()))[1])


@pytest.mark.parametrize("lib", ["numpy", "torch", "array-api-strict"])
def test_layer_norms_of_a_large_float32_layer_are_exact_to_rounding(lib):
    """4M entries in float32: within 2e-7 of the float64 norm of the same values (torch's vector_norm: 8e-5)."""
    x = np.random.default_rng(5).normal(size=(2048, 2048)).astype(np.float32)
    exact = np.linalg.norm(x.astype(np.float64))
    if lib == "torch":
        torch = pytest.importorskip("torch")
        arr = torch.from_numpy(x)
    elif lib == "array-api-strict":
        xs = pytest.importorskip("array_api_strict")
        arr = xs.asarray(x)
    else:
        arr = x
    got = float(np.asarray(lwrs.layer_norms([arr])[0]))
    assert abs(got - exact) / exact < 2e-7
    stats = lwrs.per_sample_norm_statistics([arr[None, ...] if lib != "array-api-strict" else xs.expand_dims(arr, axis=0)])
    assert abs(float(np.asarray(stats.sum_norms[0])) - exact) / exact < 2e-7


@pytest.mark.parametrize("name", lwrs.table.names())
def test_a_nonfinite_state_raises_or_skips(name):
    """A corrupted checkpoint: NaN in the momentum buffer or Adam's moments (issue 13, item 7, in the core)."""
    w, g = [np.ones((2, 2)), np.ones(2)], [np.full((2, 2), 0.1), np.full(2, 0.1)]
    required = {"decay_coefficient": 1e-3, "delay_steps": 10} if name == "tvlars" else {}
    stats = lwrs.NormStatistics(np.ones(2), np.ones(2), 3)
    opt = getattr(lwrs, name)(0.1, **required)
    state = opt.init(w)
    field = 2 if name == "lamb" else 1
    bad = list(state[field])
    bad[1] = np.array([0.0, np.nan])
    state = state._replace(**{state._fields[field]: tuple(bad)})
    what = {1: "momentum buffer norm", 2: "second moment norm"}[field] if name != "lamb" else "second moment norm"
    with raises(lwrs.NonFiniteError, f"layer 1: {what} is not finite (value nan) at step 0"):
        opt.step(w, g, state, norm_stats=stats)
    skip = getattr(lwrs, name)(0.1, on_nonfinite="skip", **required)
    new, new_state, diag = skip.step(w, g, state, norm_stats=stats)
    assert diag.skipped and new_state is state and all(np.array_equal(a, b) for a, b in zip(new, w))


@pytest.mark.parametrize("name", lwrs.table.names())
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.filterwarnings("ignore:LAMB with float16 layers:RuntimeWarning")  # (what the overflow is about here)
def test_a_step_that_would_overflow_raises_or_skips(name, dtype):
    """A result beyond the dtype's range (float16 with lr 1e5; float32 with lr 1e38) is not a silent inf."""
    gval, lr = (1.0, 1e5) if dtype == np.float16 else (10.0, 1e38)  # every new weight is about 10 - 1.9 lr g
    w = [np.full((2, 2), 10.0, dtype=dtype), np.full(2, 10.0, dtype=dtype)]
    g = [np.full((2, 2), gval, dtype=dtype), np.full(2, gval, dtype=dtype)]
    required = {"decay_coefficient": 1e-9, "delay_steps": 0, "alpha": 0.5} if name == "tvlars" else {}
    kw = {"adapt_mask": [False, False]} if name in ("lars", "clars", "tvlars") else {}
    stats = lwrs.per_sample_norm_statistics([np.stack([x, x]) for x in g])
    opt = getattr(lwrs, name)(lr, **required, **kw)
    with np.errstate(over="ignore"):  # float32 bounds beyond the range: NumPy would warn before lwrs raises
        with raises(lwrs.NonFiniteError, "step size (the update would overflow) is not finite (value inf) at step 0"):
            opt.step(w, g, opt.init(w), norm_stats=stats)
        skip = getattr(lwrs, name)(lr, on_nonfinite="skip", **required, **kw)
        state = skip.init(w)
        new, new_state, diag = skip.step(w, g, state, norm_stats=stats)
    assert diag.skipped and new_state.step == 0 and all(np.array_equal(a, b) for a, b in zip(new, w))
    fine = getattr(lwrs, name)(1e-3, **required, **kw).step(w, g, opt.init(w), norm_stats=stats)
    assert not fine.diagnostics.skipped and all(np.all(np.isfinite(a)) for a in fine.params)
