"""The official CLARS code's estimator of the per-sample term, to compare with the exact
:class:`lwrs.backends.torch.PerSampleNorms`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["minibatch_norm_statistics"]


def minibatch_norm_statistics(model: torch.nn.Module, loss_fn: Any, batches: Iterable[tuple[Any, Any]],
                              params: Iterable[torch.nn.Parameter] | None = None):
    r"""The official CLARS code's estimator: mean over extra mini-batches of the mini-batch gradient's norm.

    .. math:: \hat D_k = \frac1M \sum_{m=1}^M \big\|\nabla_k L(\text{mini-batch}_m)\big\|

    The official code uses :math:`M = 64` extra mini-batches of 8 samples at
    every step, i.e. 64 extra forward and backward passes; it is here for
    comparison with the exact statistics of :class:`PerSampleNorms`. The
    gradients are taken with :func:`torch.autograd.grad`, so ``p.grad`` is
    left untouched. Returns a :class:`lwrs.NormStatistics` with ``count = M``,
    whose ``mean_norms()`` is :math:`\hat D_k` (in ``p.grad`` units for a
    mean-reduced ``loss_fn``). Pair it with ``CLARS(max_ratio=0.1, eps=1e-6)``
    for the code's clipped ratio.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(3, 1)
    >>> batches = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
    >>> stats = minibatch_norm_statistics(model, torch.nn.functional.mse_loss, batches)
    >>> stats.count, tuple(stats.sum_norms.shape)
    (4, (2,))
    """
    from lwrs import NormStatistics

    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    s1 = torch.zeros(len(params), dtype=torch.float64)
    s2 = torch.zeros(len(params), dtype=torch.float64)
    count = 0
    for x, y in batches:
        grads = torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)
        for k, g in enumerate(grads):
            n = torch.zeros((), dtype=torch.float64) if g is None else torch.linalg.vector_norm(g.double())
            s1[k] += n
            s2[k] += n * n
        count += 1
    if count == 0:
        raise ValueError("minibatch_norm_statistics needs at least one mini-batch")
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    device = params[0].device
    return NormStatistics(s1.to(dtype=dtype, device=device), s2.to(dtype=dtype, device=device), count)
