"""Exact per-sample gradient norms from hooks, against torch.func per-sample gradients (float64)."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

import lwrs  # noqa: E402
from lwrs.backends.torch import CLARS, PerSampleNorms, UnsupportedModuleError, per_sample_fused  # noqa: E402

nn = torch.nn
B = 6


class TokenModel(nn.Module):
    """Embedding (with padding and repeated ids) -> LayerNorm -> two sequence Linears (ghost and build regimes)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8, padding_idx=0)
        self.norm = nn.LayerNorm(8)
        self.wide = nn.Linear(8, 6)  # T = 3: 2 T^2 = 18 <= 48, ghost
        self.narrow = nn.Linear(6, 2)  # 2 T^2 = 18 > 12, built

    def forward(self, ids):
        return self.narrow(torch.tanh(self.wide(self.norm(self.emb(ids))))).sum(dim=1)


class LongSequenceModel(nn.Module):
    """Two Linears on 8 tokens: T^2 (p + d) >= 16 p d, so the fused mode builds their per-sample gradients."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)  # 64 * 7 = 448 >= 16 * 12
        self.b = nn.Linear(3, 2)  # 64 * 5 = 320 >= 16 * 6

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).sum(dim=1)


class ConvModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1)
        self.gn = nn.GroupNorm(2, 4)
        self.c1 = nn.Conv1d(4, 6, 3, stride=1, padding=2, dilation=2, bias=False)
        self.grouped = nn.Conv1d(6, 4, 3, stride=2, groups=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.gn(self.c2(x)))  # (B, 4, 4, 4)
        h = self.grouped(self.c1(h.flatten(2)))  # (B, 6, 16) -> (B, 4, 7)
        return self.head(h.mean(dim=2))


def mlp():
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))


CASES = {
    "mlp-inplace-relu": (mlp, lambda g: torch.randn(B, 10, generator=g, dtype=torch.float64), 4),
    "tokens": (TokenModel, lambda g: torch.randint(0, 5, (B, 3), generator=g), 2),
    "long-sequence": (LongSequenceModel, lambda g: torch.randn(B, 8, 4, generator=g, dtype=torch.float64), 2),
    "conv": (ConvModel, lambda g: torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64), 2),
}


def setup(name, seed=0):
    torch.manual_seed(seed)
    make, inputs, out = CASES[name]
    model = make().double()
    g = torch.Generator().manual_seed(seed + 1)
    return model, inputs(g), torch.randn(B, out, generator=g, dtype=torch.float64)


def oracle(model, x, y, reduction="mean"):
    """sum_i |c_i| and sum_i |c_i|^2, c_i = sample i's contribution to p.grad, via torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    divisor = x.shape[0] if reduction == "mean" else 1

    def loss_one(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None],))
        return ((out - yi[None]) ** 2).sum() / divisor

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    by_param = {}
    for name, p in model.named_parameters():
        n = torch.linalg.vector_norm(grads[name].reshape(x.shape[0], -1), dim=1)
        by_param[p] = (n.sum(), (n * n).sum())
    return by_param


def loss_fn(model, x, y, reduction="mean"):
    total = ((model(x) - y) ** 2).sum()
    return total / x.shape[0] if reduction == "mean" else total


@pytest.mark.parametrize("chunks", ["default", "small"], ids=["", "small-chunks"])
@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
@pytest.mark.parametrize("name", list(CASES))
def test_hooks_match_torch_func_to_1e10(name, fused, chunks, monkeypatch):
    if chunks == "small":  # per-sample gradients built 1 to 4 samples at a time, the last chunk shorter (B = 6)
        monkeypatch.setattr(per_sample_fused, "_CHUNK_ELEMENTS", 48)
    model, x, y = setup(name)
    norms = PerSampleNorms(model, fused=fused)
    loss_fn(model, x, y).backward()
    got = norms.sums(model.parameters())
    want = oracle(model, x, y)
    for pname, p in model.named_parameters():
        for a, b, what in ((got[p][0], want[p][0], "S1"), (got[p][1], want[p][1], "S2")):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=f"{name} {pname} {what}")
    # the gradients are autograd's, to rounding (fused: the sum of the per-sample gradients)
    plain, _, _ = setup(name)
    loss_fn(plain, x, y).backward()
    for (pname, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, msg=f"{name} {pname} grad")


def test_fused_mode_takes_over_convolutions_and_sequence_linears_and_remove_restores_them():
    model, x, y = setup("conv")
    norms = PerSampleNorms(model, fused=True)
    fused = {name for name, m in model.named_modules() if "forward" in m.__dict__}
    assert fused == {"c2", "c1", "grouped", "head"}
    with torch.no_grad():
        model(x)  # no gradient: the ordinary forward, nothing recorded
    with pytest.raises(RuntimeError, match="was backward run"):
        norms.sums([model.c2.weight])
    norms.remove()
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_fused_mode_builds_only_where_it_beats_the_ghost_norm(monkeypatch):
    short, long_ = TokenModel(), LongSequenceModel()
    for model in (short, long_):
        PerSampleNorms(model, fused=True)
    built = []
    original = per_sample_fused._SequenceLinearLayer.per_sample

    def spy(self, x, grad_out, weight_shape, out=None):
        built.append((id(self), tuple(weight_shape)))
        return original(self, x, grad_out, weight_shape, out=out)

    monkeypatch.setattr(per_sample_fused._SequenceLinearLayer, "per_sample", spy)
    short(torch.randint(0, 5, (B, 3))).sum().backward()  # T = 3: the ghost norm or a hook build
    assert built == []
    long_(torch.randn(B, 8, 4)).sum().backward()
    assert len({layer for layer, _ in built}) == 2  # one layer object per module: a and b
    assert {shape for _, shape in built} == {tuple(long_.a.weight.shape), tuple(long_.b.weight.shape)}


def test_fused_layers_share_one_chunk_buffer_across_steps():
    model = LongSequenceModel().double()
    norms = PerSampleNorms(model)
    x = torch.randn(B, 8, 4, dtype=torch.float64)
    model(x).sum().backward()
    (buffer,) = norms._workspace.values()
    address = buffer.data_ptr()
    assert buffer.numel() == B * max(p.numel() for p in (model.a.weight, model.b.weight))
    norms.reset()
    model(x).sum().backward()
    assert [b.data_ptr() for b in norms._workspace.values()] == [address]
    norms.remove()
    assert norms._workspace == {}


def test_a_second_recorder_on_a_fused_model_uses_hooks_and_agrees():
    model, x, y = setup("conv")
    first, second = PerSampleNorms(model), PerSampleNorms(model)
    assert len(first._fused_modules) == 4 and second._fused_modules == []
    loss_fn(model, x, y).backward()
    a, b = first.sums(model.parameters()), second.sums(model.parameters())
    for p in model.parameters():
        torch.testing.assert_close(a[p][0], b[p][0], rtol=1e-12, atol=0)


def test_fused_mode_falls_back_to_hooks_under_autocast():
    model, x, y = setup("conv")
    model.float()
    norms = PerSampleNorms(model, fused=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.float())
    ((out.float() - y.float()) ** 2).sum().backward()
    sums = norms.sums(model.parameters())
    hooks_model, _, _ = setup("conv")
    hooks_model.float()
    hooks = PerSampleNorms(hooks_model, fused=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hooks_model(x.float())
    ((out.float() - y.float()) ** 2).sum().backward()
    want = hooks.sums(hooks_model.parameters())
    for p, q in zip(model.parameters(), hooks_model.parameters()):
        torch.testing.assert_close(sums[p][0], want[q][0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_accumulated_micro_batches_equal_the_whole_batch(fused):
    model, x, y = setup("conv" if fused else "mlp-inplace-relu")
    norms = PerSampleNorms(model, fused=fused)
    for part in (slice(0, 2), slice(2, 6)):  # micro-batches, each loss scaled as a share of the batch
        (((model(x[part]) - y[part]) ** 2).sum() / B).backward()
    want = oracle(model, x, y)
    for p in model.parameters():
        torch.testing.assert_close(norms.sums([p])[p][0], want[p][0], rtol=1e-12, atol=0)


def test_clars_ratio_is_independent_of_loss_reduction_and_scale():
    ratios = []
    for reduction, scale in (("mean", 1.0), ("sum", 1.0), ("mean", 1024.0)):
        model, x, y = setup("tokens")
        norms = PerSampleNorms(model)
        (loss_fn(model, x, y, reduction) * scale).backward()
        sums = norms.sums(model.parameters(), scale=scale)
        ratios.append(torch.stack([torch.linalg.vector_norm(p.grad) / scale / sums[p][0] for p in model.parameters()]))
        if reduction == "mean":
            torch.testing.assert_close(torch.stack([sums[p][0] for p in model.parameters()]),
                                       torch.stack([oracle(model, x, y)[p][0] for p in model.parameters()]),
                                       rtol=1e-10, atol=0)
    torch.testing.assert_close(ratios[0], ratios[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(ratios[0], ratios[2], rtol=1e-12, atol=0)


def test_clars_with_hooks_equals_clars_with_torch_func_statistics():
    runs = []
    for use_hooks in (True, False):
        model, x, y = setup("conv")
        norms = PerSampleNorms(model) if use_hooks else None
        opt = CLARS(model.parameters(), lr=1.0, eta=0.01, weight_decay=1e-4, norm_source=norms)
        for t in range(3):
            opt.zero_grad()
            loss_fn(model, x + 0.1 * t, y).backward()
            stats = None
            if not use_hooks:
                want = oracle(model, x + 0.1 * t, y)
                stats = {p: want[p] for p in model.parameters()}
            opt.step(norm_stats=stats)
        runs.append((model, opt.diagnostics[0]))
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)
    assert torch.all(runs[0][1].clars_factors <= 1 + 1e-12) and torch.all(runs[0][1].clars_factors > 0)


def test_zero_grad_resets_the_statistics():
    model, x, y = setup("mlp-inplace-relu")
    norms = PerSampleNorms(model)
    opt = CLARS(model.parameters(), lr=1.0, norm_source=norms)
    loss_fn(model, x, y).backward()
    opt.zero_grad()
    loss_fn(model, x[:3], y[:3]).backward()  # a new batch: only its samples count
    want = oracle(model, x[:3], y[:3])
    p = next(model.parameters())
    torch.testing.assert_close(norms.sums([p])[p][0], want[p][0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_batch_norm_policy_names_a_fused_conv_upstream(fused):
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Flatten(), nn.Linear(3 * 4, 1)).double()
    PerSampleNorms(model, batch_norm="strict", fused=fused)
    with pytest.raises(RuntimeError, match=r"1 \(BatchNorm1d\) is in training mode.*before it: 0 "):
        model(torch.randn(8, 2, 6, dtype=torch.float64))


def test_batch_norm_policy():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    strict = PerSampleNorms(model, batch_norm="strict")
    with pytest.raises(RuntimeError, match=r"1 \(BatchNorm1d\) is in training mode.*before it: 0 "):
        model(x)
    strict.remove()
    norms = PerSampleNorms(model)
    with pytest.warns(RuntimeWarning, match=r"per-sample norms of 0 are a per-sample split of the batch gradient"):
        model(x).sum().backward()
    bn_weight = model[1].weight
    s1, _ = norms.sums([bn_weight])[bn_weight]
    torch.testing.assert_close(s1, torch.linalg.vector_norm(bn_weight.grad))  # CLARS factor 1: LARS for BN
    model.eval()
    norms.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval mode: exact, no warning
        model(x).sum().backward()


def test_layers_after_a_batch_norm_are_exact_and_not_flagged():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    norms = PerSampleNorms(model, batch_norm="strict")  # nothing measured runs before the BN
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(model, x, y).backward()
    # per-sample gradients of the layers after the BN are well defined: check them against torch.func,
    # feeding the BN's (batch-dependent) output as the input of the rest of the network
    h = model[0](x).detach()
    tail = nn.Sequential(*list(model)[1:])
    want = oracle(tail, h, y)
    got = norms.sums(list(tail.parameters()))
    for p in tail.parameters():
        torch.testing.assert_close(got[p][0], want[p][0], rtol=1e-10, atol=0)


def test_unsupported_modules_are_named():
    model = nn.Sequential(nn.Linear(3, 3), nn.PReLU())
    with pytest.raises(UnsupportedModuleError, match=r"1 \(PReLU\)"):
        PerSampleNorms(model)
    with pytest.raises(UnsupportedModuleError, match="padding_mode='circular'"):  # at construction
        PerSampleNorms(nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"))


@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_statistics_follow_the_core_convention(fused):
    """norm_statistics: S1 = sum_i |g_i|, S2 = sum_i |g_i|^2, count = N (torch.func per-sample gradients g_i),
    over two accumulated micro-batches; mean_norms() is the CLARS denominator in p.grad units (mean loss)."""
    model, x, y = setup("long-sequence")
    norms = PerSampleNorms(model, fused=fused)
    for part in (slice(0, 2), slice(2, 6)):
        (((model(x[part]) - y[part]) ** 2).sum() / B).backward()
    stats = norms.norm_statistics(model.parameters())
    assert isinstance(stats, lwrs.NormStatistics) and stats.count == B
    per_sample = oracle(model, x, y, reduction="sum")  # gradients of each sample's own loss
    in_grad_units = oracle(model, x, y)
    params = list(model.parameters())
    torch.testing.assert_close(stats.sum_norms, torch.stack([per_sample[p][0] for p in params]), rtol=1e-10, atol=0)
    torch.testing.assert_close(stats.sum_squared_norms, torch.stack([per_sample[p][1] for p in params]),
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(stats.mean_norms(), torch.stack([in_grad_units[p][0] for p in params]),
                               rtol=1e-10, atol=0)
    # merging with the core's own statistics of the same samples doubles the sums and the count, same means
    merged = lwrs.merge_statistics(stats, stats)
    assert merged.count == 2 * B
    torch.testing.assert_close(merged.mean_norms(), stats.mean_norms(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_subsample_estimator_scales_the_first_samples(fused):
    """The paper's estimator: (B / |J|) times the sums over the first |J| samples (torch.func oracle)."""
    model, x, y = setup("tokens")
    norms = PerSampleNorms(model, subsample=2, fused=fused)
    loss_fn(model, x, y).backward()
    got = norms.sums(model.parameters())
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return ((torch.func.functional_call(model, p, (xi[None],)) - yi[None]) ** 2).sum() / B

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    for name, p in model.named_parameters():
        n = torch.linalg.vector_norm(grads[name].reshape(B, -1), dim=1)[:2]
        torch.testing.assert_close(got[p][0], (B / 2) * n.sum(), rtol=1e-10, atol=1e-14)


def test_official_minibatch_estimator_and_untouched_grads():
    from lwrs.backends.torch import minibatch_norm_statistics

    model, x, y = setup("mlp-inplace-relu")
    loss_fn(model, x, y).backward()
    grads_before = [p.grad.clone() for p in model.parameters()]
    batches = [(x[i:i + 2], y[i:i + 2]) for i in range(0, B, 2)]

    def mse(out, target):
        return ((out - target) ** 2).sum() / out.shape[0]

    stats = minibatch_norm_statistics(model, mse, batches)
    assert stats.count == 3
    for k, p in enumerate(model.parameters()):
        expected = 0.0
        for xb, yb in batches:
            g = torch.autograd.grad(mse(model(xb), yb), [p])[0]
            expected += float(torch.linalg.vector_norm(g))
        assert float(stats.mean_norms()[k]) == pytest.approx(expected / 3, rel=1e-12)
        assert torch.equal(p.grad, grads_before[k])


@pytest.mark.parametrize("name, backend", [("mlp-inplace-relu", "aot_eager"), ("long-sequence", "aot_eager"),
                                           ("conv", "aot_eager"), ("long-sequence", "inductor")])
@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_a_compiled_model_keeps_exact_statistics(name, backend, fused):
    """torch.compile(model) with a recorder attached: the statistics stay exact (against torch.func on the
    uncompiled model) over two steps, and the compiled model's gradients equal the eager ones."""
    torch._dynamo.reset()
    model, x, y = setup(name)
    eager_model = copy.deepcopy(model)
    norms = PerSampleNorms(model, fused=fused)
    compiled = torch.compile(model, backend=backend)
    for step in range(2):
        model.zero_grad()
        norms.reset()
        loss_fn(compiled, x[step:], y[step:]).backward()
        want = oracle(model, x[step:], y[step:])
        got = norms.sums(model.parameters())
        for p in model.parameters():
            torch.testing.assert_close(got[p][0], want[p][0], rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(got[p][1], want[p][1], rtol=1e-10, atol=1e-13)
    eager_model.zero_grad()
    loss_fn(eager_model, x[1:], y[1:]).backward()
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
