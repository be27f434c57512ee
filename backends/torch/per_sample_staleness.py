"""Whether recorded per-sample statistics still describe ``p.grad``, for :class:`PerSampleNorms`.

The statistics of a parameter add up over backward passes, as autograd adds into
``p.grad``. They are stale when ``p.grad`` was reset after the last backward:
set to ``None`` or replaced (``model.zero_grad()``), or zeroed in place
(``model.zero_grad(set_to_none=False)``, ``p.grad.zero_()``). After the last
backward, :func:`note` keeps a weak reference to each gradient and its version
counter; :func:`stale` compares. A gradient changed in place since then was
zeroed, or unscaled or clipped (``GradScaler.unscale_``, ``clip_grad_norm_``):
it is read, once per device, and counts as zeroed when it is all zero while its
statistics are not (every sample's contribution would be zero with it).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["grad_state", "unchanged", "note", "stale"]


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


def note(params: Iterable[torch.nn.Parameter]) -> dict[torch.nn.Parameter, tuple[Any, int]]:
    """``p -> (weak reference to p.grad or None, its version counter)`` after a backward pass.

    Examples
    --------
    >>> import torch
    >>> w = torch.ones(2, requires_grad=True); (3 * w).sum().backward()
    >>> seen = note([w]); _ = w.grad.zero_(); stale(seen, {w: torch.tensor(6.0)}, [w]) == {w}
    True
    """
    return {p: grad_state(p) for p in params}


def stale(seen: dict, sums: dict, params: Iterable[torch.nn.Parameter]) -> set[torch.nn.Parameter]:
    r"""The ``params`` whose gradient was set to None, replaced or zeroed in place since :func:`note`.

    ``sums`` maps a parameter to its recorded :math:`\sum_i \|c_i\|` (the sum in CLARS eq. 5's
    mean per-sample norm): a gradient :math:`\sum_i c_i` that is all zero while that sum is
    positive was zeroed.

    Examples
    --------
    >>> import torch
    >>> w = torch.ones(2, requires_grad=True); (3 * w).sum().backward()
    >>> seen = note([w]); _ = w.grad.mul_(0.5); stale(seen, {w: torch.tensor(6.0)}, [w])
    set()
    """
    out, changed = set(), {}
    for p in params:
        if p not in seen:
            continue
        (ref, version), grad = seen[p], p.grad
        if grad is None or ref is None or ref() is not grad:
            out.add(p)
        elif grad._version != version:
            changed.setdefault(grad.device, []).append(p)
    for ps in changed.values():  # one read per device
        zeroed = torch.stack([(torch.linalg.vector_norm(p.grad.detach()) == 0) & (sums[p] > 0) for p in ps])
        out.update(p for p, z in zip(ps, zeroed.tolist()) if z)
    return out
