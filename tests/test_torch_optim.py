"""lwrs.backends.torch optimizers: both paths against the core, torch.optim.SGD, schedulers, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lwrs  # noqa: E402
from lwrs.backends.torch import CLARS, LAMB, LARS, MNAG, TVLARS  # noqa: E402

STEPS = 5


def make_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)
    with torch.no_grad():
        model[2].bias.zero_()  # a zero-norm layer: ratio 1, decay still applies
    return model


def batches(seed=1, n=STEPS, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # drawn in float64 and cast, so that every dtype sees the same numbers
    return [(torch.randn(16, 6, generator=g, dtype=torch.float64).to(dtype),
             torch.randn(16, 3, generator=g, dtype=torch.float64).to(dtype)) for _ in range(n)]


def per_sample_stats(model, x, y):
    """Exact S1 = sum_i |grad of sample i's share of the mean loss| via torch.func (the oracle)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None],))
        return torch.nn.functional.mse_loss(out, yi[None], reduction="sum") / x.shape[0]

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    s1 = torch.stack([torch.linalg.vector_norm(g.reshape(len(x), -1), dim=1).sum() for g in grads.values()])
    s2 = torch.stack([(torch.linalg.vector_norm(g.reshape(len(x), -1), dim=1) ** 2).sum() for g in grads.values()])
    return lwrs.NormStatistics(s1, s2, 1)


def train(make_opt, *, foreach, stats=False, scheduler=None, model=None, data=None):
    model = make_model() if model is None else model
    opt = make_opt(model.parameters(), foreach)
    sched = scheduler(opt) if scheduler else None
    diags = []
    for x, y in (batches() if data is None else data):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y, reduction="sum").div(len(x)).backward()
        opt.step(norm_stats=per_sample_stats(model, x, y) if stats else None)
        diags.append(opt.diagnostics[0])
        if sched:
            sched.step()
    return model, opt, diags


def run_core(core):
    """The same training run through the core's functional optimizer, by hand (the oracle)."""
    ref = make_model()
    params = [p.detach().clone() for p in ref.parameters()]
    state = core.init(params)
    for x, y in batches():
        for p, w in zip(ref.parameters(), params):
            p.data.copy_(w)
            p.grad = None
        torch.nn.functional.mse_loss(ref(x), y, reduction="sum").div(len(x)).backward()
        params, state, _ = core.step(params, [p.grad for p in ref.parameters()], state)
    return params


CONFIGS = {
    "mnag": (lambda p, f: MNAG(p, lr=0.05, momentum=0.9, weight_decay=1e-2, foreach=f), False),
    "mnag-heavy-ball": (lambda p, f: MNAG(p, lr=0.05, momentum=0.5, nesterov=False, foreach=f), False),
    "lars": (lambda p, f: LARS(p, lr=2.0, eta=0.02, weight_decay=1e-2, foreach=f), False),
    "lars-norm-of-sum-no-1d-decay": (lambda p, f: LARS(p, lr=2.0, eta=0.02, weight_decay=5e-2,
                                                       weight_decay_form="norm_of_sum", decay_1d=False, foreach=f), False),
    "lars-larc-all-layers": (lambda p, f: LARS(p, lr=0.05, eta=0.05, larc_clip=True, exclude_1d=False, foreach=f), False),
    "lars-clip-eps": (lambda p, f: LARS(p, lr=1.0, eta=0.5, eps=1e-3, max_ratio=0.1, foreach=f), False),
    "clars": (lambda p, f: CLARS(p, lr=2.0, eta=0.02, weight_decay=1e-2, foreach=f), True),
    "tvlars": (lambda p, f: TVLARS(p, lr=2.0, decay_coefficient=0.5, delay_steps=1, eta=0.02, weight_decay=1e-2, foreach=f), False),
    "lamb": (lambda p, f: LAMB(p, lr=0.01, weight_decay=1e-2, foreach=f), False),
    "lamb-all-layers-no-1d-decay": (lambda p, f: LAMB(p, lr=0.01, weight_decay=1e-2, exclude_1d=False, decay_1d=False,
                                                      foreach=f), False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_foreach_and_reference_paths_agree(name):
    make, stats = CONFIGS[name]
    fast, _, fast_diag = train(make, foreach=True, stats=stats)
    ref, _, ref_diag = train(make, foreach=False, stats=stats)
    for a, b in zip(fast.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(fast_diag, ref_diag):
        torch.testing.assert_close(a.rates, b.rates, rtol=1e-12, atol=0)
        torch.testing.assert_close(a.clars_factors, b.clars_factors, rtol=1e-12, atol=0)
        assert a.learning_rate == pytest.approx(b.learning_rate)


def test_reference_path_is_the_core():
    """The reference path's trajectory equals the core functional optimizer run by hand."""
    model, _, _ = train(CONFIGS["lars"][0], foreach=False)
    params = run_core(lwrs.lars(2.0, eta=0.02, weight_decay=1e-2))
    for a, b in zip(model.parameters(), params):
        torch.testing.assert_close(a.detach(), b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("foreach", [True, False])
def test_mnag_equals_torch_sgd_nesterov_at_constant_lr(foreach):
    ours, _, _ = train(lambda p, f: MNAG(p, lr=0.05, momentum=0.9, foreach=f), foreach=foreach)
    theirs = make_model()
    sgd = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for x, y in batches():
        sgd.zero_grad()
        torch.nn.functional.mse_loss(theirs(x), y, reduction="sum").div(len(x)).backward()
        sgd.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("foreach", [True, False])
def test_lr_scheduler_drives_the_rate(foreach):
    def make(p, f):
        return LARS(p, lr=2.0, eta=0.02, foreach=f)

    _, _, diags = train(make, foreach=foreach, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5))
    assert [d.learning_rate for d in diags] == [2.0, 2.0, 1.0, 1.0, 0.5]
    core_model, _, _ = train(make, foreach=foreach, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5))
    # the same run through the core with the equivalent schedule
    params = run_core(lwrs.lars(lwrs.schedules.step_decay(2.0, [2, 4], factor=0.5), eta=0.02))
    for a, b in zip(core_model.parameters(), params):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["lars", "clars", "tvlars", "lamb"])
def test_checkpoint_resume_is_exact(name, tmp_path):
    make, stats = CONFIGS[name]
    data = batches(n=6)
    full, _, _ = train(make, foreach=True, stats=stats, data=data)

    model, opt, _ = train(make, foreach=True, stats=stats, data=data[:3])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    for key, value in opt.state_dict()["state"].items():  # flat, string-keyed state
        assert all(isinstance(k, str) for k in value), value.keys()
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed = make_model(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(resumed.parameters(), True)
    opt2.load_state_dict(ckpt["opt"])
    for x, y in data[3:]:
        opt2.zero_grad()
        torch.nn.functional.mse_loss(resumed(x), y, reduction="sum").div(len(x)).backward()
        opt2.step(norm_stats=per_sample_stats(resumed, x, y) if stats else None)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [True, False])
def test_nonfinite_gradient_raises_or_skips(foreach):
    model = make_model()
    opt = LARS(model.parameters(), lr=1.0, foreach=foreach)
    model(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    model[2].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(lwrs.NonFiniteError, match=r"parameter 2 of group 0: gradient norm is not finite \(value nan\) at step 0"):
        opt.step()
    skipping = LARS(model.parameters(), lr=1.0, foreach=foreach, on_nonfinite="skip")
    skipping.step()
    assert skipping.diagnostics[0].skipped
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    for p in model.parameters():  # the state made at construction is untouched
        assert int(skipping.state[p]["step"]) == 0 and not skipping.state[p]["momentum_buffer"].any()


def test_bad_hyperparameters_are_reported_at_construction():
    model = make_model()
    with pytest.raises(ValueError, match=r"group 0: momentum must lie in \[0.0, 1.0\), got 1.0"):
        LARS(model.parameters(), lr=1.0, momentum=1.0)
    with pytest.raises(ValueError, match=r"group 0: lr must lie in \[0.0, inf\], got -1.0"):
        CLARS(model.parameters(), lr=-1.0)


def test_clars_without_statistics_is_a_clear_error():
    model = make_model()
    opt = CLARS(model.parameters(), lr=1.0)
    model(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    with pytest.raises(ValueError, match="CLARS needs per-sample norm statistics"):
        opt.step()


def test_gradients_are_not_modified():
    model = make_model()
    opt = LARS(model.parameters(), lr=1.0, weight_decay=0.1)
    model(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_float32_fast_path_matches_float64_core():
    """float32 weights, float32 norms and rates, against the float64 core. A well-conditioned
    configuration: with lr 2 on the excluded biases (the "lars" config) the dynamics amplify
    round-off step by step, and the comparison would measure chaos, not the implementation."""

    def make(p, f):
        return LARS(p, lr=0.2, eta=0.02, weight_decay=1e-2, foreach=f)

    fast, _, diags = train(make, foreach=True, model=make_model(dtype=torch.float32),
                           data=batches(dtype=torch.float32))
    ref, _, _ = train(make, foreach=False)
    assert diags[0].rates.dtype == torch.float32
    for a, b in zip(fast.parameters(), ref.parameters()):
        assert a.dtype == torch.float32
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-4, atol=1e-5)


FUSED = ["mnag", "mnag-heavy-ball", "lars", "lars-norm-of-sum-no-1d-decay", "lars-larc-all-layers", "lars-clip-eps",
         "clars", "tvlars"]


def with_fused(make):
    """The same optimizer with the compiled two-pass kernels (fused=True) instead of foreach."""
    def build(params, _foreach):
        opt = make(params, True)
        opt.fused = True
        return opt
    return build


@pytest.mark.parametrize("name", FUSED)
def test_fused_cpu_kernels_match_the_reference(name):
    make, stats = CONFIGS[name]
    fused, _, fused_diag = train(with_fused(make), foreach=True, stats=stats)
    ref, _, ref_diag = train(make, foreach=False, stats=stats)
    for a, b in zip(fused.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(fused_diag, ref_diag):
        torch.testing.assert_close(a.rates, b.rates, rtol=1e-12, atol=0)


def test_fused_kernels_do_not_depend_on_the_thread_count():
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            model, _, _ = train(with_fused(CONFIGS["lars"][0]), foreach=True,
                                model=make_model(dtype=torch.float32), data=batches(dtype=torch.float32))
            results.append([p.detach().clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fused_refuses_what_it_cannot_take():
    model = make_model(dtype=torch.float32).to(torch.bfloat16)
    opt = LARS(model.parameters(), lr=1.0, fused=True)
    model(torch.randn(4, 6, dtype=torch.bfloat16)).sum().backward()
    with pytest.raises(ValueError, match="fused=True takes float32 or float64: parameter 0 of group 0 is torch.bfloat16"):
        opt.step()


@pytest.mark.parametrize("case", ["non-contiguous weight", "non-contiguous buffer", "float16 in the second group"])
def test_fused_names_the_parameter_it_refuses_and_updates_nothing(case):
    """The compiled kernels check every layer themselves (no per-layer Python check at each step); a refusal is
    turned into a message naming the group and the parameter, before any group is updated."""
    model = make_model(dtype=torch.float32)
    named = list(model.named_parameters())
    opt = LARS([{"params": named[:2]}, {"params": named[2:]}], lr=1.0, fused=True)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    last = named[-2][1]
    if case == "non-contiguous weight":
        last.data = last.data.t().contiguous().t()
        last.grad = last.grad.t().contiguous().t()
        opt.state[last]["momentum_buffer"] = opt.state[last]["momentum_buffer"].t().contiguous().t()
        message = "fused=True needs contiguous layers with gradients of their dtype: parameter '2.weight' \\(group 1\\)"
    elif case == "non-contiguous buffer":
        opt.state[last]["momentum_buffer"] = opt.state[last]["momentum_buffer"].t().contiguous().t()
        message = "the momentum buffer of parameter '2.weight' \\(group 1\\) is not"
    else:
        opt.param_groups[1]["params"][0].data = last.data.half()
        last.grad = last.grad.half()
        opt.state[last]["momentum_buffer"] = opt.state[last]["momentum_buffer"].half()
        message = "fused=True takes float32 or float64: parameter '2.weight' \\(group 1\\) is torch.float16"
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("foreach", [None, False])
def test_functional_layer_equals_the_core(foreach):
    """``lwrs.backends.torch.functional`` on plain lists: LARS, MNAG (heavy ball) and LAMB against the core."""
    from lwrs.backends.torch import functional as F

    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)]
    g = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in w]
    cases = [
        (lwrs.lars(0.5, eta=0.02, weight_decay=1e-2),
         lambda ws, bufs: F.lars(ws, g, bufs, lr=0.5, eta=0.02, weight_decay=1e-2, foreach=foreach)),
        (lwrs.mnag(0.1, beta=0.5, nesterov=False, weight_decay=1e-2),
         lambda ws, bufs: F.mnag(ws, g, bufs, lr=0.1, momentum=0.5, nesterov=False, weight_decay=1e-2,
                                 foreach=foreach)),
    ]
    for core, functional in cases:
        new, state, diag = core.step(w, g, core.init(w))
        ws, bufs = [x.clone() for x in w], [torch.zeros_like(x) for x in w]
        ours = functional(ws, bufs)
        for a, b in zip(ws + bufs, list(new) + list(state.trace)):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(ours.rates, diag.rates, rtol=1e-13, atol=0)
    core = lwrs.lamb(0.01, weight_decay=1e-2)
    new, state, diag = core.step(w, g, core.init(w))
    ws, m, v = [x.clone() for x in w], [torch.zeros_like(x) for x in w], [torch.zeros_like(x) for x in w]
    ours = F.lamb(ws, g, m, v, step=0, lr=0.01, weight_decay=1e-2, foreach=foreach)
    for a, b in zip(ws + m + v, list(new) + list(state.first_moment) + list(state.second_moment)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(ours.trust_ratios, diag.trust_ratios, rtol=1e-13, atol=0)
