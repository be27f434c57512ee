"""Whether recorded per-sample statistics still describe ``p.grad``, for :class:`PerSampleNorms`.

The statistics of a parameter add up over backward passes, as autograd adds into
``p.grad``. After the last backward, :func:`note` keeps a weak reference to each
gradient, its version counter and its norm; :func:`follow` compares:

* a gradient set to None or replaced (``model.zero_grad()``) or zeroed in place
  (``model.zero_grad(set_to_none=False)``, ``p.grad.zero_()``: all zero while its
  statistics are not) makes them stale;
* a gradient rescaled in place (``GradScaler.unscale_``, ``clip_grad_norm_``, a
  division by the number of micro-batches) rescales them: every sample's gradient is
  taken to be rescaled by the ratio of the gradient's norms, so :math:`S^{(1)}` follows
  it by the ratio and :math:`S^{(2)}` by its square. A ratio within :math:`10^{-6}` of a
  power of two is that power (a loss scale's, exact in floating point). A change that
  is not a rescaling (``clip_grad_value_``, added noise) cannot be split per sample.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["grad_state", "unchanged", "note", "follow"]


def grad_state(p: torch.nn.Parameter) -> tuple[Any, int]:
    """``(weak reference to p.grad or None, its version counter)``: what :func:`unchanged` compares with."""
    return (None, 0) if p.grad is None else (weakref.ref(p.grad), p.grad._version)


def unchanged(p: torch.nn.Parameter, state: tuple[Any, int]) -> bool:
    """Whether ``p.grad`` is the tensor of :func:`grad_state` ``state``, not changed in place since (or still None).

    >>> import torch
    >>> w = torch.ones(2, requires_grad=True); before = grad_state(w)
    >>> (3 * w).sum().backward(); unchanged(w, before), unchanged(w, grad_state(w))
    (False, True)
    """
    ref, version = state
    if ref is None:
        return p.grad is None
    return p.grad is ref() and p.grad._version == version


def note(params: Iterable[torch.nn.Parameter]) -> dict[torch.nn.Parameter, tuple[Any, int, Any]]:
    """``p -> (weak reference to p.grad or None, its version counter, its norm)`` after a backward pass.

    The norms are taken in one multi-tensor call per device and dtype.

    Examples
    --------
    >>> import torch
    >>> w = torch.ones(2, requires_grad=True); (3 * w).sum().backward()
    >>> seen = note([w]); _ = w.grad.zero_(); follow(seen, {w: torch.tensor(6.0)}, [w])[0] == {w}
    True
    """
    out, groups = {}, {}
    for p in params:
        ref, version = grad_state(p)
        out[p] = (ref, version, None)
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    for ps in groups.values():
        for p, n in zip(ps, _norms([p.grad.detach() for p in ps])):
            out[p] = out[p][:2] + (n,)
    return out


def _norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The norms of ``grads`` (one device and dtype), in their dtype, and again in float64 where that overflowed
    (a float32 gradient under a large loss scale): float64 throughout would cost six times as much on the CPU."""
    norms = list(torch._foreach_norm(grads))
    if grads and grads[0].dtype != torch.float64 and not bool(torch.isfinite(torch.stack(norms)).all()):
        norms = list(torch._foreach_norm(grads, 2, dtype=torch.float64))
    return norms


def _snapped(ratio: float) -> float:
    """``ratio``, or the power of two it is within 1e-6 of (a loss scale's rescaling is exact)."""
    if ratio > 0:
        power = 2.0 ** round(math.log2(ratio))
        if abs(ratio / power - 1.0) < 1e-6:
            return power
    return ratio


def follow(seen: dict, sums: dict, params: Iterable[torch.nn.Parameter]) -> tuple[set, dict]:
    r"""``(stale, ratios)``: the ``params`` whose gradient was set to None, replaced or zeroed in place since
    :func:`note`, and ``p -> ratio`` of the norms of those rescaled in place since (see the module notes).

    ``sums`` maps a parameter to its recorded :math:`\sum_i \|c_i\|` (the sum in CLARS eq. 5's
    mean per-sample norm): a gradient :math:`\sum_i c_i` that is all zero while that sum is
    positive was zeroed; one that was zero and is not any more cannot be followed (stale).

    Examples
    --------
    >>> import torch
    >>> w = torch.ones(2, requires_grad=True); (3 * w).sum().backward()
    >>> seen = note([w]); _ = w.grad.mul_(0.25); follow(seen, {w: torch.tensor(6.0)}, [w])
    (set(), {tensor([1., 1.], requires_grad=True): 0.25})
    """
    out, ratios, changed = set(), {}, {}
    for p in params:
        if p not in seen:
            continue
        (ref, version, _), grad = seen[p], p.grad
        if grad is None or ref is None or ref() is not grad:
            out.add(p)
        elif grad._version != version:
            changed.setdefault((grad.device, grad.dtype), []).append(p)
    for ps in changed.values():  # one read per device and dtype
        now = _norms([p.grad.detach() for p in ps])
        for p, n, before in zip(ps, [float(x) for x in now], [seen[p][2] for p in ps]):
            before = float(before) if before is not None else 0.0
            if n == 0.0 and float(sums[p]) > 0:
                out.add(p)  # zeroed in place
            elif before == 0.0:
                if n > 0.0:
                    out.add(p)  # was zero, is not: not a rescaling
            elif not math.isfinite(n):
                continue  # a non-finite gradient: the optimizer's checks name it
            else:
                ratios[p] = _snapped(n / before)
    return out, ratios
