"""PerSampleNorms and copies of the model (review items): deepcopy (AveragedModel, EMA) and pickling give a
plain, independent model; statistics left behind by zeroing the gradients in place are reset or refused."""

from __future__ import annotations

import copy
import io

import pytest

torch = pytest.importorskip("torch")

from lwrs.backends.torch import CLARS, PerSampleNorms  # noqa: E402
from oracles import vmap_oracle  # noqa: E402

nn = torch.nn


def _model(kind: str) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    if kind == "attention":
        return (nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double(),
                lambda b: torch.randn(b, 5, 8, dtype=torch.float64))
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    if kind == "sequence":  # long enough for the fused Linear
        return model, lambda b: torch.randn(b, 40, 6, dtype=torch.float64)
    return model, lambda b: torch.randn(b, 6, dtype=torch.float64)


def _by_hand(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` by torch.func.functional_call on an unrecorded twin with ``module``'s weights."""
    twin, _ = _model("attention" if isinstance(module, nn.TransformerEncoderLayer) else "mlp")
    return torch.func.functional_call(twin, dict(module.named_parameters()), (x,))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["rows", "sequence", "attention"])
def test_averaged_model_is_an_independent_plain_model(kind, fused):
    model, batch = _model(kind)
    norms = PerSampleNorms(model, fused=fused)
    opt = CLARS(model.parameters(), lr=0.1, norm_source=norms)
    avg = torch.optim.swa_utils.AveragedModel(model)  # deepcopies the model
    for _ in range(3):
        opt.zero_grad()
        model(batch(8)).square().mean().backward()
        opt.step()
        avg.update_parameters(model)
    x = batch(4)
    assert not torch.allclose(avg(x), model(x))  # the average is not the live model
    torch.testing.assert_close(avg(x), _by_hand(avg.module, x), rtol=1e-12, atol=1e-12)
    # a backward through the copy (distillation, BYOL) leaves the live model and its statistics alone
    opt.zero_grad()
    avg(x).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in avg.module.parameters())
    with pytest.raises(RuntimeError, match="no per-sample statistics"):
        norms.norm_statistics(list(model.parameters()))
    # the live model still records, and the copy can get its own recorder
    model(batch(8)).square().mean().backward()
    assert norms.norm_statistics(list(model.parameters())).count == 8
    own = PerSampleNorms(avg.module, fused=fused)
    for p in avg.module.parameters():
        p.grad = None
    avg(batch(6)).square().mean().backward()
    assert own.norm_statistics(list(avg.module.parameters())).count == 6


@pytest.mark.parametrize("fused", [True, False])
def test_pickled_model_loads_as_a_plain_model(fused):
    model, batch = _model("attention")
    norms = PerSampleNorms(model, fused=fused)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = batch(3)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-12, atol=1e-12)
    loaded(x).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    copied = copy.deepcopy(norms)  # a copy of the recorder itself records nothing, and says so
    with pytest.raises(RuntimeError, match="is a copy"):
        copied.norm_statistics(list(model.parameters()))


def _loss(model, x):
    return model(x).square().mean()


@pytest.mark.parametrize("zero", ["model.zero_grad(set_to_none=False)", "p.grad.zero_()"])
def test_gradients_zeroed_in_place_reset_the_statistics(zero):
    """The statistics follow p.grad: zeroing it in place resets them at the next backward (review item 2)."""
    model, batch = _model("rows")
    norms = PerSampleNorms(model)
    params = list(model.parameters())
    xs = [batch(8) for _ in range(3)]
    for x in xs:
        if zero.startswith("model"):
            model.zero_grad(set_to_none=False)
        else:
            for p in params:
                if p.grad is not None:
                    p.grad.zero_()
        _loss(model, x).backward()
    got = norms.norm_statistics(params)
    # oracle: a fresh recorder on a twin, one backward of the last batch
    twin = copy.deepcopy(model)
    fresh = PerSampleNorms(twin)
    _loss(twin, xs[-1]).backward()
    want = fresh.norm_statistics(list(twin.parameters()))
    assert got.count == want.count == 8
    torch.testing.assert_close(got.sum_norms, want.sum_norms, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.sum_squared_norms, want.sum_squared_norms, rtol=1e-12, atol=0)


def test_statistics_of_gradients_zeroed_in_place_are_refused():
    model, batch = _model("rows")
    norms = PerSampleNorms(model)
    opt = CLARS(model.parameters(), lr=0.1, norm_source=norms)
    _loss(model, batch(8)).backward()
    model.zero_grad(set_to_none=False)
    with pytest.raises(RuntimeError, match="stale"):
        opt.step()
    # the gradient reset by CLARS.zero_grad is fine, and so are gradients changed in place but not zeroed
    opt.zero_grad(set_to_none=False)
    _loss(model, batch(8)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    for p in model.parameters():
        p.grad.mul_(0.5)  # (as GradScaler.unscale_ does)
    assert norms.norm_statistics(list(model.parameters())).count == 8
    opt.step()
    # accumulation without zeroing still adds up
    _loss(model, batch(8)).backward()
    assert norms.norm_statistics(list(model.parameters())).count == 16


def _scaled_models(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    if kind == "tokens":  # Embedding (Gram form), Linear on short sequences (ghost) and rows, LayerNorm
        model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 3))
        return model, torch.randint(0, 10, (6, 5))
    if kind == "long":  # a Linear on a long sequence (fused, or built with hooks)
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), torch.randn(6, 40, 4)
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3)), torch.randn(6, 2, 8)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["tokens", "long", "conv"])
def test_statistics_stay_finite_under_a_loss_scale_the_gradients_survive(kind, fused):
    """float32, loss scale 2**100: the gradients are finite, so must be the statistics (review item 7)."""
    model, x = _scaled_models(kind)
    norms = PerSampleNorms(model, fused=fused)
    params = list(model.parameters())
    model(x).square().mean().backward()
    want = norms.norm_statistics(params)
    grads = [p.grad.clone() for p in params]
    norms.reset()
    model.zero_grad()
    scale = 2.0**100
    (model(x).square().mean() * scale).backward()
    assert all(torch.isfinite(p.grad).all() for p in params)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad / scale, g, rtol=1e-5, atol=1e-7)
    got = norms.norm_statistics(params, scale=scale)
    assert got.count == want.count
    torch.testing.assert_close(got.sum_norms, want.sum_norms, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.sum_squared_norms, want.sum_squared_norms, rtol=1e-5, atol=0)


def test_clars_with_a_grad_scaler_near_the_float32_limit_steps():
    model, x = _scaled_models("tokens")
    twin = copy.deepcopy(model)
    factors = []
    for m, scaler in ((model, None), (twin, torch.amp.GradScaler("cpu", init_scale=2.0**100))):
        opt = CLARS(m.parameters(), lr=0.1, norm_source=PerSampleNorms(m), grad_scaler=scaler)
        opt.zero_grad()
        loss = m(x).square().mean()
        (loss if scaler is None else scaler.scale(loss)).backward()
        opt.step() if scaler is None else scaler.step(opt)
        factors.append(opt.diagnostics[0].clars_factors)
    assert scaler.get_scale() == 2.0**100  # not a skipped step
    torch.testing.assert_close(factors[1], factors[0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["conv", "sequence", "attention"])
@pytest.mark.parametrize("fused", [True, False])
def test_a_recorded_model_is_freed_by_reference_counting(kind, fused):
    """A module given its own forward (fused convolutions and long-sequence Linears, attention) held itself through
    it: the model was a reference cycle, kept with everything it holds (DistributedDataParallel's hooks on its
    parameters, hence the process group's work) until a garbage collection, at interpreter shutdown if none came
    first, where gloo could abort the process."""
    import gc
    import weakref

    if kind == "conv":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 2)).double()
        make = lambda b: torch.randn(b, 1, 8, 8, dtype=torch.float64)  # noqa: E731
    else:
        model, make = _model(kind)
    norms = PerSampleNorms(model, fused=fused)
    opt = CLARS(model.parameters(), lr=0.1, norm_source=norms)
    model(make(4)).sum().backward()
    opt.step()
    refs = [weakref.ref(m) for m in model.modules()] + [weakref.ref(norms)]
    enabled = gc.isenabled()
    gc.disable()
    try:
        del model, norms, opt
        assert [r() for r in refs[:-1] if r() is not None] == []
    finally:
        if enabled:
            gc.enable()


def test_conv_settings_changed_after_recording_are_followed_or_refused():
    """The fused convolution kept the stride, padding and dilation it was installed with (a changed module gave
    another output shape than the plain one), and a padding mode set later was never checked."""
    from lwrs.backends.torch import UnsupportedModuleError

    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    conv = nn.Conv2d(1, 2, 3).double()
    plain = copy.deepcopy(conv)
    norms = PerSampleNorms(conv)
    for c in (conv, plain):
        c.stride, c.dilation, c.padding = (1, 1), (2, 2), (2, 2)
    torch.testing.assert_close(conv(x), plain(x))
    conv.padding_mode = "circular"
    with pytest.raises(UnsupportedModuleError, match="padding_mode='circular'"):
        conv(x)
    norms.remove()


@pytest.mark.parametrize("fused", [True, False])
def test_unbatched_inputs_and_old_weight_norm_are_refused_clearly(fused):
    from lwrs.backends.torch import UnsupportedModuleError

    conv, lin = nn.Conv1d(3, 2, 3), nn.Linear(4, 2)
    for module, x in ((conv, torch.randn(3, 10)), (lin, torch.randn(4))):
        PerSampleNorms(module, fused=fused)
        with pytest.raises(ValueError, match=r"unbatched input of shape .*add one: x\[None\]"):
            module(x)
    for wrap, which in ((torch.nn.utils.weight_norm, "weight_norm"), (torch.nn.utils.spectral_norm, "spectral_norm")):
        with pytest.raises(UnsupportedModuleError, match=f"torch.nn.utils.{which}"):
            PerSampleNorms(wrap(nn.Conv2d(1, 2, 3)), fused=fused)


def test_a_fused_module_takes_its_input_by_keyword_and_a_forward_kept_apart_says_what_happened():
    conv = nn.Conv2d(1, 2, 3).double()
    plain = copy.deepcopy(conv)
    norms = PerSampleNorms(conv)
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(conv(input=x), plain(x))
    forward = conv.forward
    del conv
    with pytest.raises(RuntimeError, match="belongs to a recorded module that has been freed"):
        forward(x)
    norms.remove()


def _oracle_s1(model, x, loss_of_output):
    """name -> the sum over samples of the norm of each sample's own loss gradient (torch.func)."""
    return {k: float(s1) for k, (s1, _) in vmap_oracle(model, lambda f, xi: loss_of_output(f(xi)), (x,), (0,)).items()}


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("zero", ["accumulate", "set_to_none=False"])
def test_a_pass_that_does_not_accumulate_into_the_gradient_is_not_counted(kind, zero):
    """An input-gradient pass (torch.autograd.grad: FGSM, saliency) while p.grad holds a gradient was added to the
    statistics as if it had gone into p.grad (S1 1.8x and the count 12 instead of 8 here)."""
    torch.manual_seed(0)
    if kind == "conv":
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 1)).double()
        x1, x2 = (torch.randn(4, 1, 6, 6, dtype=torch.float64) for _ in range(2))
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        x1, x2 = (torch.randn(4, 3, dtype=torch.float64) for _ in range(2))
    norms = PerSampleNorms(model)
    loss = lambda out: out.square().sum()  # noqa: E731
    if zero == "accumulate":  # micro-batch 1, an input-gradient pass, micro-batch 2
        loss(model(x1)).backward()
        x = torch.cat([x1, x2])
    else:  # gradients zeroed in place, then the adversarial pass, then the backward
        loss(model(x1)).backward()
        model.zero_grad(set_to_none=False)
        norms.reset()
        x = x2
    xa = x2.clone().requires_grad_()
    torch.autograd.grad(model(xa).sum(), xa)
    loss(model(x2)).backward()
    expected = _oracle_s1(model, x, loss)
    got = norms.sums(model.parameters())
    for name, p in model.named_parameters():
        assert float(got[p][0]) == pytest.approx(expected[name], rel=1e-10)
    assert set(norms._n.values()) == {x.shape[0]}


def test_statistics_after_a_create_graph_backward_are_refused():
    """A gradient penalty (double backward) adds to p.grad a share the recorder cannot split per sample: the
    statistics were silently inexact (S1 6.04 against an exact 8.43 here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 1)).double()
    norms = PerSampleNorms(model)
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    out = model(x).sum()
    gx, = torch.autograd.grad(out, x, create_graph=True)
    (out + 10 * gx.square().sum()).backward()
    with pytest.raises(RuntimeError, match="not exact after a backward with create_graph=True"):
        norms.sums(model.parameters())
    norms.reset()
    model.zero_grad()
    model(x.detach()).sum().backward()
    assert set(norms.sums(model.parameters())) == set(model.parameters())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_functional_call_with_substituted_parameters_is_not_recorded(kind):
    """torch.func.functional_call on a recorded model: the hook path raised a KeyError (whose message was a printed
    tensor) inside backward; the fused path recorded under the substitutes and kept every one of them alive."""
    torch.manual_seed(0)
    if kind == "conv":
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 1)).double()
        x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        x = torch.randn(4, 3, dtype=torch.float64)
    plain = copy.deepcopy(model)
    norms = PerSampleNorms(model)
    subs = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    twin = {k: v.detach().clone().requires_grad_() for k, v in plain.named_parameters()}
    torch.func.functional_call(model, subs, (x,)).square().sum().backward()
    torch.func.functional_call(plain, twin, (x,)).square().sum().backward()
    for k in subs:
        torch.testing.assert_close(subs[k].grad, twin[k].grad)  # the substitutes' gradients, as without a recorder
    assert all(p.grad is None for p in model.parameters()) and not norms._live
    del subs, twin
    model(x).square().sum().backward()  # the model's own pass: recorded exactly
    expected = _oracle_s1(model, x, lambda out: out.square().sum())
    got = norms.sums(model.parameters())
    for name, p in model.named_parameters():
        assert float(got[p][0]) == pytest.approx(expected[name], rel=1e-10)


def test_a_new_recorder_on_a_copy_removes_the_copied_recorders_hooks():
    """A deepcopy of a recorded model carries its recorder's (inert) root hooks; a recorder attached to the copy
    stacked its own beside them."""
    model, make = _model("plain")
    PerSampleNorms(model)
    twin = copy.deepcopy(model)
    norms = PerSampleNorms(twin)
    counts = {len(getattr(twin, name)) for name in ("_forward_pre_hooks", "_forward_hooks")}
    assert counts == {1}  # the new recorder's root hooks only
    x = make(4)
    twin(x).square().sum().backward()
    expected = _oracle_s1(twin, x, lambda out: out.square().sum())
    got = norms.sums(twin.parameters())
    for name, p in twin.named_parameters():
        assert float(got[p][0]) == pytest.approx(expected[name], rel=1e-10)


@pytest.mark.parametrize("capture", ["jit.trace", "export"])
@pytest.mark.parametrize("kind", ["rows", "sequence", "conv", "attention"])
def test_tracing_or_exporting_a_recorded_model_leaves_the_recording_out(kind, capture):
    """``torch.jit.trace`` of a recorded model failed ("Graphs differed across invocations": the recording's
    hooks ran inside the trace), and ``torch.export`` baked the recording's norms into the exported program. Both
    now capture the model alone, and the recorder keeps measuring the live model exactly."""
    if kind == "conv":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 1)).double()
        batch = lambda b: torch.randn(b, 1, 6, 6, dtype=torch.float64)  # noqa: E731
    else:
        model, batch = _model(kind)
    norms = PerSampleNorms(model)
    x = batch(4)
    if capture == "jit.trace":
        traced = torch.jit.trace(model, (x,))
        graph = str(traced.inlined_graph)
    else:
        traced = torch.export.export(model, (x,)).module()
        graph = str(traced.graph)
    assert "vector_norm" not in graph and "detach" not in graph, graph  # the recording's ops
    x2 = batch(4)
    torch.testing.assert_close(traced(x2), model(x2), rtol=1e-12, atol=1e-12)
    assert not norms._s1  # nothing recorded by the capture
    loss = lambda out: out.square().sum()  # noqa: E731
    loss(model(x2)).backward()
    expected = _oracle_s1(model, x2, loss)
    got = norms.sums(model.parameters())
    for name, p in model.named_parameters():
        assert float(got[p][0]) == pytest.approx(expected[name], rel=1e-10)
    norms.remove()
