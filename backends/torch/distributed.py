r"""Sharded parameters (``DTensor``): FSDP2 ``fully_shard`` and tensor parallelism.

A layer-wise optimizer needs the norm of every *whole* layer, while under FSDP2
or tensor parallelism each rank holds only a shard of it. Taking the norm of the
shard is the bug several peers shipped (DeepSpeed#490, ColossalAI#6431,
fairscale#696). Here the squared norm of layer :math:`k` is the sum of its
shards' partial sums,

.. math:: \|w_k\|^2 = \sum_{s \in \text{shards}(k)} \|w_{k,s}\|^2 ,

computed on each rank from its local shard and summed with **one**
``all_reduce`` per device mesh for all layers (and all norm kinds: weights,
gradients) of the step, never one per layer. A mesh dimension on which a layer
is replicated contributes once (the rank at coordinate 0 adds its part, the
others add zero), so a ``Replicate`` placement is not counted twice. A
``Partial`` placement (rare for parameters and gradients) is first
redistributed to ``Replicate``, which costs its own collective.

The optimizers of :mod:`lwrs.backends.torch.optim` use this when a group's
parameters are ``DTensor`` s: every implementation runs on the local shards
(:func:`local`), and :func:`lwrs.backends.torch.norms.squared_norms`, the one
place that reads tensors for norms, sums its per-layer sums of squares
(:math:`\|w\|^2`, :math:`\|g\|^2`, the state's, :math:`\|g+\lambda w\|^2`) over the
shards with :func:`sum_over_shards`: one collective per step for MNAG, LARS,
CLARS and TVLARS, two for LAMB (the norms before its moments, then its
direction's). The update is elementwise, so it needs no communication. The state
(momentum buffer, LAMB moments) is kept as ``DTensor`` s with the parameters'
placements, so ``torch.distributed.checkpoint`` can save it. ``fused=True``
falls back to the ``foreach`` path on ``DTensor`` s.

Examples
--------
Plain tensors are their own local shard, and their norms need no communication:

>>> import torch
>>> from lwrs.backends.torch.distributed import layer_norms
>>> w, g = [torch.ones(2, 2), torch.ones(3)], [torch.zeros(2, 2), torch.full((3,), 2.0)]
>>> [n.tolist() for n in layer_norms([w, g], torch.float64)]
[[2.0, 1.7320508075688772], [0.0, 3.4641016151377544]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["is_sharded", "local", "sum_over_shards", "layer_norms", "gather", "fsdp_modules",
           "fsdp_unsharded_to_sharded"]

try:
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # a torch built without torch.distributed
    DTensor = None


def _is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded(tensors: Sequence[Any]) -> bool:
    """Whether any tensor of ``tensors`` is a ``DTensor``.

    >>> import torch
    >>> is_sharded([torch.ones(2)])
    False
    """
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def local(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The local shard of every ``DTensor`` (sharing its storage, so in-place updates reach it); others as they are.

    >>> import torch
    >>> t = torch.ones(2)
    >>> local([t])[0] is t
    True
    """
    return [t._local_tensor if _is_dtensor(t) else t for t in tensors]


def _mesh_key(mesh: Any) -> tuple:
    return (mesh.device_type, tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape))


def _without_partial(t: torch.Tensor) -> torch.Tensor:
    if any(p.is_partial() for p in t.placements):
        return t.redistribute(placements=[Replicate() if p.is_partial() else p for p in t.placements])
    return t


def _all_reduce_over(mesh: Any, buf: torch.Tensor) -> None:
    """Sum ``buf`` over every rank of ``mesh``: one collective (one per mesh dimension for a sub-world N-D mesh)."""
    import torch.distributed as dist

    if mesh.ndim == 1:
        dist.all_reduce(buf, group=mesh.get_group(0))
    elif mesh.size() == dist.get_world_size():
        dist.all_reduce(buf)
    else:
        for dim in range(mesh.ndim):
            dist.all_reduce(buf, group=mesh.get_group(dim))


def sum_over_shards(parts: torch.Tensor, layouts: Sequence[Any]) -> torch.Tensor:
    r"""Sum each entry of ``parts`` (this rank's partial sum for the tensor ``layouts[k]``) over that tensor's
    distinct shards, in place, with one ``all_reduce`` per device mesh for all entries.

    .. math:: S_k = \sum_{s \in \text{shards}(k)} S_{k,s}

    A rank adds its part only where its mesh coordinate is 0 along every mesh dimension
    the tensor is not sharded on (``Replicate``), so a replicated part counts once.
    Entries whose layout is not a ``DTensor`` are left as they are (no communication).

    >>> import torch
    >>> sum_over_shards(torch.tensor([4.0, 9.0]), [torch.ones(2), torch.ones(3)])
    tensor([4., 9.])
    """
    meshes: dict[tuple, tuple[Any, list[int], list[float]]] = {}
    for k, layout in enumerate(layouts):
        if not _is_dtensor(layout):
            continue
        mesh = layout.device_mesh
        coordinate = mesh.get_coordinate()
        contributes = coordinate is not None and all(
            placement.is_shard() or c == 0 for placement, c in zip(layout.placements, coordinate))
        entry = meshes.setdefault(_mesh_key(mesh), (mesh, [], []))
        entry[1].append(k)
        entry[2].append(1.0 if contributes else 0.0)
    for mesh, index, keep in meshes.values():
        idx = torch.tensor(index, device=parts.device)
        buf = parts[idx] * torch.tensor(keep, dtype=parts.dtype, device=parts.device)
        _all_reduce_over(mesh, buf)
        parts[idx] = buf
    return parts


def layer_norms(tensor_lists: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype,
                like: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    r"""The norm of every whole tensor of every list, one 1-D tensor per list, with one collective per mesh.

    .. math:: \|t\| = \Big(\sum_{s} \|t_s\|^2\Big)^{1/2}

    over the distinct shards :math:`t_s` of :math:`t`. Each rank takes the squared
    norms of its local shards (accumulated in ``dtype``); a rank adds its part
    for a tensor only where its mesh coordinate is 0 along every dimension the
    tensor is not sharded on; then one ``all_reduce`` per device mesh sums the
    parts of every tensor of every list at once. Plain tensors need no reduction.

    ``like`` (optional, one tensor per position of each list) gives the placements
    when the lists hold local shards (plain tensors) of ``DTensor`` s, e.g. LAMB's
    update computed on local shards.

    Examples
    --------
    >>> import torch
    >>> layer_norms([[torch.tensor([3.0, 4.0])]], torch.float32)
    [tensor([5.])]
    """
    lists = [list(ts) for ts in tensor_lists]
    flat = [t for ts in lists for t in ts]
    layouts = flat if like is None else [t for _ in lists for t in like]
    if not flat:
        return [torch.zeros(0, dtype=dtype) for _ in lists]
    if like is None:
        flat = [_without_partial(t) if _is_dtensor(t) else t for t in flat]
        layouts = flat
    squares = sum_over_shards(torch.stack(torch._foreach_norm(local(flat), dtype=dtype)).square(), layouts)
    norms = squares.sqrt()
    out, start = [], 0
    for ts in lists:
        out.append(norms[start:start + len(ts)])
        start += len(ts)
    return out


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that FSDP2's ``fully_shard`` manages (empty without FSDP2).

    >>> import torch
    >>> fsdp_modules(torch.nn.Linear(2, 2))
    []
    """
    if DTensor is None:
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def fsdp_unsharded_to_sharded(modules: Sequence[torch.nn.Module]) -> dict[int, torch.nn.Parameter]:
    """``id(unsharded parameter) -> sharded parameter`` for the FSDP2 modules ``modules``.

    FSDP2 runs forward and backward with unsharded copies of the parameters (the
    module's attributes then point to them), while the optimizer holds the sharded
    ones. The pairing is read from FSDP2's parameter groups (private attributes of
    torch 2.x's ``fully_shard``); copies not yet created (before the first forward)
    are absent.
    """
    out: dict[int, torch.nn.Parameter] = {}
    for module in modules:
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = state._fsdp_param_group
            groups = [] if group is None else [group]
        for group in groups:
            for fsdp_param in group.fsdp_params:
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    out[id(unsharded)] = fsdp_param.sharded_param
    return out


def gather(t: Any) -> Any:
    """The full tensor of a ``DTensor`` (an all-gather), detached; anything else as it is.

    >>> import torch
    >>> gather(torch.ones(1))
    tensor([1.])
    """
    return t.full_tensor().detach() if _is_dtensor(t) else t
