r"""Exact per-sample norms of ``nn.MultiheadAttention``: its forward with recordable projections.

``nn.MultiheadAttention`` computes its projections inside
``F.multi_head_attention_forward`` from the packed ``in_proj_weight`` (or the
separate ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``) and the
out-projection's weight, so no Linear module's hooks see them. :func:`install`
gives the module an instance-level forward that computes the same function,
with every projection a call of a recorded ``linear(x, weight, bias, rows,
bias_rows)`` on batch-first inputs:

* self-attention (``query is key is value``): one projection with the whole
  packed weight, :math:`[q\,k\,v] = x W_{in}^\top + b_{in}`;
* ``key is value`` (a decoder's cross-attention): rows :math:`[0, E)` on the
  query and :math:`[E, 3E)` on the key;
* otherwise three row ranges (or the three separate weights, with the
  matching rows of ``in_proj_bias``);
* the out-projection :math:`o = \mathrm{attn}\, W_o^\top + b_o`.

Row ranges of one parameter are disjoint, so their per-sample squared norms add
(:math:`\|c_i\|^2 = \sum_r \|c_i^{(r)}\|^2`); each range is measured as a Linear
layer (CLARS eq. 5's per-sample term). The attention itself,
:math:`\mathrm{softmax}(q k^\top/\sqrt{d_h} + M)\,v` with the merged attention and
key-padding mask :math:`M` and dropout on the weights, has no parameters: it is
``F.scaled_dot_product_attention`` when the weights are not needed, else the
explicit form, as in PyTorch. Without gradients, under ``torch.func``
transforms, or for inputs it does not cover, the module's own forward runs.
``TransformerEncoderLayer`` and ``TransformerDecoderLayer`` call their attention
modules, so they are covered with their Linear and LayerNorm layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .per_sample_fused import InstanceForward, drop_copied, recording

__all__ = ["install", "refusal", "supported", "uninstall"]


def supported(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a ``nn.MultiheadAttention`` that keeps its forward (subclasses included).

    Examples
    --------
    >>> import torch
    >>> supported(torch.nn.MultiheadAttention(4, 2)), supported(torch.nn.Linear(4, 4))
    (True, False)
    """
    cls = torch.nn.MultiheadAttention
    return isinstance(module, cls) and type(module).forward is cls.forward


def refusal(module: torch.nn.MultiheadAttention) -> str | None:
    """Why this attention module's per-sample norms are not computed, or None.

    Examples
    --------
    >>> import torch
    >>> refusal(torch.nn.MultiheadAttention(4, 2, add_bias_kv=True))
    'add_bias_kv=True (bias_k and bias_v are not supported)'
    """
    if module.bias_k is not None or module.bias_v is not None:
        return "add_bias_kv=True (bias_k and bias_v are not supported)"
    if module.add_zero_attn:
        return "add_zero_attn=True (not supported)"
    return None


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: masked out) as an additive one; a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def attention_forward(module: torch.nn.MultiheadAttention, linear: Callable[..., torch.Tensor],
                      query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                      attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                      is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""``module(query, key, value, ...)`` with the projections computed by ``linear`` (batch-first, 3-D inputs).

    .. math:: \mathrm{MHA}(Q, K, V) = \big[\mathrm{softmax}\big(q_h k_h^\top/\sqrt{d_h} + M\big)\, v_h\big]_h W_o^\top + b_o

    with :math:`q = Q W_q^\top + b_q` (and :math:`k`, :math:`v` alike), the
    function of ``nn.MultiheadAttention`` ("Attention Is All You Need", eq. 1 and
    the multi-head equations of section 3.2.2).

    Examples
    --------
    >>> import torch
    >>> mha = torch.nn.MultiheadAttention(4, 2, batch_first=True).double()
    >>> x = torch.randn(3, 5, 4, dtype=torch.float64)
    >>> plain = lambda x, w, b, rows, b_rows: torch.nn.functional.linear(
    ...     x, w if rows is None else w[rows[0]:rows[1]], b if b_rows is None or b is None else b[b_rows[0]:b_rows[1]])
    >>> out, _ = attention_forward(mha, plain, x, x, x, need_weights=False)
    >>> bool(torch.allclose(out, mha(x, x, x, need_weights=False)[0]))
    True
    """
    m = module
    E, H = m.embed_dim, m.num_heads
    if not m.batch_first:  # batch first, keeping which inputs are the same tensor
        q_t = query.transpose(0, 1)
        k_t = q_t if key is query else key.transpose(0, 1)
        value = k_t if value is key else q_t if value is query else value.transpose(0, 1)
        query, key = q_t, k_t
    B, L, S = query.shape[0], query.shape[1], key.shape[1]
    W, b = m.in_proj_weight, m.in_proj_bias
    if m._qkv_same_embed_dim:
        if query is key and key is value:  # self-attention: one projection with the whole packed weight
            q, k, v = linear(query, W, b, None, None).chunk(3, dim=-1)
        elif key is value:
            q = linear(query, W, b, (0, E), (0, E))
            k, v = linear(key, W, b, (E, 3 * E), (E, 3 * E)).chunk(2, dim=-1)
        else:
            q, k, v = (linear(x, W, b, (j * E, (j + 1) * E), (j * E, (j + 1) * E))
                       for j, x in enumerate((query, key, value)))
    else:
        q, k, v = (linear(x, w, b, None, None if b is None else (j * E, (j + 1) * E))
                   for j, (x, w) in enumerate(((query, m.q_proj_weight), (key, m.k_proj_weight),
                                               (value, m.v_proj_weight))))
    q, k, v = (t.reshape(B, -1, H, E // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, d_h)
    kpm = _float_mask(key_padding_mask, query.dtype)
    mask = _float_mask(attn_mask, query.dtype)
    if is_causal and mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
    causal = is_causal and kpm is None and not need_weights
    if causal:
        mask = None  # SDPA's causal hint, as PyTorch does
    elif mask is not None and mask.dim() == 3:
        mask = mask.view(B, H, L, S)
    if kpm is not None:
        kpm = kpm.view(B, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    p = m.dropout if m.training else 0.0
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / (E // H))) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if p > 0.0:
            weights = F.dropout(weights, p=p)
        out = weights @ v
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, p, is_causal=causal)
    out = linear(out.transpose(1, 2).reshape(B, L, E), m.out_proj.weight, m.out_proj.bias, None, None)
    out = out.transpose(0, 1).contiguous()  # sequence first in memory, as PyTorch's (dropout masks follow memory)
    return (out.transpose(0, 1) if m.batch_first else out), weights


def install(module: torch.nn.MultiheadAttention, linear: Callable[..., torch.Tensor],
            begin: Callable[[torch.nn.Module, int, tuple, int], None]) -> None:
    r"""Give ``module`` an instance-level forward whose projections are recorded by ``linear``.

    ``linear(x, weight, bias, rows, bias_rows)`` computes
    :math:`x W_{rows}^\top + b_{rows}` (``rows`` a ``(start, stop)`` range of the
    parameter's rows or None) with ``x``'s samples along dim 0, and records
    its per-sample norms (CLARS eq. 5's per-sample term); ``begin(module,
    samples, shape, dim)`` is told each recorded call's batch. Several
    recorders may be installed on one module: the first computes each
    projection, the others receive it as ``linear(..., y=projection)`` and
    only observe it. :func:`uninstall` removes one (or all).

    Examples
    --------
    >>> import torch
    >>> mha, calls = torch.nn.MultiheadAttention(4, 2), []
    >>> def linear(x, w, b, rows, b_rows, y=None):
    ...     calls.append(rows)
    ...     return torch.nn.functional.linear(x, w if rows is None else w[rows[0]:rows[1]],
    ...                                       b if b_rows is None else b[b_rows[0]:b_rows[1]])
    >>> install(mha, linear, lambda *args: None)
    >>> q, kv = torch.randn(5, 3, 4), torch.randn(6, 3, 4)
    >>> _ = mha(q, kv, kv); uninstall(mha); calls
    [(0, 4), (4, 12), None]
    """
    drop_copied(module)
    recorders = module.__dict__.get(_RECORDERS)
    if recorders is not None:
        recorders.append((linear, begin))
        return
    if "forward" in module.__dict__:
        raise RuntimeError(f"{module} already has an instance-level forward; cannot record its per-sample norms")
    recorders = _Recorders([(linear, begin)])
    module.__dict__[_RECORDERS] = recorders

    def recorded(x, weight, bias, rows, bias_rows):
        y = recorders[0][0](x, weight, bias, rows, bias_rows)
        for other, _ in recorders[1:]:
            other(x, weight, bias, rows, bias_rows, y=y)
        return y

    def forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                **kwargs: Any):
        params = [p for p in module.parameters() if p.requires_grad]
        if (not params or not recording() or query.dim() != 3 or query.is_nested):
            return type(module).forward(module, query, key, value, *args, **kwargs)
        dim = 0 if module.batch_first else 1
        for _, begin_one in recorders:
            begin_one(module, query.shape[dim], tuple(query.shape), dim)
        return attention_forward(module, recorded, query, key, value, *args, **kwargs)

    module.forward = InstanceForward(module, forward)


class _Recorders(list):
    """The recorders installed on a module; a copy of the module (deepcopy, pickle) has none."""

    def __reduce__(self) -> tuple:
        return (list, ())


_RECORDERS = "_lwrs_per_sample_recorders"


def uninstall(module: torch.nn.Module, linear: Callable[..., torch.Tensor] | None = None) -> None:
    """Remove the recorder ``linear`` from ``module`` (all with None); the last one gives the module its forward back."""
    recorders = module.__dict__.get(_RECORDERS, [])
    recorders[:] = [] if linear is None else [r for r in recorders if r[0] is not linear]
    if not recorders:
        module.__dict__.pop(_RECORDERS, None)
        module.__dict__.pop("forward", None)
