"""CLARS and PerSampleNorms in training loops a third fresh-eyes review ran (review-torch-3): gradual
unfreezing, multi-task heads with gradients zeroed in place, a Linear subclass with a parameter of its own, and
the weight-decay form whose denominator needs decayed per-sample gradients."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from lwrs.backends.torch import CLARS, PerSampleNorms, UnsupportedModuleError  # noqa: E402
from oracles import vmap_oracle  # noqa: E402

nn = torch.nn


def _s1_oracle(model, x, y):
    """name -> sum_i |g_i|, g_i the gradient of sample i's own loss (mse, mean over the batch: the per-sample
    losses are the batch's terms times B)."""
    loss = lambda f, xi, yi: nn.functional.mse_loss(f(xi), yi, reduction="sum") / yi.shape[-1]  # noqa: E731
    return {k: float(s1) / x.shape[0] for k, (s1, _) in vmap_oracle(model, loss, (x, y), (0, 0)).items()}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("layer", ["linear", "batch_norm"])
def test_gradual_unfreezing_with_a_recorder(fused, layer):
    """A layer frozen when the recorder was made and unfrozen later (gradual unfreezing) was refused as "not
    part of the recorded model" at every step after (review-torch-3, 1)."""
    torch.manual_seed(0)
    if layer == "batch_norm":
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4)).double()
        late = model[1]
    else:
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
        late = model[0]
    late.requires_grad_(False)
    norms = PerSampleNorms(model, fused=fused)
    opt = CLARS(model.parameters(), lr=1.0, eta=0.01, norm_source=norms)
    x, y = torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)
    for step in range(3):
        if step == 2:
            late.requires_grad_(True)
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "1 \\(BatchNorm1d\\) is in training mode", RuntimeWarning)
            nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert int(opt.state[late.weight]["step"]) == 1
    if layer == "linear":
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        got = norms.sums([late.weight])[late.weight][0]
        assert float(got) == pytest.approx(_s1_oracle(model, x, y)["0.weight"], rel=1e-10)


def test_an_unsupported_module_frozen_at_construction_is_named_when_it_is_unfrozen():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(3, 4), Scale())
    model[1].requires_grad_(False)
    norms = PerSampleNorms(model)  # accepted: nothing of it trains
    model[1].requires_grad_(True)
    model(torch.randn(5, 3)).sum().backward()
    with pytest.raises(UnsupportedModuleError, match=r"1 \(Scale\).*frozen when the recorder was made"):
        norms.sums([model[1].s])


def test_a_linear_subclass_with_a_parameter_of_its_own_is_refused_at_construction():
    """Its extra parameter was accepted, then the step failed with "was backward run since the last reset?"
    (review-torch-3, 7)."""
    class ScaledLinear(nn.Linear):
        def __init__(self, i, o):
            super().__init__(i, o)
            self.scale = nn.Parameter(torch.ones(o))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = ScaledLinear(6, 4)

        def forward(self, x):
            return self.l(x) * self.l.scale

    with pytest.raises(UnsupportedModuleError, match=r"l \(ScaledLinear: its parameter 'scale'"):
        PerSampleNorms(M())
    frozen = M()
    frozen.l.scale.requires_grad_(False)
    PerSampleNorms(frozen).remove()  # a frozen extra parameter needs no statistics


@pytest.mark.parametrize("fused", [True, False])
def test_an_unused_head_with_gradients_zeroed_in_place(fused):
    """A multi-task head not used in a step, its gradient zeroed in place (zero_grad(set_to_none=False)): every
    sample's gradient is zero, so its statistics are 0 and the step goes on (it failed with "no per-sample
    statistics ... was backward run?" at every later step; review-torch-3, 2)."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2), nn.Linear(16, 3)

        def forward(self, x, task):
            h = torch.tanh(self.body(x))
            return self.a(h) if task == 0 else self.b(h)

    torch.manual_seed(0)
    model = TwoHeads().double()
    norms = PerSampleNorms(model, fused=fused)
    opt = CLARS(model.parameters(), lr=1.0, eta=0.01, norm_source=norms)
    x = torch.randn(32, 8, dtype=torch.float64)
    for step in range(4):
        opt.zero_grad(set_to_none=False)
        model(x, step % 2).square().mean().backward()
        w = model.a.weight.detach().clone()
        d = opt.state[model.a.weight]["momentum_buffer"].clone() if step else None
        opt.step()
        if step % 2:  # head a unused: its statistics are 0, its factor 1 (LARS's at a zero gradient)
            k = [n for n, _ in model.named_parameters()].index("a.weight")
            assert float(opt.diagnostics[0].clars_factors[k]) == 1.0
            beta = opt.param_groups[0]["momentum"]  # a zero direction: only the momentum moves it (CLARS eq. 4)
            torch.testing.assert_close(model.a.weight.detach(), w + beta * (beta * d), rtol=1e-15, atol=0)
    # a parameter that no backward reached while its gradient is not zero is still refused
    opt.zero_grad(set_to_none=False)
    model(x, 0).square().mean().backward()
    model.b.weight.grad.fill_(1.0)
    with pytest.raises(RuntimeError, match="no per-sample statistics for a parameter of b"):
        opt.step()


def test_the_norm_of_sum_form_with_a_recorder_is_refused():
    """PerSampleNorms measures the undecayed per-sample gradients; the "norm_of_sum" denominator needs the norms of
    g_i + lambda w: CLARS stepped 42% too far at weight decay 0.5, or refused the step with a message blaming the
    batch (review-torch-3, 4)."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    norms = PerSampleNorms(model)
    with pytest.raises(ValueError, match=r"group 0: weight_decay_form='norm_of_sum' with weight decay 0.5"):
        CLARS(model.parameters(), lr=1.0, weight_decay=0.5, weight_decay_form="norm_of_sum", norm_source=norms)
    opt = CLARS(model.parameters(), lr=1.0, weight_decay_form="norm_of_sum", norm_source=norms)  # no decay: exact
    opt.param_groups[0]["weight_decay"] = 0.1  # set later (a scheduler, by hand): refused at the step
    model(torch.randn(4, 6)).sum().backward()
    with pytest.raises(ValueError, match=r"group 0: weight_decay_form='norm_of_sum' with weight decay 0.1"):
        opt.step()
    # with statistics passed by the caller (of the decayed per-sample gradients, as documented) it steps
    opt.param_groups[0]["weight_decay"] = 0.0
    opt.step()


def _clars_step(model_seed, modify, loss_scale=1.0, fused=True):
    """One CLARS step with a recorder; ``modify(model)`` runs between backward and step. Returns the factors and
    the new weights."""
    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    norms = PerSampleNorms(model, fused=fused)
    opt = CLARS(model.parameters(), lr=1.0, eta=0.01, norm_source=norms)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    opt.zero_grad()
    (nn.functional.mse_loss(model(x), y) * loss_scale).backward()
    modify(model)
    opt.step()
    return opt.diagnostics[0].clars_factors, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("case", ["manual loss scale", "clip_grad_norm_", "divide by micro-batches"])
def test_gradients_rescaled_in_place_carry_their_statistics(case):
    """A gradient rescaled in place between backward and step (a manual loss scale undone, clip_grad_norm_, a
    division by the number of micro-batches) kept statistics of the unscaled gradient: CLARS factors 1024x too
    small with a manual scale (review-torch-3, 5). Every sample's gradient is rescaled with the batch's: the
    factors are those of the unmodified step (the trust ratio is scale-free), and with a power-of-two scale
    the whole step is bit for bit the unscaled one."""
    plain_factors, plain_weights = _clars_step(0, lambda m: None)
    if case == "manual loss scale":
        factors, weights = _clars_step(0, lambda m: [p.grad.div_(1024.0) for p in m.parameters()], 1024.0)
        torch.testing.assert_close(factors, plain_factors, rtol=0, atol=0)
        for a, b in zip(weights, plain_weights):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        return
    if case == "clip_grad_norm_":
        factors, _ = _clars_step(0, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3))
    else:
        factors, _ = _clars_step(0, lambda m: [p.grad.div_(3.0) for p in m.parameters()])
    torch.testing.assert_close(factors, plain_factors, rtol=1e-12, atol=0)


@pytest.mark.parametrize("rescale", ["in place", "out of place"])
def test_gradients_rescaled_between_micro_batches_add_up_as_the_gradients_do(rescale):
    """``p.grad`` halved after micro-batch 1, then micro-batch 2 accumulated: the statistics are micro-batch 1's
    halved plus micro-batch 2's, as the gradient is (against torch.func per sample, weighted alike). Out of place,
    ``p.grad = p.grad / 2`` counted as a reset: micro-batch 1 was dropped, silently (count 8 instead of 16;
    review-follow, 5)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    norms = PerSampleNorms(model)
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(2))
    y1, y2 = (torch.randn(8, 3, generator=g, dtype=torch.float64) for _ in range(2))
    nn.functional.mse_loss(model(x1), y1).backward()
    for p in model.parameters():
        if rescale == "in place":
            p.grad.mul_(0.5)
        else:
            p.grad = p.grad / 2
    nn.functional.mse_loss(model(x2), y2).backward()
    assert norms.norm_statistics(list(model.parameters())).count == 16
    got = norms.sums(model.parameters())
    s1 = {k: 0.5 * a + b for (k, a), b in zip(_s1_oracle(model, x1, y1).items(), _s1_oracle(model, x2, y2).values())}
    for name, p in model.named_parameters():
        assert float(got[p][0]) == pytest.approx(s1[name], rel=1e-10)


def test_clipping_after_grad_scaler_unscale_keeps_the_factors():
    """``scaler.unscale_`` (which torch does not count as a change of the gradient: its version counter stays),
    then ``clip_grad_norm_``, then ``scaler.step``: the statistics follow the clipping and carry no loss scale."""
    def run(scaler):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
        opt = CLARS(model.parameters(), lr=1.0, eta=0.01, norm_source=PerSampleNorms(model), grad_scaler=scaler)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            scaler.step(opt)
        return opt.diagnostics[0].clars_factors

    torch.testing.assert_close(run(torch.amp.GradScaler("cpu", init_scale=1024.0)), run(None), rtol=1e-5, atol=0)


def test_an_attention_subclass_with_a_parameter_of_its_own_is_refused_at_construction():
    """The subclass check covered the Linear-like layers only: an extra attention parameter failed at the step
    with "was backward run since the last reset?" (review-diff, 4)."""
    class GatedAttention(nn.MultiheadAttention):
        def __init__(self):
            super().__init__(8, 2, batch_first=True)
            self.gate = nn.Parameter(torch.ones(8))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.out = GatedAttention(), nn.Linear(8, 1)

        def forward(self, x):
            return self.out(self.att(x, x, x, need_weights=False)[0] * self.att.gate).mean(1)

    with pytest.raises(UnsupportedModuleError, match=r"att \(GatedAttention: its parameter 'gate'"):
        PerSampleNorms(M())


def test_recording_works_where_torch_has_no_is_exporting():
    """torch.compiler.is_exporting exists from torch 2.6; the project allows torch 2.4: every recorded forward
    raised AttributeError there (review-diff, 1)."""
    import subprocess
    import sys

    code = ("import torch\n"
            "del torch.compiler.is_exporting\n"
            "from lwrs.backends.torch import PerSampleNorms\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 3)); n = PerSampleNorms(m)\n"
            "m(torch.randn(2, 4)).sum().backward(); print(int(n.norm_statistics(list(m.parameters())).count))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_clipping_half_precision_gradients_keeps_exact_statistics_possible(dtype):
    """The norms behind the followed ratio were taken in the gradients' dtype: bf16 rounding (0.5%) then made
    CLARS refuse valid steps as "cannot come from its gradient" (17 of 20 seeds; review-diff, 2)."""
    refused = 0
    for seed in range(20):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5)).to(dtype)
        norms = PerSampleNorms(model)
        opt = CLARS(model.parameters(), lr=0.1, norm_source=norms)
        x, y = torch.randn(1, 20, dtype=dtype), torch.randn(1, 5, dtype=dtype)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        try:
            opt.step()
        except ValueError:
            refused += 1
        norms.remove()
    assert refused <= 2  # (as without clipping: a batch of one sits at the bound mean |g_i| = |g|)


def test_a_ratio_applied_before_a_failed_backward_is_not_applied_again():
    """The ratio applied to the statistics at the start of a backward that then failed (an OOM caught) was
    applied again at the step: 0.25 instead of 0.5 (review-diff, 7)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    norms = PerSampleNorms(model)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    w = model[0].weight
    nn.functional.mse_loss(model(x), y).backward()
    before = float(norms.sums([w])[w][0])
    for p in model.parameters():
        p.grad.div_(2)

    def fail(*_):
        raise RuntimeError("simulated out of memory")

    handle = model[0].register_full_backward_hook(fail)
    with pytest.raises(RuntimeError, match="simulated"):
        nn.functional.mse_loss(model(x), y).backward()
    handle.remove()
    assert float(norms.sums([w])[w][0]) / before == 0.5


def test_clipping_with_an_overflowing_layer_is_a_non_finite_step_not_stale_statistics():
    """clip_grad_norm_ with an infinite total norm zeroes the finite gradients: they were taken as zeroed by
    zero_grad, and the step raised "stale" instead of being skipped under on_nonfinite="skip" (review-diff, 8)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    norms = PerSampleNorms(model)
    opt = CLARS(model.parameters(), lr=0.1, norm_source=norms, on_nonfinite="skip")
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    x[0] *= 1e25  # the weight gradients overflow in the backward
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert bool(opt.diagnostics[0].skipped)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_a_rescaling_through_data_is_followed():
    """``p.grad.data.div_(k)`` bumps no version counter: the statistics kept the old scale, factors 4x too small
    (review-follow, 1). The gradients are now compared by value."""
    plain, _ = _clars_step(0, lambda m: None)
    factors, _ = _clars_step(0, lambda m: [p.grad.data.div_(4.0) for p in m.parameters()])
    torch.testing.assert_close(factors, plain, rtol=1e-12, atol=0)


def test_a_gradient_changed_otherwise_leaves_the_statistics_as_they_are():
    """A gradient averaged by hand with another rank's (``all_reduce`` then ``/= world``) was taken as a rescaling
    by the ratio of the norms: factors 22-27% too large against DDP (review-follow, 2). A change that is not a
    rescaling leaves the local samples' statistics as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    norms = PerSampleNorms(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    nn.functional.mse_loss(model(x), y).backward()
    want = norms.norm_statistics(list(model.parameters()))
    other = [torch.randn_like(p) for p in model.parameters()]  # another rank's gradients
    for p, o in zip(model.parameters(), other):
        p.grad.add_(o)
        p.grad /= 2
    got = norms.norm_statistics(list(model.parameters()))
    torch.testing.assert_close(got.sum_norms, want.sum_norms, rtol=0, atol=0)
