r"""Exact per-sample gradient norms during the ordinary backward pass, for CLARS.

:class:`PerSampleNorms` attaches to a model and records, for every parameter
:math:`k`, the sums over samples :math:`i` of the norms of sample :math:`i`'s
contribution :math:`c_{ik}` to ``p.grad``, exactly as autograd accumulates it:

.. math:: S^{(1)}_k = \sum_i \|c_{ik}\|, \qquad S^{(2)}_k = \sum_i \|c_{ik}\|^2 .

For a mean-reduced loss over :math:`B` samples, :math:`c_{ik} = g_{ik}/B`, so
:math:`S^{(1)}_k = \frac1B\sum_i\|g_{ik}\|` is the CLARS denominator (eq. 5) in
the units of ``p.grad``. The ratio :math:`\|\texttt{p.grad}\| / S^{(1)}_k` does
not depend on the loss reduction or on an accumulation divisor. Statistics add
over backward passes, so gradient accumulation over micro-batches gives the
statistics of the accumulated batch; :meth:`PerSampleNorms.reset` clears them
(``CLARS.zero_grad`` calls it).

By default (``fused=True``) convolutions and Linear layers on long sequences
build their per-sample gradients inside their own backward and return their sum
as the weight gradient (:mod:`lwrs.backends.torch.per_sample_fused`), so the
norms cost no second weight-gradient computation. The hooks below measure every
other layer, and all layers with ``fused=False``, without materialising
per-sample gradients where avoidable (:math:`a_{it}` the layer input,
:math:`\delta_{it}` the gradient of its output, :math:`t` over tokens or output
positions):

* ``Linear``: :math:`\|c_i\|^2 = \|a_i\|^2\|\delta_i\|^2` for one row per sample
  (:math:`\|a_i\|^2` taken in the forward pass, while the input is in cache);
  for sequences either the ghost form
  :math:`\langle a_i a_i^\top, \delta_i\delta_i^\top\rangle` (cost :math:`T^2(p+d)`)
  or the built :math:`\delta_i^\top a_i` (cost :math:`Tpd`), whichever is cheaper
  (ghost when :math:`2T^2 \le pd`).
* ``Conv1d`` / ``Conv2d`` (zero padding, any ``groups``): the samples' weight
  gradients from grouped weight-gradient calls, with a chunk of samples folded
  into the groups, at the FLOP cost of the ordinary weight gradient.
* ``Embedding``: :math:`\sum_{t,s}[\mathrm{id}_t = \mathrm{id}_s]\,\delta_t\cdot\delta_s`.
* ``LayerNorm`` / ``GroupNorm`` affine parameters and all biases: built, they are small.

The hooks are a forward hook that keeps the layer input and a tensor hook on
the layer output, so in-place activations after a layer are fine. Calls made
under ``torch.func`` transforms (``vmap``, ``grad``) are ignored.

BatchNorm in training mode makes every sample's loss depend on the whole batch,
so per-sample gradients are not defined for the layers before it. The layers
upstream of a training-mode BatchNorm are those whose forward ran before the BN's
in the same pass. Policy (``batch_norm=``): ``"warn"`` (default) names them in a
warning (once) and measures anyway, giving a per-sample split of the batch
gradient rather than true per-sample gradients; ``"strict"`` raises, naming them.
Layers after the BN are exact and get neither. BatchNorm's own parameters are
reported with :math:`S^{(1)} = \|\texttt{p.grad}\|` (CLARS factor 1, i.e. LARS);
they are 1-D and excluded from adaptation by default anyway.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from . import distributed, per_sample_fused

__all__ = ["PerSampleNorms", "UnsupportedModuleError", "minibatch_norm_statistics"]

_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


class UnsupportedModuleError(TypeError):
    """A parameter belongs to a module whose per-sample norms lwrs cannot compute."""


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared norm of every sample's slice, accumulated in float32 at least, in one pass without temporaries."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1, dtype=dtype).square()


def _linear_weight_sq(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norm of sum_t d_t a_t^T, for a (B, T, p) and d (B, T, d), T > 1."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, d = a.to(dtype), d.to(dtype)
    T, p, q = a.shape[1], a.shape[2], d.shape[2]
    if 2 * T * T <= p * q:  # ghost norm: <a a^T, d d^T>
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(d, d.transpose(1, 2))).sum(dim=(1, 2))
    return torch.bmm(d.transpose(1, 2), a).pow(2).sum(dim=(1, 2))


def _as_sequence(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., f) -> (B, T, f)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _linear_rows(module: torch.nn.Linear, a_sq: torch.Tensor, d: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """One row per sample: ``||c_i||^2 = ||a_i||^2 ||d_i||^2`` for the weight and ``||d_i||^2`` for the bias."""
    d_sq = _sq_norms(d)
    out = {module.weight: a_sq * d_sq}
    if module.bias is not None:
        out[module.bias] = d_sq
    return out


def _linear(module: torch.nn.Linear, x: torch.Tensor, d: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    a, dd = _as_sequence(x), _as_sequence(d)
    if a.shape[1] == 1:
        return _linear_rows(module, _sq_norms(a), dd)
    out = {module.weight: _linear_weight_sq(a, dd)}
    if module.bias is not None:
        out[module.bias] = _sq_norms(dd.sum(dim=1))
    return out


def _conv(module: torch.nn.Module, x: torch.Tensor, d: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample weight gradients of a convolution from grouped weight-gradient calls.

    Folding a chunk of samples into the channels, ``(1, c*C, ...)`` against ``(1, c*O, ...)``
    with ``groups = c * module.groups``, gives those samples' weight gradients at the FLOP
    cost of their share of the ordinary weight gradient. Chunks bound the memory
    (see ``per_sample_fused._CHUNK_ELEMENTS``).
    """
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise UnsupportedModuleError(f"{module}: per-sample norms need padding_mode='zeros' and numeric padding")
    batch, out_ch = x.shape[0], module.out_channels
    out = {module.weight: per_sample_fused.conv_sq_norms(module, x, d)}
    if module.bias is not None:
        out[module.bias] = _sq_norms(d.reshape(batch, out_ch, -1).sum(dim=2))
    return out


def _embedding(module: torch.nn.Embedding, ids: torch.Tensor, d: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        raise UnsupportedModuleError(f"{module}: per-sample norms need max_norm=None, "
                                     "scale_grad_by_freq=False and dense gradients")
    ids = ids.reshape(ids.shape[0], -1)
    dd = _as_sequence(d)
    dtype = torch.float64 if dd.dtype == torch.float64 else torch.float32
    dd = dd.to(dtype)
    same = ids[:, :, None] == ids[:, None, :]
    if module.padding_idx is not None:
        keep = ids != module.padding_idx
        same = same & keep[:, :, None] & keep[:, None, :]
    return {module.weight: (torch.bmm(dd, dd.transpose(1, 2)) * same).sum(dim=(1, 2))}


def _layer_norm(module: torch.nn.LayerNorm, x: torch.Tensor, d: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    if not module.elementwise_affine:
        return {}
    xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    n = len(module.normalized_shape)
    reduce = tuple(range(1, x.ndim - n))
    out = {module.weight: _sq_norms((d * xhat).sum(dim=reduce) if reduce else d * xhat)}
    if module.bias is not None:
        out[module.bias] = _sq_norms(d.sum(dim=reduce) if reduce else d)
    return out


def _group_norm(module: torch.nn.GroupNorm, x: torch.Tensor, d: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    if not module.affine:
        return {}
    xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
    reduce = tuple(range(2, x.ndim))
    return {
        module.weight: _sq_norms((d * xhat).sum(dim=reduce) if reduce else d * xhat),
        module.bias: _sq_norms(d.sum(dim=reduce) if reduce else d),
    }


_HANDLERS = {
    torch.nn.Linear: _linear,
    torch.nn.Conv1d: _conv,
    torch.nn.Conv2d: _conv,
    torch.nn.Embedding: _embedding,
    torch.nn.LayerNorm: _layer_norm,
    torch.nn.GroupNorm: _group_norm,
}


def _handler(module: torch.nn.Module):
    return _HANDLERS.get(per_sample_fused.module_class(module))  # FSDP2-wrapped modules by their own class


def _refuse_tensor_parallel(module: torch.nn.Module, sharded: bool = False) -> None:
    """Tensor-parallel layers compute with DTensor weights (FSDP2 gives the forward whole, plain weights)."""
    if sharded or distributed.is_sharded(list(module.parameters(recurse=False))):
        raise NotImplementedError(
            f"per-sample norms of tensor-parallel layers are not supported ({type(module).__name__} computes with "
            "DTensor weights); pass the statistics with step(norm_stats=...) or use FSDP2/DDP"
        )


class PerSampleNorms:
    r"""Record exact per-sample gradient-norm statistics of a model during ``backward``.

    Parameters
    ----------
    model : torch.nn.Module
        Every trainable parameter must belong directly to a supported module
        (Linear, Conv1d, Conv2d, Embedding, LayerNorm, GroupNorm) or to a
        BatchNorm; otherwise :class:`UnsupportedModuleError` names it.
    batch_norm : {"warn", "strict"}
        What a BatchNorm in training mode does (see the module notes).
    all_reduce : bool or None
        Sum the statistics over data-parallel ranks in :meth:`norm_statistics`
        with one ``all_reduce`` of ``[S1; S2]``, then divide :math:`S^{(1)}` by
        the world size :math:`W` and :math:`S^{(2)}` by :math:`W^2`, matching
        DistributedDataParallel's averaging of the gradients (equal local batch
        sizes assumed). ``None``: whenever ``torch.distributed`` is initialised
        with more than one rank.
    subsample : int or None
        The paper's cheap estimator, for comparison: count only the first
        ``subsample`` samples :math:`J` of each backward pass, scaled by
        :math:`B/|J|` (CLARS, "Comparison with Related Methods", :math:`|J| = 512`).
        ``None`` (default) is exact.
    fused : bool
        Let the per-sample gradients of convolutions and of Linear layers on
        long sequences *be* the weight gradient (:mod:`lwrs.backends.torch.per_sample_fused`):
        their forward is routed through a custom autograd function whose
        backward builds every sample's weight gradient once, records its norm
        and returns the sum, so autograd's own weight-gradient call is not
        made. :meth:`remove` restores the modules. Default ``True``, the
        faster mode in ``benchmarks/clars_step.py``; ``False`` measures with
        hooks only and leaves the modules' forward untouched (the weight
        gradients are then autograd's own, bit for bit).

    Examples
    --------
    >>> import torch
    >>> from lwrs.backends.torch import CLARS, PerSampleNorms
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 2))
    >>> norms = PerSampleNorms(model)
    >>> opt = CLARS(model.parameters(), lr=1.0, norm_source=norms)
    >>> x, y = torch.randn(16, 4), torch.randn(16, 2)
    >>> opt.zero_grad(); torch.nn.functional.mse_loss(model(x), y).backward(); opt.step()
    >>> bool(((opt.diagnostics[0].clars_factors > 0) & (opt.diagnostics[0].clars_factors <= 1 + 1e-6)).all())
    True
    """

    def __init__(self, model: torch.nn.Module, *, batch_norm: str = "warn", all_reduce: bool | None = None,
                 subsample: int | None = None, fused: bool = True):
        if batch_norm not in ("warn", "strict"):
            raise ValueError(f'batch_norm must be "warn" or "strict", got {batch_norm!r}')
        if subsample is not None and (isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1):
            raise ValueError(f"subsample must be a positive int or None, got {subsample!r}")
        self.subsample = subsample
        self.batch_norm = batch_norm
        self.all_reduce = all_reduce
        self._handles: list[Any] = []
        self._fused_modules: list[torch.nn.Module] = []
        self._workspace: dict = {}  # the fused layers' shared chunk buffer
        # statistics are kept per (module, parameter name): FSDP2 swaps a module's parameter objects
        # (sharded DTensor <-> unsharded tensor) around forward and backward
        self._modules: list[torch.nn.Module] = []
        self._owner: dict[tuple[int, str], str] = {}
        self._bn_params: set[tuple[int, str]] = set()
        self._names: dict[int, str] = {}
        self._warned: set[tuple[str, ...]] = set()
        unsupported = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            own_keys = [(id(module), n) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if isinstance(module, _BATCH_NORMS):
                self._modules.append(module)
                self._bn_params.update(own_keys)
                self._names[id(module)] = name or type(module).__name__
                self._handles.append(module.register_forward_pre_hook(self._batch_norm_hook))
                continue
            if _handler(module) is not None:
                self._names[id(module)] = name or type(module).__name__
                if fused and per_sample_fused.fusable(module) and "forward" not in module.__dict__:
                    self._install_fused(module)  # (a module another recorder already fused gets hooks here)
                else:
                    self._handles.append(module.register_forward_hook(self._forward_hook))
                self._modules.append(module)
                for key in own_keys:
                    self._owner[key] = name or type(module).__name__
            elif own:
                unsupported.append(f"{name or '<root>'} ({type(module).__name__})")
        if unsupported:
            self.remove()
            raise UnsupportedModuleError(
                "per-sample norms are not available for the parameters of: " + ", ".join(unsupported)
                + "; supported: Linear, Conv1d, Conv2d, Embedding, LayerNorm, GroupNorm (and BatchNorm by policy)"
            )
        self.reset()

    def reset(self) -> None:
        """Forget the statistics (call it when the gradients are zeroed)."""
        self._s1: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._s2: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._pending: dict[int, int] = {}

    def remove(self) -> None:
        """Detach the hooks from the model (and give fused modules their own forward back)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for module in self._fused_modules:
            per_sample_fused.uninstall(module)
        self._fused_modules = []
        self._workspace.clear()

    def _install_fused(self, module: torch.nn.Module) -> None:
        key = id(module)

        def start() -> None:
            _refuse_tensor_parallel(module)
            if self._pending.get(key, 0):
                raise RuntimeError(
                    f"{module} was called twice before backward: per-sample norms of a shared layer are not supported"
                )
            self._pending[key] = 1

        def done() -> None:
            self._pending[key] = 0

        def record(p: torch.nn.Parameter, sq: torch.Tensor) -> None:
            if p.requires_grad:
                self._add(self._key(module, p), sq)

        per_sample_fused.install(module, record, start, done,
                                 lambda inputs, output: self._forward_hook(module, inputs, output), self._workspace)
        self._fused_modules.append(module)

    # ---- hooks ---------------------------------------------------------------------------------

    def _batch_norm_hook(self, module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        """Before a BatchNorm's forward: the measured layers that already ran in this pass are upstream of it."""
        if not (module.training and torch.is_grad_enabled()) or torch._C._are_functorch_transforms_active():
            return
        upstream = tuple(sorted(self._names[k] for k, pending in self._pending.items() if pending))
        if not upstream:
            return
        bn = f"{self._names[id(module)]} ({type(module).__name__})"
        if self.batch_norm == "strict":
            raise RuntimeError(
                f"{bn} is in training mode: per-sample gradients are not defined for the layers before it: "
                f"{', '.join(upstream)} (batch_norm='strict'); use eval mode, GroupNorm/LayerNorm, or batch_norm='warn'"
            )
        if upstream not in self._warned:
            warnings.warn(
                f"{bn} is in training mode: the per-sample norms of {', '.join(upstream)} are a per-sample split "
                "of the batch gradient, not true per-sample gradients", RuntimeWarning, stacklevel=3,
            )
            self._warned.add(upstream)

    def _forward_hook(self, module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        if torch._C._are_functorch_transforms_active():  # torch.func calls (vmap, grad) are not a backward pass
            return
        if self._pending.get(id(module), 0):
            raise RuntimeError(
                f"{module} was called twice before backward: per-sample norms of a shared layer are not supported"
            )
        if distributed.is_sharded([inputs[0], output]):  # (FSDP2 has resharded the weights by now: look at the data)
            _refuse_tensor_parallel(module, sharded=True)
        self._pending[id(module)] = 1
        x = inputs[0].detach()
        handler = _handler(module)
        if handler is _linear and x.ndim == 2:
            # one row per sample: take ||a_i||^2 now, while the input is still in cache, and keep no reference to it
            x, handler = _sq_norms(x), _linear_rows

        def on_grad(grad_output: torch.Tensor) -> None:
            self._pending[id(module)] = 0
            for p, sq in handler(module, x, grad_output.detach()).items():
                if p.requires_grad:
                    self._add(self._key(module, p), sq)

        output.register_hook(on_grad)

    @staticmethod
    def _key(module: torch.nn.Module, p: torch.nn.Parameter) -> tuple[int, str]:
        return next(((id(module), n) for n, q in module._parameters.items() if q is p), (id(module), str(id(p))))

    def _add(self, p: tuple[int, str], sq: torch.Tensor) -> None:
        norms_sq = sq.clamp_min(0)
        scale = 1.0
        if self.subsample is not None and self.subsample < sq.shape[0]:
            scale = sq.shape[0] / self.subsample  # |B|/|J|: the subsample's sums estimate the batch's
            norms_sq = norms_sq[: self.subsample]
        s1, s2 = scale * norms_sq.sqrt().sum(), scale * norms_sq.sum()
        if p in self._s1:
            self._s1[p] = self._s1[p] + s1
            self._s2[p] = self._s2[p] + s2
        else:
            self._s1[p], self._s2[p] = s1, s2

    # ---- results -------------------------------------------------------------------------------

    def sums(self, params: Iterable[torch.nn.Parameter], *, scale: float = 1.0) -> dict[torch.nn.Parameter, tuple]:
        r"""``param -> (S1, S2)`` in the units of ``p.grad``, divided by ``scale`` and ``scale**2``.

        ``scale`` is a loss scale still inside the gradients (e.g. a
        GradScaler's before ``unscale_``); the default 1 means none.
        """
        return self._sums(params, scale, {k: (self._s1[k], self._s2[k]) for k in self._s1})

    def _sums(self, params, scale, recorded) -> dict[torch.nn.Parameter, tuple]:
        out = {}
        keys = {id(q): (id(m), n) for m in self._modules for n, q in m._parameters.items() if q is not None}
        for p in params:
            key = keys.get(id(p))
            if key in recorded:
                out[p] = (recorded[key][0] / scale, recorded[key][1] / scale**2)
            elif key in self._bn_params and p.grad is not None:
                g = distributed.gather(p.grad.detach())  # the whole layer's gradient under FSDP2
                g = g.double() if g.dtype == torch.float64 else g.float()
                n = torch.linalg.vector_norm(g)
                out[p] = (n, n * n)
            elif key in self._owner:
                raise RuntimeError(f"no per-sample statistics for a parameter of {self._owner[key]}: "
                                   "was backward run since the last reset?")
            else:
                raise UnsupportedModuleError("a parameter passed to the optimizer is not part of the recorded model")
        return out

    def norm_statistics(self, params: Iterable[torch.nn.Parameter], *, scale: float = 1.0):
        """The statistics of ``params``, in order, as a :class:`lwrs.NormStatistics` in ``p.grad`` units.

        ``mean_norms()`` is :math:`S^{(1)}_k`, the CLARS denominator (``count`` is 1).
        """
        from lwrs.statistics import NormStatistics

        params = list(params)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        recorded = {k: (self._s1[k], self._s2[k]) for k in self._s1}
        if self._distributed() and recorded:
            # one collective per step over every recorded layer, in the model's order, so that every rank makes
            # the same call even when each steps its own subset of the parameters (ZeroRedundancyOptimizer)
            world = torch.distributed.get_world_size()
            keys = [k for k in self._owner if k in recorded]
            both = torch.stack([recorded[k][0].to(dtype) for k in keys] + [recorded[k][1].to(dtype) for k in keys])
            torch.distributed.all_reduce(both)
            recorded = {k: (both[i] / world, both[len(keys) + i] / world**2) for i, k in enumerate(keys)}
        sums = self._sums(params, scale, recorded)
        s1 = torch.stack([sums[p][0].to(dtype) for p in params])
        s2 = torch.stack([sums[p][1].to(dtype) for p in params])
        return NormStatistics(s1, s2, 1)

    def _distributed(self) -> bool:
        dist = torch.distributed
        ready = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.all_reduce is None:
            return ready
        if self.all_reduce and not ready:
            raise RuntimeError("all_reduce=True needs an initialised torch.distributed process group")
        return bool(self.all_reduce)


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
    from lwrs.statistics import NormStatistics

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
