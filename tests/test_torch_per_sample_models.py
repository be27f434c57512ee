"""Exact per-sample norms on attention, transformer layers, tied weights and awkward training loops (float64).

Every case is checked against per-sample gradients from torch.func ``vmap(grad)`` over samples run as
batches of one or, where dropout makes the batch's forward pass the only one to compare with, against
``torch.autograd.grad`` of each sample's loss in that forward pass (the same dropout masks).
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from lwrs.backends.torch import PerSampleNorms, UnsupportedModuleError  # noqa: E402
from oracles import per_sample_norm_sums, vmap_oracle  # noqa: E402

nn = torch.nn
F = torch.nn.functional
B, T, E = 4, 5, 8
TOL = dict(rtol=1e-10, atol=1e-13)


def autograd_oracle(model, per_sample_losses, inputs):
    """The same from one batched forward pass (dropout masks as drawn there): autograd.grad of each sample's loss.

    (torch.func's transforms draw other dropout masks than the plain forward pass, so with dropout the
    oracle is this loop over the samples' losses of the batch's own forward pass.)
    """
    losses = per_sample_losses(model, *inputs)
    params = [p for _, p in model.named_parameters()]
    per_sample = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    return per_sample_norm_sums(model, {name: torch.stack([g[k] for g in per_sample])
                         for k, (name, _) in enumerate(model.named_parameters())})


def assert_exact(model, norms, want, what=""):
    got = norms.sums(list(model.parameters()))
    names = dict(model.named_parameters())
    assert set(want) == set(names)
    for name, p in names.items():
        for k, label in ((0, "S1"), (1, "S2")):
            torch.testing.assert_close(got[p][k], want[name][k], **TOL, msg=f"{what} {name} {label}")


def rand(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def padding_mask(g, batch=B, length=T):
    """A boolean key-padding mask (True: padded) with a different number of padded keys per sample."""
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    return torch.arange(length)[None, :] >= lengths[:, None]


# ---- attention models ---------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Packed in_proj_weight, batch first, boolean key-padding mask, the attention weights computed."""

    def __init__(self, cls=nn.MultiheadAttention, need_weights=True):
        super().__init__()
        self.attn = cls(E, 2, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x, kpm):
        return self.attn(x, x, x, key_padding_mask=kpm, need_weights=self.need_weights)[0]


class CrossAttentionSeqFirst(nn.Module):
    """Sequence first, key is value (a decoder's cross-attention), a 2-D float attention mask, no weights."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, 4, batch_first=False)
        self.register_buffer("mask", torch.randn(T, T + 1, dtype=torch.float64))

    def forward(self, x, memory):
        return self.attn(x, memory, memory, attn_mask=self.mask, need_weights=False)[0]


class SeparateProjections(nn.Module):
    """kdim, vdim != embed_dim: separate q/k/v weights; a boolean causal mask and a padding mask."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, 2, kdim=3, vdim=5, batch_first=True)
        self.register_buffer("mask", torch.ones(T, T, dtype=torch.bool).triu(1))

    def forward(self, q, k, v, kpm):
        return self.attn(q, k, v, attn_mask=self.mask, key_padding_mask=kpm)[0]


class CustomAttention(nn.Module):
    """Attention built from nn.Linear and F.scaled_dot_product_attention (causal), plus a Linear subclass."""

    class Projection(nn.Linear):
        pass

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)
        self.out = self.Projection(E, E)

    def forward(self, x):
        q, k, v = (t.reshape(x.shape[0], T, 2, E // 2).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(x.shape[0], T, E))


def encoder(norm_first, dropout=0.0):
    return nn.TransformerEncoderLayer(E, 2, dim_feedforward=12, dropout=dropout, batch_first=True,
                                      norm_first=norm_first, activation="gelu")


class Decoder(nn.Module):
    def __init__(self, norm_first):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(E, 2, dim_feedforward=12, dropout=0.0, batch_first=False,
                                                norm_first=norm_first)

    def forward(self, tgt, memory, kpm):
        causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
        return self.layer(tgt, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=kpm)


def attention_cases():
    """name -> (model, batched inputs, their sample dims, the recorder's batch_dim)."""
    g = torch.Generator().manual_seed(0)
    x, kpm = rand(B, T, E, g=g), padding_mask(g)
    return {
        "mha-packed-batch-first-padding-weights": (SelfAttention(), (x, kpm), (0, 0), 0),
        "mha-sdpa-subclass": (SelfAttention(type("MyAttention", (nn.MultiheadAttention,), {}), need_weights=False),
                              (x, kpm), (0, 0), 0),
        "mha-cross-seq-first-float-mask": (CrossAttentionSeqFirst(), (rand(T, B, E, g=g), rand(T + 1, B, E, g=g)),
                                           (1, 1), 1),
        "mha-separate-qkv-causal-padding": (SeparateProjections(), (x, rand(B, T, 3, g=g), rand(B, T, 5, g=g), kpm),
                                            (0, 0, 0, 0), 0),
        "custom-linear-sdpa": (CustomAttention(), (x,), (0,), 0),
        "encoder-post-norm": (encoder(False), (x, kpm), (0, 0), 0),
        "encoder-pre-norm": (encoder(True), (x, kpm), (0, 0), 0),
        "decoder-post-norm-seq-first": (Decoder(False), (rand(T, B, E, g=g), rand(T, B, E, g=g), kpm), (1, 1, 0), 1),
        "decoder-pre-norm-seq-first": (Decoder(True), (rand(T, B, E, g=g), rand(T, B, E, g=g), kpm), (1, 1, 0), 1),
    }


def _call(model, inputs):
    if isinstance(model, nn.TransformerEncoderLayer):
        return model(inputs[0], src_key_padding_mask=inputs[1])
    return model(*inputs)


def _loss(out, target):
    return ((out - target) ** 2).sum()


@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
@pytest.mark.parametrize("name", list(attention_cases()))
def test_attention_and_transformer_layers_match_vmap_grad(name, fused):
    torch.manual_seed(1)
    model, inputs, dims, batch_dim = attention_cases()[name]
    model = model.double()
    plain = copy.deepcopy(model)
    norms = PerSampleNorms(model, fused=fused, batch_dim=batch_dim)
    out = _call(model, inputs)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out_dim = 1 if batch_dim else 0
    torch.testing.assert_close(out, _call(plain, inputs), rtol=1e-12, atol=1e-13)  # the same function
    _loss(out, target).backward()

    def loss_one(f, *sample):
        *xs, y = sample
        kw = dict(src_key_padding_mask=xs[1]) if isinstance(model, nn.TransformerEncoderLayer) else {}
        return _loss(f(xs[0], **kw) if kw else f(*xs), y)

    want = vmap_oracle(plain, loss_one, (*inputs, target), (*dims, out_dim))
    assert_exact(model, norms, want, name)
    _loss(_call(plain, inputs), target).backward()  # the gradients are autograd's, to rounding
    for (pname, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13, msg=pname)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_layer_with_dropout_matches_autograd_on_the_same_masks(norm_first):
    g = torch.Generator().manual_seed(3)
    x, kpm, y = rand(B, T, E, g=g), padding_mask(g), rand(B, T, E, g=g)
    torch.manual_seed(4)
    model = encoder(norm_first, dropout=0.3).double()
    plain = copy.deepcopy(model)
    norms = PerSampleNorms(model)
    torch.manual_seed(5)
    out = model(x, src_key_padding_mask=kpm)
    _loss(out, y).backward()

    def losses(f, x, kpm, y):
        return ((f(x, src_key_padding_mask=kpm) - y) ** 2).sum(dim=(1, 2))

    torch.manual_seed(5)  # the same dropout masks: the recorded forward draws as the module's own
    want = autograd_oracle(plain, losses, (x, kpm, y))
    torch.manual_seed(5)
    torch.testing.assert_close(out, plain(x, src_key_padding_mask=kpm), rtol=1e-12, atol=1e-13)
    assert float(model.dropout.p) == 0.3 and (out != plain.eval()(x, src_key_padding_mask=kpm)).any()
    assert_exact(model, norms, want, "dropout")


# ---- tied weights, shared layers, the sample axis --------------------------------------------------------


class TiedLM(nn.Module):
    """Embedding weight shared with the output Linear (tied input and output embeddings)."""

    def __init__(self, tokens=T, vocab=6, dim=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.norm(self.emb(ids))))


@pytest.mark.parametrize("tokens", [2, 12], ids=["head-hooks", "head-fused"])  # 12: T^2 (p+d) >= 16 p d
@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_tied_embedding_and_output_weights_are_exact(fused, tokens):
    torch.manual_seed(0)
    model = TiedLM(tokens).double()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 6, (B, tokens), generator=g), rand(B, tokens, 6, g=g)
    norms = PerSampleNorms(model, fused=fused)
    _loss(model(ids), y).backward()
    want = vmap_oracle(model, lambda f, i, t: _loss(f(i), t), (ids, y), (0, 0))
    assert_exact(model, norms, want, "tied")


@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_a_layer_called_twice_is_exact(fused):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(E, E), nn.Tanh()).double()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = model

        def forward(self, x):
            return self.block(self.block(x))

    twice = Twice()
    g = torch.Generator().manual_seed(1)
    x, y = rand(B, 16, E, g=g), rand(B, 16, E, g=g)  # 16 tokens: the fused mode builds
    norms = PerSampleNorms(twice, fused=fused)
    _loss(twice(x), y).backward()
    assert_exact(twice, norms, vmap_oracle(twice, lambda f, a, t: _loss(f(a), t), (x, y), (0, 0)), "twice")


def test_tokens_folded_into_the_batch_are_refused_by_name():
    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(E, 2)

        def forward(self, x):
            return self.lin(x.reshape(-1, E)).reshape(x.shape[0], -1)

    model = Folded().double()
    PerSampleNorms(model)
    with pytest.raises(RuntimeError, match=r"lin: its input \(20, 8\) has 20 samples along dim 0, the model's input 4"):
        model(torch.randn(B, T, E, dtype=torch.float64))


@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_sequence_first_inputs_are_exact_with_batch_dim_1(fused):
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.norm, self.lin = nn.Embedding(7, E), nn.LayerNorm(E), nn.Linear(E, 3)

        def forward(self, ids):  # (T, B)
            return self.lin(self.norm(self.emb(ids)))

    torch.manual_seed(0)
    model = SeqFirst().double()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 7, (T, B), generator=g), rand(T, B, 3, g=g)
    norms = PerSampleNorms(model, fused=fused, batch_dim=1)
    _loss(model(ids), y).backward()
    assert_exact(model, norms, vmap_oracle(model, lambda f, i, t: _loss(f(i), t), (ids, y), (1, 1)), "seq-first")
    with pytest.raises(UnsupportedModuleError, match=r"0 \(Conv1d: batch_dim=1"):
        PerSampleNorms(nn.Sequential(nn.Conv1d(2, 2, 1)), batch_dim=1)


def test_model_zero_grad_resets_the_statistics_and_stale_ones_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(E, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    g = torch.Generator().manual_seed(1)
    x, y = rand(B, E, g=g), rand(B, 2, g=g)
    norms = PerSampleNorms(model)
    _loss(model(x), y).backward()
    model.zero_grad()  # not the optimizer's: the recorder is not told
    with pytest.raises(RuntimeError, match=r"statistics of 0 are stale: its gradient was zeroed or replaced"):
        norms.sums(list(model.parameters()))
    _loss(model(x[:2]), y[:2]).backward()  # a new batch: only its samples count
    assert_exact(model, norms, vmap_oracle(model, lambda f, a, t: _loss(f(a), t), (x[:2], y[:2]), (0, 0)), "reset")
    assert norms.norm_statistics(model.parameters()).count == 2
    model.zero_grad(set_to_none=False)  # zeroed in place: not detected, documented; CLARS.zero_grad resets


def test_configurations_that_cannot_be_exact_are_refused_at_construction():
    cases = [
        (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), r"padding_mode='reflect'"),
        (nn.Conv1d(2, 2, 3, padding="same"), r"padding='same'"),
        (nn.Embedding(5, 3, max_norm=1.0), r"max_norm=1.0"),
        (nn.MultiheadAttention(4, 2, add_bias_kv=True), r"add_bias_kv=True"),
        (nn.Bilinear(2, 2, 2), r"1 \(Bilinear\)"),
    ]
    for module, message in cases:
        model = nn.Sequential(nn.Linear(2, 2), module)
        with pytest.raises(UnsupportedModuleError, match=message):
            PerSampleNorms(model)
        assert not model._forward_hooks and not any("forward" in m.__dict__ for m in model.modules())


# ---- training loops: checkpointing, a logging forward ------------------------------------------------------


class Checkpointed(nn.Module):
    def __init__(self, use_checkpoint):
        super().__init__()
        self.block = encoder(norm_first=True)
        self.head = nn.Linear(E, 3)
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        if self.use_checkpoint:
            h = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
        else:
            h = self.block(x)
        return self.head(h)


@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_non_reentrant_activation_checkpointing_is_exact(fused):
    torch.manual_seed(0)
    model = Checkpointed(True).double()
    reference = copy.deepcopy(model)
    reference.use_checkpoint = False
    g = torch.Generator().manual_seed(1)
    x, y = rand(B, 16, E, g=g), rand(B, 16, 3, g=g)
    norms = PerSampleNorms(model, fused=fused)
    for _ in range(2):  # twice: the recomputation leaves nothing behind for the next step
        norms.reset()
        model.zero_grad()
        _loss(model(x), y).backward()
        assert_exact(model, norms, vmap_oracle(reference, lambda f, a, t: _loss(f(a), t), (x, y), (0, 0)), "ckpt")


@pytest.mark.parametrize("keep_output", [False, True], ids=["dropped", "kept-alive"])
def test_a_logging_forward_before_the_training_step_is_harmless(keep_output):
    torch.manual_seed(0)
    model = TiedLM(tokens=T).double()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 6, (B, T), generator=g), rand(B, T, 6, g=g)
    norms = PerSampleNorms(model)
    logged = model(ids[:2])  # a forward with gradients enabled and no backward
    if not keep_output:
        del logged
    _loss(model(ids), y).backward()
    assert_exact(model, norms, vmap_oracle(model, lambda f, i, t: _loss(f(i), t), (ids, y), (0, 0)), "logging")


def test_clars_on_a_transformer_layer_equals_clars_with_torch_func_statistics():
    """Three CLARS steps on an encoder layer: the recorder's statistics against torch.func's give the same weights."""
    from lwrs.backends.torch import CLARS

    g = torch.Generator().manual_seed(0)
    x, kpm, y = rand(B, T, E, g=g), padding_mask(g), rand(B, T, E, g=g)
    runs = []
    for use_recorder in (True, False):
        torch.manual_seed(1)
        model = encoder(norm_first=True).double()
        norms = PerSampleNorms(model) if use_recorder else None
        opt = CLARS(model.parameters(), lr=0.05, eta=0.01, weight_decay=1e-4, norm_source=norms)
        for t in range(3):
            opt.zero_grad()
            (_loss(model(x + 0.1 * t, src_key_padding_mask=kpm), y) / B).backward()
            stats = None
            if not use_recorder:
                want = vmap_oracle(model, lambda f, a, m, target: _loss(f(a, src_key_padding_mask=m), target) / B,
                                   (x + 0.1 * t, kpm, y), (0, 0, 0))
                stats = {p: want[name] for name, p in model.named_parameters()}
            opt.step(norm_stats=stats)
        runs.append((model, opt.diagnostics[0].clars_factors))
    for (name, a), b in zip(runs[0][0].named_parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)  # (the key bias has no gradient)
    assert torch.all(runs[0][1] <= 1 + 1e-12) and torch.all(runs[0][1] < 1 - 1e-3)  # the factors do something


@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_two_recorders_on_one_attention_model_both_exact_and_removal_keeps_the_other(fused):
    g = torch.Generator().manual_seed(0)
    x, kpm, y = rand(B, 16, E, g=g), padding_mask(g, length=16), rand(B, 16, E, g=g)
    torch.manual_seed(1)
    model = encoder(norm_first=False).double()

    def loss_one(f, a, m, target):
        return _loss(f(a, src_key_padding_mask=m), target)

    want = vmap_oracle(model, loss_one, (x, kpm, y), (0, 0, 0))
    first, second = PerSampleNorms(model, fused=fused), PerSampleNorms(model, fused=fused)
    _loss(model(x, src_key_padding_mask=kpm), y).backward()
    assert_exact(model, first, want, "first")
    assert_exact(model, second, want, "second")
    second.remove()
    first.reset()
    model.zero_grad()
    _loss(model(x, src_key_padding_mask=kpm), y).backward()
    assert_exact(model, first, want, "first, after the second's removal")
    first.remove()
    assert not any("forward" in m.__dict__ for m in model.modules())
