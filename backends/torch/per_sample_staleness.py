"""Whether recorded per-sample statistics still describe ``p.grad``, for :class:`PerSampleNorms`.

The statistics of a parameter add up over backward passes, as autograd adds into
``p.grad``. After the last backward, :func:`note` keeps a weak reference to each
gradient, its norm and a few of its entries; :func:`follow` compares them with the
gradient as it is when the statistics are used (whatever its version counter says):

* a gradient set to None or zeroed (``model.zero_grad()``, with or without
  ``set_to_none``, ``p.grad.zero_()``) makes them stale;
* a gradient rescaled (``GradScaler.unscale_``, ``clip_grad_norm_``, a division by the
  number of micro-batches, in place or not) rescales them: every sample's gradient is
  taken to be rescaled with the batch's, so :math:`S^{(1)}` follows the ratio of the
  norms and :math:`S^{(2)}` its square. A ratio within :math:`10^{-6}` of a power of
  two is that power (a loss scale's, exact in floating point);
* a gradient changed otherwise (averaged by hand over ranks, ``clip_grad_value_``)
  leaves them as they are: such a change cannot be split per sample.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from . import distributed

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


def note(params: Iterable[torch.nn.Parameter]) -> dict[torch.nn.Parameter, tuple[Any, Any, Any, bool]]:
    """``p -> (weak reference to the gradient, its norm, a few of its entries, sharded)`` after a backward pass.

    For a ``DTensor`` gradient (FSDP2) the local shard is noted. The norms and entries are taken in
    one call each per device and dtype.

    Examples
    --------
    >>> import torch
    >>> w = torch.ones(2, requires_grad=True); (3 * w).sum().backward()
    >>> seen = note([w]); _ = w.grad.zero_(); follow(seen, {w: torch.tensor(6.0)}, [w])[0] == {w}
    True
    """
    out, groups = {}, {}
    for p in params:
        sharded = distributed.is_sharded([p])
        if p.grad is None:
            out[p] = (None, None, None, sharded)
            continue
        t = distributed.local([p.grad])[0]
        out[p] = (weakref.ref(t), None, None, sharded)
        groups.setdefault((t.device, t.dtype), []).append(p)
    for ps in groups.values():
        grads = [distributed.local([p.grad])[0].detach() for p in ps]
        for p, n, e in zip(ps, _norms(grads).unbind(0), _entries(grads)):
            out[p] = (out[p][0], n, e, out[p][3])
    return out


_ENTRIES = 4  # entries of each gradient compared besides its norm: a rescaling moves them all by one ratio


def _entries(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """A few evenly spaced entries of each gradient, as float64 (one copy for all)."""
    views = []
    for g in grads:
        flat = g.reshape(-1)
        views.append(flat[:: max(1, flat.numel() // _ENTRIES)][:_ENTRIES])
    if not views:
        return []
    return list(torch.cat(views).double().split([v.numel() for v in views]))


def _norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """The norms of ``grads`` (one device and dtype) as a float64 vector: accumulated in float32 at least (half
    types carry 0.5% rounding), and on the CPU in float64 only where float32 overflowed (a large loss scale),
    which costs no synchronisation there; elsewhere in float64 (no host read after every backward)."""
    if grads[0].dtype == torch.float64 or grads[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64))
    norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
    if not bool(torch.isfinite(norms).all()):
        return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64))
    return norms.double()


def _snapped(ratio: float) -> float:
    """``ratio``, or the power of two it is within 1e-6 of (a loss scale's rescaling is exact)."""
    if ratio > 0:
        power = 2.0 ** round(math.log2(ratio))
        if abs(ratio / power - 1.0) < 1e-6:
            return power
    return ratio


def _rescaled(before: list[float], now: list[float], ratio: float, dtype: torch.dtype) -> bool:
    """Whether ``now`` is ``before`` times ``ratio``, entry by entry, to the rounding of ``dtype``."""
    tol = 16 * torch.finfo(dtype).eps + 1e-9
    return all(abs(b_now - ratio * b) <= tol * max(abs(b_now), abs(ratio * b)) for b, b_now in zip(before, now))


def follow(seen: dict, sums: dict, params: Iterable[torch.nn.Parameter], *,
           refresh: bool = False) -> tuple[set, dict]:
    r"""``(stale, ratios)``: the ``params`` whose gradient was reset since :func:`note`, and ``p -> ratio`` for
    those rescaled since (see the module notes).

    Every gradient is compared by its norm and a few entries, whatever its version counter says
    (``.data`` writes, ``GradScaler.unscale_``, collectives and in-place ops on DTensors bump none):

    * set to None, or zeroed while its statistics :math:`\sum_i \|c_i\|` (``sums``) are positive
      (unless another gradient turned non-finite: ``clip_grad_norm_`` with an infinite total zeroes
      the others, and the optimizer's checks take that step), or replaced by another tensor that is
      not a multiple of it, or nonzero where it was zero: stale;
    * every compared entry and the norm moved by one ratio (also in a new tensor, ``p.grad = p.grad / k``):
      rescaled by that ratio;
    * changed otherwise (a gradient averaged by hand over ranks, ``clip_grad_value_``): not a
      rescaling, the statistics are left as they are.

    A sharded gradient (FSDP2 sets a new one at each backward) is never stale; a shard with no norm of
    its own takes the ratio the other rescaled gradients share. With ``refresh``, ``seen`` is updated
    to the gradients as they are now (call it when the ratios are applied to the statistics).

    Examples
    --------
    >>> import torch
    >>> w = torch.ones(2, requires_grad=True); (3 * w).sum().backward()
    >>> seen = note([w]); _ = w.grad.mul_(0.25); follow(seen, {w: torch.tensor(6.0)}, [w])
    (set(), {tensor([1., 1.], requires_grad=True): 0.25})
    """
    out, ratios, groups = set(), {}, {}
    for p in params:
        if p not in seen:
            continue
        ref, before, _, sharded = seen[p]
        t = distributed.local([p.grad])[0] if p.grad is not None else None
        if t is None or ref is None or before is None:
            if not sharded and (t is not None or ref is not None):
                out.add(p)  # set to None (or a gradient where there was none)
            continue
        if sharded and ref() is not t:
            continue  # a new sharded gradient (FSDP2's, each backward)
        groups.setdefault((t.device, t.dtype), []).append(p)
    unknown, refreshed = [], {}
    for (_, dtype), ps in groups.items():  # one read per device and dtype
        grads = [distributed.local([p.grad])[0].detach() for p in ps]
        now = _norms(grads)
        entries = _entries(grads)
        nows, befores = now.tolist(), torch.stack([seen[p][1] for p in ps]).tolist()
        overflowed = not all(math.isfinite(n) for n in nows)
        for p, n, b, e_now, n_t, g in zip(ps, nows, befores, entries, now.unbind(0), grads):
            ref, _, e_before, sharded = seen[p]
            replaced = ref() is not distributed.local([p.grad])[0]
            if not math.isfinite(n):
                continue  # a non-finite gradient: the optimizer's checks name it
            e_b, e_n = e_before.tolist(), e_now.tolist()
            if sharded and b == 0.0 and n == 0.0:
                unknown.append(p)  # an empty or zero shard: no ratio of its own
                continue
            if n == b and e_b == e_n and not replaced:
                continue  # as it was
            refreshed[p] = (weakref.ref(distributed.local([p.grad])[0]), n_t, e_now, sharded)
            if b == 0.0:
                if n == 0.0:
                    continue
                if sharded:
                    unknown.append(p)  # a zero shard: no ratio of its own
                else:
                    out.add(p)  # was zero, is not: not a rescaling
                continue
            if n == 0.0:
                if not sharded and not overflowed and float(sums[p]) > 0:
                    out.add(p)  # zeroed (in place or by a new tensor)
                continue
            r = n / b
            if _rescaled(e_b, e_n, r, dtype):
                ratios[p] = _snapped(r)
            elif replaced and not sharded:
                out.add(p)  # another gradient in its place
    shared = sorted(ratios.values())
    if unknown and shared and shared[-1] <= shared[0] * (1 + 1e-6):  # one rescaling for all (a clipping)
        for p in unknown:
            ratios[p] = shared[len(shared) // 2]
    if refresh:
        seen.update(refreshed)
    return out, ratios
