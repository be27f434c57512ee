"""Mixed precision: GradScaler-scaled statistics, and bf16 / fp16 parameters with fp32 norms."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lwrs.backends.torch import CLARS, LARS, PerSampleNorms  # noqa: E402


def model_and_data(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)) for _ in range(4)]
    return model.to(dtype), [(x.to(dtype), y.to(dtype)) for x, y in data]


def run_clars(use_scaler):
    model, data = model_and_data()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if use_scaler else None
    norms = PerSampleNorms(model)
    opt = CLARS(model.parameters(), lr=1.0, eta=0.02, norm_source=norms, grad_scaler=scaler)
    for x, y in data:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return model, opt.diagnostics[0]


def test_grad_scaler_leaves_clars_unchanged():
    """A power-of-two loss scale is exact in floating point, so scaled and unscaled runs agree closely;
    without unscaling the statistics the CLARS factors would be 4096 times too small."""
    plain, plain_diag = run_clars(False)
    scaled, scaled_diag = run_clars(True)
    torch.testing.assert_close(scaled_diag.clars_factors, plain_diag.clars_factors, rtol=1e-5, atol=0)
    for a, b in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_keep_fp32_norms(dtype):
    reference, data = model_and_data(torch.float64)
    model, low_data = model_and_data(dtype)
    opts = [LARS(m.parameters(), lr=0.5, eta=0.02, weight_decay=1e-3) for m in (reference, model)]
    for (x, y), (xl, yl) in zip(data, low_data):
        for m, opt, (xx, yy) in ((reference, opts[0], (x, y)), (model, opts[1], (xl, yl))):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(xx).float(), yy.float()).backward()
            opt.step()
    diag = opts[1].diagnostics[0]
    assert diag.weight_norms.dtype == torch.float32 and diag.rates.dtype == torch.float32
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(opts[1].state[p]["momentum_buffer"].dtype == dtype for p in model.parameters())
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2  # 8 and 11 bits of mantissa
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_fp16_per_sample_norms_do_not_overflow():
    """Squared norms of fp16 activations are accumulated in fp32: 300 inputs of 30 give 270000 > fp16's max."""
    layer = torch.nn.Linear(300, 1, bias=False).half()
    norms = PerSampleNorms(layer)
    x = torch.full((2, 300), 30.0, dtype=torch.float16)
    layer(x).sum().backward()
    s1, s2 = norms.sums([layer.weight])[layer.weight]
    assert torch.isfinite(s2) and s2.dtype == torch.float32
    torch.testing.assert_close(s1, torch.tensor(2 * (300 * 900.0) ** 0.5), rtol=1e-6, atol=0)
