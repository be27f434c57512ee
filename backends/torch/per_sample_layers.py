r"""Per-sample gradients of single layers, as squared norms or built, for :class:`PerSampleNorms`.

Each function takes a layer's input :math:`a` and the gradient :math:`\delta` of
its output, both with the samples along dim 0, and returns, for each of the
layer's parameters, either the squared norms :math:`\|c_i\|^2` of the samples'
contributions :math:`c_i` to its gradient (a ``(B,)`` tensor), or the
contributions themselves (a ``(B, *p.shape)`` tensor) where ``want(p)`` is true.
:class:`PerSampleNorms` asks for the contributions when a parameter receives more
than one contribution in one backward pass (tied weights, a layer called twice):
the per-sample gradient is then their sum, whose norm has cross terms.

Squared norms are taken without building the contributions where that is
cheaper (:math:`t` over tokens or output positions; CLARS eq. 5's per-sample term):

* Linear, one row per sample: :math:`\|a_i\|^2\|\delta_i\|^2`; on sequences the
  ghost form :math:`\langle a_i a_i^\top, \delta_i\delta_i^\top\rangle` when
  :math:`2T^2 \le pd`, else the built :math:`\delta_i^\top a_i`;
* Embedding: :math:`\sum_{t,s}[\mathrm{id}_t = \mathrm{id}_s]\,\delta_t\cdot\delta_s`;
* convolutions: grouped weight-gradient calls (:func:`per_sample_fused.conv_sq_norms`);
* LayerNorm / GroupNorm affine parameters and biases: built, they are small.

Squared norms are returned in float64, so that a loss scale that leaves the gradients
finite leaves them finite too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from . import per_sample_fused

__all__ = ["handler", "linear_pieces", "refusal"]

Want = Callable[[torch.nn.Parameter], bool]
Pieces = dict[torch.nn.Parameter, torch.Tensor]


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared norm of every sample's slice, in float64 (finite wherever the slice is)."""
    return per_sample_fused.sq_norms_of(x if x.dtype == torch.float64 else x.to(stat_dtype(x)))


def _as_sequence(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., f) -> (B, T, f)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _linear_weight_sq(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norm of sum_t d_t a_t^T, for a (B, T, p) and d (B, T, d), T > 1."""
    dtype = stat_dtype(a)
    a, d = a.to(dtype), d.to(dtype)
    T, p, q = a.shape[1], a.shape[2], d.shape[2]
    if 2 * T * T <= p * q:  # ghost norm: <a a^T, d d^T>
        return _gram_inner(torch.bmm(a, a.transpose(1, 2)), d)
    return sq_norms(torch.bmm(d.transpose(1, 2), a))


def _gram_inner(g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``sum_{t,s} g_ts (d_t . d_s)`` per sample, in float64; ``d`` scaled into range for its Gram matrix.

    (The output gradient carries the loss scale: its float32 Gram matrix would overflow from about 1e19.)
    """
    if d.dtype == torch.float64:
        return (torch.bmm(d, d.transpose(1, 2)) * g).sum(dim=(1, 2))
    s = d.abs().amax().clamp_min(torch.finfo(d.dtype).tiny)
    d = d / s
    return (torch.bmm(d, d.transpose(1, 2)) * g).sum(dim=(1, 2), dtype=torch.float64) * s.double().square()


def linear_pieces(x: torch.Tensor, d: torch.Tensor, *, bias: bool, want_weight: bool, want_bias: bool,
                  a_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""A Linear layer's per-sample weight and bias pieces: squared norms, or the contributions where wanted.

    .. math:: c_i^{W} = \sum_t \delta_{it} a_{it}^\top, \qquad c_i^{b} = \sum_t \delta_{it}

    (CLARS eq. 5's per-sample term). ``x`` is ``(B, ..., p)``, ``d`` is
    ``(B, ..., q)``; ``a_sq``, if given, is :math:`\|a_i\|^2` of a 2-D input.

    Examples
    --------
    >>> import torch
    >>> x, d = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    >>> w_sq, b_sq = linear_pieces(x, d, bias=True, want_weight=False, want_bias=False)
    >>> w, _ = linear_pieces(x, d, bias=True, want_weight=True, want_bias=False)
    >>> tuple(w.shape), bool(torch.allclose(w.pow(2).sum(dim=(1, 2)), w_sq))
    ((3, 2, 4), True)
    """
    dtype = stat_dtype(d)
    a, dd = _as_sequence(x), _as_sequence(d)
    d_sq = None
    if want_weight:
        w = torch.bmm(dd.transpose(1, 2).to(dtype), a.to(dtype))
    elif a.shape[1] == 1:
        d_sq = sq_norms(dd)
        w = (sq_norms(a) if a_sq is None else a_sq) * d_sq
    else:
        w = _linear_weight_sq(a, dd)
    b = None
    if bias:
        # one position: the slice itself (a sum over a length-1 axis would zero-fill and copy the whole of d),
        # whose squared norm the weight's already took
        per_sample = dd[:, 0].to(dtype) if dd.shape[1] == 1 else dd.sum(dim=1, dtype=dtype)
        b = per_sample if want_bias else d_sq if d_sq is not None else sq_norms(per_sample)
    return w, b


def _linear(module: torch.nn.Linear, x: torch.Tensor, d: torch.Tensor, want: Want,
            a_sq: torch.Tensor | None = None) -> Pieces:
    has_bias = module.bias is not None
    w, b = linear_pieces(x, d, bias=has_bias, want_weight=want(module.weight),
                         want_bias=has_bias and want(module.bias), a_sq=a_sq)
    return {module.weight: w, module.bias: b} if has_bias else {module.weight: w}


def _conv(module: torch.nn.Module, x: torch.Tensor, d: torch.Tensor, want: Want) -> Pieces:
    batch, out_ch = x.shape[0], module.out_channels
    if want(module.weight):
        out = {module.weight: per_sample_fused.conv_per_sample(module, x, d)}
    else:
        out = {module.weight: per_sample_fused.conv_sq_norms(module, x, d)}
    if module.bias is not None:
        per_sample = d.reshape(batch, out_ch, -1).sum(dim=2, dtype=stat_dtype(d))
        out[module.bias] = per_sample if want(module.bias) else sq_norms(per_sample)
    return out


def _embedding(module: torch.nn.Embedding, ids: torch.Tensor, d: torch.Tensor, want: Want) -> Pieces:
    ids = ids.reshape(ids.shape[0], -1)
    dd = _as_sequence(d).to(stat_dtype(d))
    if want(module.weight):  # c_i = sum_t onehot(id_t) delta_t^T, the padding row left out
        c = dd.new_zeros(ids.shape[0], *module.weight.shape)
        c.scatter_add_(1, ids[:, :, None].expand(-1, -1, dd.shape[2]), dd)
        if module.padding_idx is not None:
            c[:, module.padding_idx] = 0
        return {module.weight: c}
    same = ids[:, :, None] == ids[:, None, :]
    if module.padding_idx is not None:
        keep = ids != module.padding_idx
        same = same & keep[:, :, None] & keep[:, None, :]
    return {module.weight: _gram_inner(same.to(dd.dtype), dd)}


def _affine(params: tuple, per_sample: tuple, want: Want) -> Pieces:
    return {p: (c if want(p) else sq_norms(c)) for p, c in zip(params, per_sample) if p is not None}


def _layer_norm(module: torch.nn.LayerNorm, x: torch.Tensor, d: torch.Tensor, want: Want) -> Pieces:
    if not module.elementwise_affine:
        return {}
    xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    reduce = tuple(range(1, x.ndim - len(module.normalized_shape)))
    dtype = stat_dtype(d)
    w = (d * xhat).sum(dim=reduce, dtype=dtype) if reduce else (d * xhat).to(dtype)
    b = d.sum(dim=reduce, dtype=dtype) if reduce else d.to(dtype)
    return _affine((module.weight, module.bias), (w, b), want)


def _group_norm(module: torch.nn.GroupNorm, x: torch.Tensor, d: torch.Tensor, want: Want) -> Pieces:
    if not module.affine:
        return {}
    xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
    reduce = tuple(range(2, x.ndim))
    dtype = stat_dtype(d)
    w = (d * xhat).sum(dim=reduce, dtype=dtype) if reduce else (d * xhat).to(dtype)
    b = d.sum(dim=reduce, dtype=dtype) if reduce else d.to(dtype)
    return _affine((module.weight, module.bias), (w, b), want)


# (class, the methods a subclass must inherit unchanged for the handler to apply)
_HANDLERS = (
    (torch.nn.Linear, ("forward",), _linear),
    (torch.nn.Conv1d, ("forward", "_conv_forward"), _conv),
    (torch.nn.Conv2d, ("forward", "_conv_forward"), _conv),
    (torch.nn.Embedding, ("forward",), _embedding),
    (torch.nn.LayerNorm, ("forward",), _layer_norm),
    (torch.nn.GroupNorm, ("forward",), _group_norm),
)


def keeps_forward(module: torch.nn.Module, cls: type, methods: tuple[str, ...] = ("forward",)) -> bool:
    """``module`` is a ``cls`` (or a subclass) whose ``methods`` are ``cls``'s own."""
    return isinstance(module, cls) and all(getattr(type(module), m) is getattr(cls, m) for m in methods)


def handler(module: torch.nn.Module):
    """The per-sample function for ``module``'s parameters, or None (subclasses that keep the forward count).

    Examples
    --------
    >>> import torch
    >>> class MyLinear(torch.nn.Linear):
    ...     pass
    >>> handler(MyLinear(2, 2)) is handler(torch.nn.Linear(2, 2)) is not None, handler(torch.nn.PReLU())
    (True, None)
    """
    for cls, methods, fn in _HANDLERS:
        if keeps_forward(module, cls, methods):
            return fn
    return None


# the parameters each handler measures (by attribute name)
_COVERED = {_linear: ("weight", "bias"), _conv: ("weight", "bias"), _embedding: ("weight",),
            _layer_norm: ("weight", "bias"), _group_norm: ("weight", "bias")}


_ATTENTION_COVERED = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                      "bias_k", "bias_v")


def uncovered(module: torch.nn.Module) -> list[str]:
    """The names of a supported module's own parameters its handler does not measure (a subclass's additions).

    Examples
    --------
    >>> import torch
    >>> class Scaled(torch.nn.Linear):
    ...     def __init__(self):
    ...         super().__init__(2, 2); self.scale = torch.nn.Parameter(torch.ones(2))
    >>> uncovered(Scaled()), uncovered(torch.nn.Linear(2, 2))
    (['scale'], [])
    """
    if isinstance(module, torch.nn.MultiheadAttention):  # (its out_proj is a module of its own)
        covered = _ATTENTION_COVERED
    else:
        fn = handler(module)
        if fn is None:
            return []
        covered = _COVERED[fn]
    return [n for n, _ in module.named_parameters(recurse=False) if n not in covered]


def refusal(module: torch.nn.Module) -> str | None:
    """Why the per-sample norms of a supported module's configuration cannot be exact, or None.

    Examples
    --------
    >>> import torch
    >>> refusal(torch.nn.Conv1d(1, 1, 3, padding="same")), refusal(torch.nn.Conv1d(1, 1, 3))
    ("padding='same' (per-sample norms need numeric padding and padding_mode='zeros')", None)
    """
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)):
            which = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
            return (f"torch.nn.utils.{which} (it recomputes {hook.name!r} from other parameters before the forward; "
                    f"torch.nn.utils.parametrizations.{which} is refused too)")
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
        if isinstance(module.padding, str):
            return f"padding={module.padding!r} (per-sample norms need numeric padding and padding_mode='zeros')"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (per-sample norms need padding_mode='zeros')"
    if isinstance(module, torch.nn.Embedding):
        if module.max_norm is not None:
            return f"max_norm={module.max_norm!r} (renormalises the weight in the forward pass)"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True (scales by batch-wide frequencies)"
        if module.sparse:
            return "sparse=True (per-sample norms need dense gradients)"
    return None


def overlap(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    """Whether two row ranges of a parameter overlap (None: the whole parameter)."""
    return a is None or b is None or (a[0] < b[1] and b[0] < a[1])


def combine(p: torch.nn.Parameter, pieces: list) -> torch.Tensor:
    """The squared per-sample norms of ``p`` from its contributions in one pass."""
    if len(pieces) == 1:
        _, t, built, _ = pieces[0]
        return sq_norms(t) if built else t
    rows = [r for r, *_ in pieces]
    if not any(built for *_, built, _ in pieces) and all(
            not overlap(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]):
        return sum(t for _, t, _, _ in pieces)  # disjoint rows: the squared norms add
    names = sorted({name for *_, name in pieces})
    if not all(built for *_, built, _ in pieces):
        raise RuntimeError(f"a parameter of {', '.join(names)} got a contribution in backward from a use "
                           "that was not live in the forward pass (a reentrant checkpoint?); its per-sample "
                           "norms would miss cross terms")
    batches = {t.shape[0] for _, t, _, _ in pieces}
    if len(batches) != 1:
        raise RuntimeError(f"the uses of a parameter shared by {', '.join(names)} have different numbers of "
                           f"samples {sorted(batches)}: its per-sample gradients are not defined")
    first = pieces[0][1]
    full = first.new_zeros(first.shape[0], *p.shape)
    for r, t, _, _ in pieces:
        (full if r is None else full[:, r[0]:r[1]]).add_(t.to(full.dtype))
    return sq_norms(full)
