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
