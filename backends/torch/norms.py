"""Squared norms for the torch optimizers' kernels: every per-layer norm of a step in one pass per list.

:func:`squared_norms` is the one place where the torch fast paths reduce tensors to per-layer
sums of squares (weights, gradients, weight-decayed gradients in either form, and momentum
buffers). Under sharding (DTensor) it sums the local shards' partial sums across ranks with one
collective for all layers. The formulas are the core's (:func:`lwrs.rates.weight_decayed_norms`,
:func:`lwrs.layer_norms`), against which the tests check these kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lwrs.rates import statistics_dtype

__all__ = ["squared_norms", "stat_dtype"]

_CHUNK = 1 << 16  # elements per chunk of g + lambda w (256 KiB in float32): formed in a small scratch buffer


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _stat_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    return statistics_dtype(torch, [t.dtype for t in tensors])


_SQ_BLOCK = 1 << 15  # elements per BLAS dot product in _sq


def _sq(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sum(x**2)`` of one layer in ``dtype``, accurate to a few float32 roundings on any size.

    A single BLAS dot product accumulates sequentially (3e-5 relative on 2.4M float32 entries);
    here blocks of 32768 entries are dotted in one batched product and their sums added in float64
    (1e-7), at the dot product's speed and without a temporary. Compiled: ``sum(x * x)``, which
    inductor fuses. Low precision is accumulated in float32.
    """
    if x.dtype not in (torch.float32, torch.float64):
        return torch.linalg.vector_norm(x, dtype=torch.float32).to(dtype) ** 2
    flat = x.reshape(-1)
    if _compiling():
        return (flat * flat).sum().to(dtype)
    n = flat.numel()
    m = n // _SQ_BLOCK
    if m == 0:
        return torch.dot(flat, flat).to(dtype)
    blocks = flat[: m * _SQ_BLOCK].view(m, 1, _SQ_BLOCK)
    total = torch.bmm(blocks, blocks.transpose(1, 2)).sum(dtype=torch.float64)
    if n > m * _SQ_BLOCK:
        rest = flat[m * _SQ_BLOCK:]
        total = total + torch.dot(rest, rest)
    return total.to(dtype)


def _blockable(lists) -> bool:
    """Whether every tensor is a CPU float32 (or every one a float64) tensor, eager: one batched pass."""
    if _compiling():
        return False
    tensors = [x for row in lists for x in row if x is not None]
    dtypes = {x.dtype for x in tensors}
    return len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64} and all(x.is_cpu for x in tensors)


def _sums_of_squares(lists, dtype) -> torch.Tensor:
    """:func:`_sq` of every tensor of every list, as a ``(len(lists), K)`` tensor, with few ops.

    Layers smaller than a block take one ``torch._foreach_norm`` for all of them; each larger layer
    gives its block partial sums (one batched product), added per layer in float64 in one ``index_add_``.
    """
    tensors = [x for row in lists for x in row]
    small = [i for i, x in enumerate(tensors) if x is not None and x.numel() < _SQ_BLOCK]
    total = torch.zeros(len(tensors), dtype=torch.float64)
    if small:
        norms = torch.stack(torch._foreach_norm([tensors[i] for i in small])).double()
        total[torch.tensor(small)] = norms * norms
    parts, ids = [], []
    for i, x in enumerate(tensors):
        if x is None or x.numel() < _SQ_BLOCK:
            continue
        flat = x.reshape(-1)
        n = flat.numel()
        m = n // _SQ_BLOCK
        blocks = flat[: m * _SQ_BLOCK].view(m, 1, _SQ_BLOCK)
        parts.append(torch.bmm(blocks, blocks.transpose(1, 2)).reshape(m))
        if n > m * _SQ_BLOCK:
            rest = flat[m * _SQ_BLOCK:]
            parts.append(torch.dot(rest, rest).reshape(1))
            m += 1
        ids += [i] * m
    if parts:
        total.index_add_(0, torch.tensor(ids), torch.cat(parts).double())
    return total.to(dtype).reshape(len(lists), -1)


def _decayed_sq(w: torch.Tensor, g: torch.Tensor, lam: float, dtype: torch.dtype, scratch: list) -> torch.Tensor:
    r""":math:`\|g + \lambda w\|^2` of one layer, summing squares of the sum itself (no cancellation).

    Eager: ``g + lambda w`` is formed a chunk at a time in one small scratch buffer, so no
    layer-sized temporary is made; compiled: one expression that inductor fuses.
    """
    if _compiling() or g.numel() <= _CHUNK:
        return _sq(g + lam * w, dtype)
    if not scratch or scratch[0].dtype != g.dtype or scratch[0].device != g.device:
        scratch[:] = [torch.empty(_CHUNK, dtype=g.dtype, device=g.device)]
    buf, gf, wf = scratch[0], g.reshape(-1), w.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=g.device)
    for start in range(0, gf.numel(), _CHUNK):
        n = min(_CHUNK, gf.numel() - start)
        part = torch.mul(wf[start:start + n], lam, out=buf[:n])  # lambda w, then + g: the core's rounding
        part += gf[start:start + n]
        total += _sq(part, part.dtype if part.dtype in (torch.float32, torch.float64) else torch.float32)
    return total.to(dtype)


def squared_norms(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  buffers: Sequence[torch.Tensor | None] | None = None,
                  decays: Sequence[float] | None = None, *, dtype: torch.dtype | None = None,
                  implementation: str = "foreach", layouts: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    r"""Every per-layer sum of squares a step needs, as one ``(4, K)`` tensor.

    .. math::

        \big(\|w_k\|^2,\ \|\bar g_k\|^2,\ \|d_k\|^2,\ \|\bar g_k + \lambda_k w_k\|^2\big)_{k=1..K}

    Row 2 (the state's norm, for the non-finite check) is 0 where ``buffers`` has no tensor;
    row 3 is computed only where ``decays`` is given and :math:`\lambda_k \ne 0` (else 0), from
    the sum itself, never as :math:`\|g\|^2 + 2\lambda\langle g, w\rangle + \lambda^2\|w\|^2`.
    This is the one function that reads the tensors for norms: a sharded backend reduces its
    result across shards with a single all-reduce (sums of squares add over shards). With
    ``layouts`` (the ``DTensor`` s whose local shards the lists hold), every row is summed over
    the shards with one collective (:func:`lwrs.backends.torch.distributed.sum_over_shards`).

    References: CLARS eq. (3) and (5) (the norms of the trust ratio); optax ``lars``
    (the ``norm_of_sum`` form).

    Examples
    --------
    >>> import torch
    >>> squared_norms([torch.tensor([3.0, 4.0])], [torch.tensor([1.0, 0.0])], decays=[1.0])[:, 0]
    tensor([25.,  1.,  0., 32.])
    """
    dtype = _stat_dtype(params) if dtype is None else dtype
    k = len(params)
    if implementation == "fused" and not _compiling():
        from . import fused

        lam = torch.tensor([float(x) for x in decays] if decays is not None else [0.0] * k, dtype=torch.float64)
        bufs = [b if b is not None else torch.empty(0, dtype=p.dtype) for b, p in zip(buffers or [None] * k, params)]
        return fused.load().layer_sums(list(params), list(grads), bufs, lam).to(dtype).T.contiguous()
    if k == 0:
        return torch.zeros((4, 0), dtype=dtype)
    zero = torch.zeros((), dtype=dtype, device=params[0].device)
    bufs = list(buffers) if buffers is not None else [None] * k
    lams = [float(x) for x in decays] if decays is not None else [0.0] * k
    scratch: list = []
    row3 = torch.stack([_decayed_sq(w, g, lam, dtype, scratch) if lam else zero
                        for w, g, lam in zip(params, grads, lams)])
    lists = [list(params), list(grads), bufs]
    if _blockable(lists):
        out = torch.cat([_sums_of_squares(lists, dtype), row3[None]])
    else:
        out = torch.stack([torch.stack([_sq(x, dtype) if x is not None else zero for x in row]) for row in lists]
                          + [row3])
    if layouts is not None:  # local shards of DTensors: the whole layers' sums, one collective for all rows
        from .distributed import sum_over_shards

        out = sum_over_shards(out.reshape(-1), list(layouts) * 4).reshape(4, k)
    return out


stat_dtype = _stat_dtype
