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


def note(params: Iterable[torch.nn.Parameter]) -> dict[torch.nn.Parameter, tuple[Any, int, Any, bool]]:
    """``p -> (weak reference to the gradient, its version counter, its norm, sharded)`` after a backward pass.

    For a ``DTensor`` gradient (FSDP2) the local shard is noted: its version counter is the one an
    in-place op bumps. The norms are taken in one multi-tensor call per device and dtype.

    Examples
    --------
    >>> import torch
    >>> w = torch.ones(2, requires_grad=True); (3 * w).sum().backward()
    >>> seen = note([w]); _ = w.grad.zero_(); follow(seen, {w: torch.tensor(6.0)}, [w])[0] == {w}
    True
    """
    out, groups = {}, {}
    for p in params:
        g = p.grad
        sharded = distributed.is_sharded([p])
        if g is None:
            out[p] = (None, 0, None, sharded)
            continue
        t = distributed.local([g])[0]
        out[p] = (weakref.ref(t), t._version, None, sharded)
        groups.setdefault((t.device, t.dtype), []).append(p)
    for ps in groups.values():
        norms = _norms([distributed.local([p.grad])[0].detach() for p in ps])
        for p, n in zip(ps, norms.unbind(0)):
            out[p] = (out[p][0], out[p][1], n, out[p][3])
    return out


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


def follow(seen: dict, sums: dict, params: Iterable[torch.nn.Parameter], *,
           refresh: bool = False) -> tuple[set, dict]:
    r"""``(stale, ratios)``: the ``params`` whose gradient was set to None, replaced or zeroed in place since
    :func:`note`, and ``p -> ratio`` of the norms of those rescaled in place since (see the module notes).

    ``sums`` maps a parameter to its recorded :math:`\sum_i \|c_i\|` (the sum in CLARS eq. 5's
    mean per-sample norm): a gradient :math:`\sum_i c_i` that is all zero while that sum is
    positive was zeroed (unless another gradient turned non-finite: ``clip_grad_norm_`` with an
    infinite total zeroes the others, and the optimizer's checks take that step); one that was zero
    and is not any more cannot be followed (stale). A sharded gradient (FSDP2 sets a new one at
    each backward) is never stale; its local shard's ratio is followed, or, for a shard that is all
    zero, the ratio the other rescaled gradients share; as in-place ops on DTensors bump no version
    counter (``clip_grad_norm_``'s), a shard's norm is compared at every call. With ``refresh``, ``seen`` is updated to the
    rescaled gradients (call it when the ratios are applied to the statistics).

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
        ref, version, _, sharded = seen[p]
        t = distributed.local([p.grad])[0] if p.grad is not None else None
        if t is None or ref is None or ref() is not t:
            if not sharded:
                out.add(p)
        elif t._version != version or sharded:  # (in-place ops on DTensors bump no version counter: compared)
            changed.setdefault((t.device, t.dtype), []).append(p)
    unknown = []
    for ps in changed.values():  # one read per device and dtype
        now = _norms([distributed.local([p.grad])[0].detach() for p in ps])
        nows, befores = now.tolist(), torch.stack([seen[p][2] for p in ps]).tolist()
        overflowed = not all(math.isfinite(n) for n in nows)
        for p, n, before, n_t in zip(ps, nows, befores, now.unbind(0)):
            sharded = seen[p][3]
            if not math.isfinite(n) or (sharded and n == before):
                continue  # a non-finite gradient (the optimizer's checks name it), or a shard as it was
            if before == 0.0:
                if sharded:
                    unknown.append(p)  # a zero shard: no ratio of its own
                elif n > 0.0:
                    out.add(p)  # was zero, is not: not a rescaling
                continue
            if n == 0.0 and not sharded and not overflowed and float(sums[p]) > 0:
                out.add(p)  # zeroed in place
                continue
            ratios[p] = _snapped(n / before)
            if refresh:
                seen[p] = (seen[p][0], distributed.local([p.grad])[0]._version, n_t, sharded)
    shared = set(ratios.values())
    if unknown and len(shared) == 1:  # one rescaling for all (a clipping, an unscaling): the zero shards' too
        for p in unknown:
            ratios[p] = next(iter(shared))
            if refresh:
                seen[p] = (seen[p][0], distributed.local([p.grad])[0]._version, seen[p][2], seen[p][3])
    return out, ratios
