r"""Exact per-sample gradient norms during the ordinary backward pass, for CLARS.

:class:`PerSampleNorms` attaches to a model and records, for every parameter
:math:`k`, the sums over samples :math:`i` of the norms of sample :math:`i`'s
contribution :math:`c_{ik}` to ``p.grad``, exactly as autograd accumulates it:

.. math:: \sum_i \|c_{ik}\|, \qquad \sum_i \|c_{ik}\|^2 .

For a mean-reduced loss over :math:`N` samples, :math:`c_{ik} = g_{ik}/N`, so
:math:`\sum_i \|c_{ik}\| = \frac1N\sum_i\|g_{ik}\|` is the CLARS denominator
(eq. 5) in the units of ``p.grad``. :meth:`PerSampleNorms.norm_statistics`
returns them in the core's convention, :math:`S^{(1)}_k = \sum_i\|g_{ik}\|`,
:math:`S^{(2)}_k = \sum_i\|g_{ik}\|^2` and ``count`` :math:`= N` with
:math:`g_{ik} = N c_{ik}`, so that ``mean_norms()`` is that denominator. The ratio
:math:`\|\texttt{p.grad}\| / \sum_i \|c_{ik}\|` does
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
* ``MultiheadAttention`` (and so ``TransformerEncoderLayer`` / ``DecoderLayer``):
  its forward is run through :mod:`lwrs.backends.torch.per_sample_attention`,
  whose projections are recorded as Linear layers.

Subclasses of these modules count when they keep the parent's forward.

**Shared parameters.** The per-sample gradient of a parameter used more than
once in a pass (tied input and output embeddings, a layer called twice) is the
sum of its uses' contributions, and its norm has cross terms. When a parameter
has more than one live use, the contributions are built and summed at the end
of the backward pass (costing a ``(B, *p.shape)`` tensor per use), so the
norms stay exact. A forward pass whose graph is dropped without backward (a
logging forward) does not count; under ``torch.no_grad()`` it costs nothing.
Non-reentrant activation checkpointing (``use_reentrant=False``) is supported: the
recomputation in backward is not recorded. (Layers measured by hooks keep their
input until their backward, so for them checkpointing saves no memory; the fused
layers' inputs are recomputed like the others.)

**The sample axis** is dim ``batch_dim`` (0, or 1 for sequence-first inputs
``(T, B, ...)``) of every recorded layer's input. The batch size is read from the
model's first tensor input, and a layer whose input has another size along that
axis (e.g. ``x.reshape(B * T, F)``) is refused with an error naming it.

**Statistics follow** ``p.grad``: when a parameter's gradient was set to ``None``,
replaced or zeroed in place since the last backward (``model.zero_grad()``, with or
without ``set_to_none``, ``p.grad.zero_()``), its statistics are reset at the next
backward, and :meth:`PerSampleNorms.sums` refuses stale ones
(:mod:`lwrs.backends.torch.per_sample_staleness`).
**Copies** of the model (``copy.deepcopy``, ``AveragedModel``, pickling) are plain
models that nothing records; attach a new recorder to a copy to record it.

The hooks are a forward hook that keeps the layer input and a tensor hook on
the layer output, so in-place activations after a layer are fine. Calls made
under ``torch.func`` transforms (``vmap``, ``grad``) are ignored. Configurations
whose norms cannot be exact (``padding_mode='reflect'``, ``padding='same'``,
``Embedding(max_norm=...)``, unsupported modules) are refused at construction.

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
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from . import distributed, per_sample_attention, per_sample_fused, per_sample_layers, per_sample_staleness
from .per_sample_layers import linear_pieces, overlap as _overlap, sq_norms
from .per_sample_minibatch import minibatch_norm_statistics

__all__ = ["PerSampleNorms", "UnsupportedModuleError", "minibatch_norm_statistics"]

_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)
_SAMPLES_FIRST_ONLY = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.GroupNorm) + _BATCH_NORMS
_SUPPORTED = "Linear, Conv1d, Conv2d, Embedding, LayerNorm, GroupNorm, MultiheadAttention (and BatchNorm by policy)"


class UnsupportedModuleError(TypeError):
    """A parameter belongs to a module whose per-sample norms lwrs cannot compute."""


def _graph_task() -> int:
    """The running backward pass (-1 outside backward)."""
    return torch._C._current_graph_task_id()


_recording = per_sample_fused.recording


def _unchanged(p: torch.nn.Parameter, before: tuple[Any, int]) -> bool:
    """Whether ``p.grad`` is still what it was before a backward pass (so the pass did not accumulate into it);
    a sharded parameter's gradient is set by FSDP2 after the pass, so it counts as changed."""
    return not distributed.is_sharded([p]) and per_sample_staleness.unchanged(p, before)


def _refuse_tensor_parallel(module: torch.nn.Module, tensors: list) -> None:
    """Tensor-parallel layers compute with DTensors (FSDP2 gives the forward whole, plain weights): their
    per-sample norms would be a shard's."""
    if distributed.is_sharded(tensors):
        raise NotImplementedError(
            f"per-sample norms of tensor-parallel layers are not supported ({type(module).__name__} computes with "
            "DTensors); pass the statistics with step(norm_stats=...), or use FSDP2 or DistributedDataParallel")


class _Call:
    """One recorded use of parameters (a layer's forward), alive as long as its graph; consumed by its backward.

    ``roles`` maps a role (``"weight"``, ``"bias"`` or the parameter itself) to ``(parameter, rows)``, rows a
    ``(start, stop)`` range of dim 0 or None for the whole parameter. Calls made outside backward are counted
    as uses; those made during backward (checkpoint recomputation) are not.
    """

    __slots__ = ("norms", "name", "roles", "counted", "consumed", "__weakref__")

    def __init__(self, norms: "PerSampleNorms", name: str, roles: dict):
        if norms._fsdp:  # FSDP2 computes with unsharded copies: record under the sharded parameters
            c = norms._canonical
            roles = {c(r) if isinstance(r, torch.Tensor) else r: (c(p), rows) for r, (p, rows) in roles.items()}
        # only the model's own parameters: tensors substituted for them (torch.func.functional_call) get their
        # gradients elsewhere than p.grad, so nothing is recorded for them (nor kept alive here)
        roles = {r: (p, rows) for r, (p, rows) in roles.items() if p in norms._owner}
        self.norms, self.name, self.roles = norms, name, roles
        self.counted, self.consumed = _graph_task() == -1, False
        for p, _ in roles.values():
            norms._live.setdefault(p, weakref.WeakSet()).add(self)

    # what per_sample_fused and the hooks call in backward
    def enter(self) -> None:
        self.norms._enter(self)

    def want(self, role: Any) -> bool:
        role = self.norms._canonical(role) if self.norms._fsdp and isinstance(role, torch.Tensor) else role
        return role in self.roles and self.norms._want(self, *self.roles[role])

    def record(self, role: Any, tensor: torch.Tensor, built: bool) -> None:
        role = self.norms._canonical(role) if self.norms._fsdp and isinstance(role, torch.Tensor) else role
        if role in self.roles:
            p, rows = self.roles[role]
            task = _graph_task()
            before = self.norms._grads_before.setdefault(task, {})
            if p not in before:  # p.grad before this pass accumulates into it (autograd does so after every use)
                before[p] = per_sample_staleness.grad_state(p)
            self.norms._tasks[task].setdefault(p, []).append((rows, tensor, built, self.name))


class PerSampleNorms:
    r"""Record exact per-sample gradient-norm statistics of a model during ``backward``.

    Parameters
    ----------
    model : torch.nn.Module
        Every trainable parameter must belong directly to a supported module
        (Linear, Conv1d, Conv2d, Embedding, LayerNorm, GroupNorm,
        MultiheadAttention, or a subclass keeping its forward) or to a
        BatchNorm; otherwise :class:`UnsupportedModuleError` names it, as it
        names configurations whose norms cannot be exact.
    batch_norm : {"warn", "strict"}
        What a BatchNorm in training mode does (see the module notes).
    all_reduce : bool or None
        Sum the statistics over data-parallel ranks in :meth:`norm_statistics`
        with one ``all_reduce``, matching DistributedDataParallel's averaging
        of the gradients (equal local batch sizes assumed). ``None``: whenever
        ``torch.distributed`` is initialised with more than one rank.
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
        hooks only (the weight gradients are then autograd's own, bit for bit).
    batch_dim : {0, 1}
        The sample axis of the model's input and of every recorded layer's
        input: 1 for sequence-first inputs ``(T, B, ...)`` (Linear, Embedding,
        LayerNorm only). ``MultiheadAttention`` follows its own ``batch_first``.

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
                 subsample: int | None = None, fused: bool = True, batch_dim: int = 0):
        if batch_norm not in ("warn", "strict"):
            raise ValueError(f'batch_norm must be "warn" or "strict", got {batch_norm!r}')
        if subsample is not None and (isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1):
            raise ValueError(f"subsample must be a positive int or None, got {subsample!r}")
        if batch_dim not in (0, 1) or isinstance(batch_dim, bool):
            raise ValueError(f"batch_dim must be 0 or 1, got {batch_dim!r}")
        self.subsample, self.batch_norm, self.all_reduce, self.batch_dim = subsample, batch_norm, all_reduce, batch_dim
        self.fused = fused
        self._handles: list[Any] = []
        # the modules given their own forward, held weakly: the recorder is reachable from their forwards, and
        # holding them would make the model a reference cycle (freed only by a garbage collection)
        self._fused_modules: list[weakref.ref] = []
        self._attention_modules: list[tuple[weakref.ref, Any]] = []
        self._workspace: dict = {}  # the fused layers' shared chunk buffer
        self._owner: dict[torch.nn.Parameter, str] = {}
        self._unrecorded: dict[torch.nn.Parameter, str] = {}  # frozen parameters of modules it cannot measure
        self._bn_params: set[torch.nn.Parameter] = set()
        self._names: dict[int, str] = {}
        self._warned: set[tuple[str, ...]] = set()
        self._live: dict[torch.nn.Parameter, weakref.WeakSet] = {}  # parameter -> its recorded uses
        self._tasks: dict[int, dict] = {}  # backward pass -> parameter -> [(rows, tensor, built, name)]
        self._batch: int | None = None  # the model input's batch size, during its forward
        # FSDP2: unsharded parameter -> sharded (see _canonical); weakly, as the modules above
        self._fsdp = [weakref.ref(m) for m in distributed.fsdp_modules(model)]
        self._unsharded: dict[int, torch.nn.Parameter] = {}
        for module in model.modules():  # a copy of a recorded model: make it plain again
            per_sample_fused.drop_copied(module)
            _drop_copied_hooks(module)
        inside_attention = {id(m.out_proj) for m in model.modules() if per_sample_attention.supported(m)}
        refused = []
        for name, module in model.named_modules():
            label = name or type(module).__name__
            where = f"{name or '<root>'} ({type(module).__name__})"
            # every parameter, frozen or not: a frozen layer unfrozen later (gradual unfreezing) is then recorded
            every = list(module.parameters(recurse=False))
            own = [p for p in every if p.requires_grad]
            if isinstance(module, _BATCH_NORMS):
                self._bn_params.update(every)
                self._names[id(module)] = label
                self._handles.append(module.register_forward_pre_hook(self._batch_norm_hook))
                continue
            if id(module) in inside_attention:  # the out-projection: recorded by its attention module
                self._owner.update((p, label) for p in every)
                continue
            supported = per_sample_attention.supported(module) or per_sample_layers.handler(module) is not None
            reason = (per_sample_attention.refusal(module) if per_sample_attention.supported(module)
                      else per_sample_layers.refusal(module))
            if supported and batch_dim != 0 and isinstance(module, _SAMPLES_FIRST_ONLY):
                reason = "batch_dim=1 (its samples are along dim 0)"
            extra = per_sample_layers.uncovered(module)  # a subclass's parameters of its own
            frozen_extra = [n for n in extra if not getattr(module, n).requires_grad]
            if supported and not reason and len(frozen_extra) < len(extra):
                reason = f"its parameter {[n for n in extra if n not in frozen_extra][0]!r} is not one its " \
                         "per-sample norms cover"
            if not supported and own:
                refused.append(where)
            elif supported and reason:
                refused.append(f"{name or '<root>'} ({type(module).__name__}: {reason})")
            if not supported or reason:
                self._unrecorded.update((p, where) for p in every)
                continue
            self._names[id(module)] = label
            self._owner.update((p, label) for p in every if p not in {getattr(module, n) for n in extra})
            self._unrecorded.update((getattr(module, n), where) for n in extra)
            if per_sample_attention.supported(module):
                linear = self._attention_linear(label)
                per_sample_attention.install(module, linear, self._begin_attention(label))
                self._attention_modules.append((weakref.ref(module), linear))
            elif fused and batch_dim == 0 and per_sample_fused.fusable(module) and "forward" not in module.__dict__:
                per_sample_fused.install(module, self._begin_fused(label), self._forward_hook, self._workspace)
                self._fused_modules.append(weakref.ref(module))  # (a module another recorder already fused gets hooks)
            else:
                self._handles.append(module.register_forward_hook(self._forward_hook))
        if refused:
            self.remove()
            raise UnsupportedModuleError(
                "per-sample norms are not available for the parameters of: " + ", ".join(refused)
                + f"; supported: {_SUPPORTED}")
        self._handles.append(model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._root_hook))
        self.reset()

    _copy = False  # a copy (copy.deepcopy, pickle) records nothing: see __reduce__

    def __reduce__(self) -> tuple:
        """A copy or pickle of the recorder (taken with the model by ``copy.deepcopy``, ``AveragedModel``) is inert."""
        return (_copied_recorder, ())

    def reset(self) -> None:
        """Forget the statistics (call it when the gradients are zeroed)."""
        self._s1: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._s2: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._n: dict[torch.nn.Parameter, int] = {}  # samples recorded per parameter (summed over passes)
        self._seen: dict[torch.nn.Parameter, Any] = {}  # p.grad after the last backward (a weak reference)
        self._pending: dict[int, int] = {}
        self._tasks.clear()  # (a backward pass that raised never reached its end)
        self._grads_before: dict[int, dict] = {}  # backward pass -> parameter -> its gradient before the pass
        self._double_backward: str | None = None  # a layer recorded in a create_graph=True pass

    def remove(self) -> None:
        """Detach the hooks from the model (and give fused and attention modules their own forward back)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for ref in self._fused_modules:
            if (module := ref()) is not None:
                per_sample_fused.uninstall(module)
        for ref, linear in self._attention_modules:
            if (module := ref()) is not None:
                per_sample_attention.uninstall(module, linear)
        self._fused_modules, self._attention_modules = [], []
        self._workspace.clear()

    # ---- forward side ----------------------------------------------------------------------------

    def _canonical(self, p: Any) -> Any:
        """The sharded parameter (the optimizer's) for FSDP2's unsharded copy ``p``; any other ``p`` itself."""
        if id(p) not in self._unsharded:
            self._unsharded = distributed.fsdp_unsharded_to_sharded([m for r in self._fsdp if (m := r()) is not None])
            self._unsharded.setdefault(id(p), p)
        return self._unsharded[id(p)]

    def _root_pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._copy:
            return None
        if not _recording() or _graph_task() != -1:
            return
        self._pending = {}  # a new forward pass
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        self._batch = x.shape[self.batch_dim] if x is not None and x.ndim > self.batch_dim else None

    def _root_hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._copy:
            return None
        if _graph_task() == -1:
            self._batch = None

    def _check_batch(self, label: str, samples: int, shape: tuple, dim: int) -> None:
        if self._batch is not None and samples != self._batch:
            raise RuntimeError(
                f"{label}: its input {tuple(shape)} has {samples} samples along dim {dim}, the model's input "
                f"{self._batch}: per-sample norms need the samples along dim {dim} of every layer's input "
                "(batch_dim=1 for sequence-first inputs; tokens folded into the batch, e.g. x.reshape(B * T, F), "
                "cannot be measured, and an input without the batch axis, e.g. position ids, must be expanded to it)")

    def _start(self, module: torch.nn.Module, label: str, x: torch.Tensor, dim: int) -> None:
        reason = per_sample_layers.refusal(module)  # (a setting changed after the recorder was attached)
        if reason:
            raise UnsupportedModuleError(f"per-sample norms are not available for {label} "
                                         f"({type(module).__name__}: {reason})")
        batched = (3 if isinstance(module, torch.nn.Conv1d) else 4 if isinstance(module, torch.nn.Conv2d)
                   else 2 if isinstance(module, torch.nn.Linear) else 0)
        if x.ndim < batched:
            raise ValueError(f"{label} ({type(module).__name__}) got an unbatched input of shape {tuple(x.shape)}: "
                             "per-sample norms need the samples along a batch dimension (add one: x[None])")
        if _graph_task() == -1:
            self._pending[id(module)] = 1
        self._check_batch(label, x.shape[dim], tuple(x.shape), dim)

    def _begin_fused(self, label: str):
        def begin(module: torch.nn.Module, x: torch.Tensor) -> _Call:
            _refuse_tensor_parallel(module, [x, *module.parameters(recurse=False)])
            self._start(module, label, x, 0)
            roles = {r: (getattr(module, r), None) for r in ("weight", "bias")
                     if getattr(module, r) is not None and getattr(module, r).requires_grad}
            return _Call(self, label, roles)

        return begin

    def _begin_attention(self, label: str):
        def begin(module: torch.nn.Module, samples: int, shape: tuple, dim: int) -> None:
            if _graph_task() == -1:
                self._pending[id(module)] = 1
            self._check_batch(label, samples, shape, dim)

        return begin

    def _attention_linear(self, label: str):
        """``linear(x, weight, bias, weight_rows, bias_rows, y=None)`` for the attention module ``label``, recorded.

        With ``y`` (the projection another recorder of the same module computed), only observe it.
        """

        def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   w_rows: tuple[int, int] | None, b_rows: tuple[int, int] | None,
                   y: torch.Tensor | None = None) -> torch.Tensor:
            w = weight if w_rows is None else weight[w_rows[0]:w_rows[1]]
            b = None if bias is None else (bias if b_rows is None else bias[b_rows[0]:b_rows[1]])
            roles = {r: v for r, v in (("weight", (weight, w_rows)), ("bias", (bias, b_rows)))
                     if v[0] is not None and v[0].requires_grad}
            if not roles or (y is not None and not y.requires_grad):
                return F.linear(x, w, b) if y is None else y
            call = _Call(self, label, roles)
            if (y is None and self.fused and "weight" in roles and (b is None or "bias" in roles)
                    and not torch.is_autocast_enabled(x.device.type) and per_sample_fused.linear_applies(x, w)):
                return per_sample_fused.fused_linear(x, w, b, call, self._workspace)
            y = F.linear(x, w, b) if y is None else y
            a = x.detach()

            def on_grad(d: torch.Tensor) -> None:
                call.enter()
                want_w, want_b = call.want("weight"), call.want("bias")
                pw, pb = linear_pieces(a, d.detach(), bias=b is not None, want_weight=want_w, want_bias=want_b)
                call.record("weight", pw, want_w)
                if pb is not None:
                    call.record("bias", pb, want_b)

            y.register_hook(on_grad)
            return y

        return linear

    def _batch_norm_hook(self, module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        """Before a BatchNorm's forward: the measured layers that already ran in this pass are upstream of it."""
        if self._copy:
            return None
        if not (module.training and _recording()):
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
        if self._copy:
            return None
        if not (_recording() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        label, dim = self._names[id(module)], self.batch_dim
        _refuse_tensor_parallel(module, [inputs[0], output])  # (FSDP2 has resharded the weights by now)
        self._start(module, label, inputs[0], dim)
        x = inputs[0].detach()
        x = x.movedim(dim, 0) if dim else x
        handler = per_sample_layers.handler(module)
        # one row per sample: take ||a_i||^2 now, while the input is still in cache
        extra = {"a_sq": sq_norms(x)} if isinstance(module, torch.nn.Linear) and x.ndim == 2 else {}
        call = _Call(self, label, {p: (p, None) for p in module.parameters(recurse=False) if p.requires_grad})

        def on_grad(grad_output: torch.Tensor) -> None:
            call.enter()
            self._pending[id(module)] = 0
            d = grad_output.detach()
            wants = {p: call.want(p) for p in call.roles}
            want = (lambda p: wants.get(self._canonical(p), False)) if self._fsdp else (lambda p: wants.get(p, False))
            for p, t in handler(module, x, d.movedim(dim, 0) if dim else d, want, **extra).items():
                call.record(p, t, want(p))

        output.register_hook(on_grad)

    # ---- backward side ---------------------------------------------------------------------------

    def _enter(self, call: _Call) -> None:
        """A recorded use receives its gradient: open the pass's record (once per backward pass)."""
        call.consumed = True
        if torch.is_grad_enabled() and self._double_backward is None:  # create_graph=True: see sums()
            self._double_backward = call.name
        task = _graph_task()
        if task not in self._tasks:
            if not self._tasks:
                self._drop_stale()
            self._tasks[task] = {}
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._end_pass(task))

    def _want(self, call: _Call, p: torch.nn.Parameter, rows: tuple[int, int] | None) -> bool:
        """Build ``call``'s contribution to ``p`` (rows) if another use of them is live or recorded in this pass."""
        if any(_overlap(r, rows) for r, *_ in self._tasks[_graph_task()].get(p, ())):
            return True
        for other in list(self._live.get(p, ())):
            if (other is not call and other.counted and not other.consumed
                    and any(q is p and _overlap(r, rows) for q, r in other.roles.values())):
                return True
        return False

    def _end_pass(self, task: int) -> None:
        before = self._grads_before.pop(task, {})
        for p, pieces in self._tasks.pop(task).items():
            if p in before and _unchanged(p, before[p]):
                continue  # a pass that did not accumulate into p.grad (torch.autograd.grad, backward(inputs=...))
            self._add(p, per_sample_layers.combine(p, pieces))
        if not self._tasks:  # after the other end-of-backward callbacks (DistributedDataParallel's)
            torch.autograd.Variable._execution_engine.queue_callback(self._note_grads)

    def _note_grads(self) -> None:
        # (a sharded parameter's gradient, set by FSDP2 at the end of the backward, is noted by its local shard)
        self._seen = per_sample_staleness.note(list(self._s1))

    def _drop_stale(self) -> None:
        """Before a new backward pass: drop the statistics of gradients reset since the last, and rescale those of
        gradients rescaled in place (they then add up with the new pass's as the gradients do)."""
        stale, ratios = per_sample_staleness.follow(self._seen, self._s1, list(self._s1), refresh=True)
        for p in stale:
            del self._s1[p], self._s2[p], self._n[p]
        for p, r in ratios.items():
            self._s1[p], self._s2[p] = self._s1[p] * r, self._s2[p] * (r * r)

    def _add(self, p: torch.nn.Parameter, sq: torch.Tensor) -> None:
        norms_sq = sq.clamp_min(0)
        scale = 1.0
        if self.subsample is not None and self.subsample < sq.shape[0]:
            scale = sq.shape[0] / self.subsample  # |B|/|J|: the subsample's sums estimate the batch's
            norms_sq = norms_sq[: self.subsample]
        s1, s2 = scale * norms_sq.sqrt().sum(), scale * norms_sq.sum()
        if p in self._s1:
            self._s1[p] = self._s1[p] + s1
            self._s2[p] = self._s2[p] + s2
            self._n[p] += sq.shape[0]
        else:
            self._s1[p], self._s2[p], self._n[p] = s1, s2, sq.shape[0]

    # ---- results -------------------------------------------------------------------------------

    def sums(self, params: Iterable[torch.nn.Parameter], *, scale: float = 1.0) -> dict[torch.nn.Parameter, tuple]:
        r"""``param -> (sum_i |c_i|, sum_i |c_i|^2)``, the contributions to ``p.grad``, divided by ``scale`` and ``scale**2``.

        ``scale`` is a loss scale still inside the gradients (e.g. a
        GradScaler's before ``unscale_``); the default 1 means none. A gradient
        rescaled since its backward (``GradScaler.unscale_``, ``clip_grad_norm_``,
        a division by the number of micro-batches) carries the statistics with it:
        they follow the ratio of its norms, and ``scale`` is not applied to it (the
        ratio, taken from the gradient as its backward left it, already holds any
        scale that was removed). A change that is not a rescaling (an average over
        ranks, ``clip_grad_value_``) leaves them as they are
        (:mod:`~lwrs.backends.torch.per_sample_staleness`).
        """
        if self._copy:
            raise RuntimeError("this PerSampleNorms is a copy (copy.deepcopy or pickle), which records nothing: "
                               "attach a new PerSampleNorms to the copied model")
        if self._double_backward is not None:
            raise RuntimeError(
                f"per-sample statistics are not exact after a backward with create_graph=True (through layer "
                f"{self._double_backward}): a later backward through that graph (a gradient penalty) adds to p.grad "
                "contributions the recorder cannot split per sample; no statistics until reset()")
        out, params = {}, list(params)
        stale, ratios = per_sample_staleness.follow(self._seen, self._s1, [p for p in params if p in self._s1])
        for p in stale:
            raise RuntimeError(
                f"the per-sample statistics of {self._owner.get(p, 'a parameter')} are stale: its gradient was "
                "zeroed or replaced after the last backward (model.zero_grad(), with or without set_to_none, "
                "p.grad.zero_()?); call PerSampleNorms.reset() when zeroing the gradients (CLARS.zero_grad does)")
        for p in params:
            if p in self._s1:
                dtype = torch.float64 if p.dtype == torch.float64 else torch.float32  # (kept in float64)
                # a gradient rescaled in place since the backward (unscaled, clipped): the statistics follow it,
                # and the scale it carried is gone with the rescaling
                r = ratios[p] if p in ratios else 1.0 / scale
                out[p] = ((self._s1[p] * r).to(dtype), (self._s2[p] * (r * r)).to(dtype))
            elif p in self._bn_params and p.grad is not None:
                g = distributed.gather(p.grad.detach())  # the whole layer's gradient under FSDP2
                g = g.double() if g.dtype == torch.float64 else g.float()
                n = torch.linalg.vector_norm(g)
                out[p] = (n, n * n)
            elif p in self._owner and self._s1 and p.grad is not None and not bool(p.grad.detach().any()):
                # no recorded use since the last reset while others have one, and an all-zero gradient (a head
                # unused this step, its gradient zeroed in place): every sample's gradient is zero
                zero = torch.zeros((), dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
                out[p] = (zero, zero)
            elif p in self._owner:
                raise RuntimeError(f"no per-sample statistics for a parameter of {self._owner[p]}: "
                                   "was backward run since the last reset?")
            elif p in self._unrecorded:
                raise UnsupportedModuleError(
                    f"a parameter of {self._unrecorded[p]} has a gradient, but was frozen when the recorder was made, "
                    f"and its per-sample norms are not available; supported: {_SUPPORTED}")
            else:
                raise UnsupportedModuleError("a parameter passed to the optimizer is not part of the recorded model")
        return out

    def norm_statistics(self, params: Iterable[torch.nn.Parameter], *, scale: float = 1.0):
        r"""The statistics of ``params``, in order, as a :class:`lwrs.NormStatistics`.

        The convention of the core: with :math:`N` the number of samples
        recorded since the last reset (summed over micro-batches and, with
        ``all_reduce``, over ranks) and :math:`g_{ik} = N c_{ik}` the per-sample
        gradients in the units of ``p.grad`` (exactly so for a mean-reduced loss),

        .. math:: S^{(1)}_k = \sum_i \|g_{ik}\|, \qquad S^{(2)}_k = \sum_i \|g_{ik}\|^2, \qquad \text{count} = N,

        so ``mean_norms()`` is :math:`\frac1N\sum_i\|g_{ik}\|` = :math:`\sum_i\|c_{ik}\|`,
        the CLARS denominator (eq. 5) in the units of ``p.grad``, whatever the
        loss reduction, and ``merge_statistics`` of two recorders' statistics
        is the statistics of the union of their samples.
        """
        from lwrs import NormStatistics

        params = list(params)
        sums = self.sums(params, scale=scale)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        s1 = torch.stack([sums[p][0].to(dtype) for p in params])
        s2 = torch.stack([sums[p][1].to(dtype) for p in params])
        count = max((self._n.get(p, 0) for p in params), default=0)
        if count == 0:  # BatchNorm parameters only: one "sample", the batch gradient
            count = 1
        if self._distributed():
            # one collective per step, over every recorded parameter in the model's order, so that every rank
            # makes the same call even when each steps its own subset (ZeroRedundancyOptimizer)
            world = torch.distributed.get_world_size()
            everyone = [q for q in self._owner if q in self._s1]
            _, ratios = per_sample_staleness.follow(self._seen, self._s1, everyone)  # (as in sums)
            r = [ratios.get(q, 1.0 / scale) for q in everyone]
            both = torch.stack([(self._s1[q] * f).to(dtype) for q, f in zip(everyone, r)]
                               + [(self._s2[q] * (f * f)).to(dtype) for q, f in zip(everyone, r)]) if everyone else s1[:0]
            torch.distributed.all_reduce(both)
            where = {q: k for k, q in enumerate(everyone)}
            for k, p in enumerate(params):
                if p in where:  # (BatchNorm's are already the synchronised gradient's)
                    s1[k], s2[k] = both[where[p]] / world, both[len(everyone) + where[p]] / world**2
            count *= world  # equal local batch sizes, as DistributedDataParallel's averaging assumes
        return NormStatistics(s1 * count, s2 * (count * count), count)

    def _distributed(self) -> bool:
        dist = torch.distributed
        ready = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.all_reduce is None:
            return ready
        if self.all_reduce and not ready:
            raise RuntimeError("all_reduce=True needs an initialised torch.distributed process group")
        return bool(self.all_reduce)


def _drop_copied_hooks(module: torch.nn.Module) -> None:
    """Remove the hooks of copied (inert) recorders that ``copy.deepcopy`` of a recorded model carried over."""
    for name in ("_forward_pre_hooks", "_forward_hooks"):
        hooks = getattr(module, name)
        for key in [k for k, h in hooks.items()
                    if isinstance(getattr(h, "__self__", None), PerSampleNorms) and h.__self__._copy]:
            del hooks[key]
            for extra in (f"{name}_with_kwargs", f"{name}_always_called"):
                getattr(module, extra, {}).pop(key, None)


def _copied_recorder() -> PerSampleNorms:
    """What a copy of a :class:`PerSampleNorms` is: one that records nothing (see ``PerSampleNorms.__reduce__``)."""
    norms = object.__new__(PerSampleNorms)
    norms._copy, norms._handles, norms._fused_modules, norms._attention_modules = True, [], [], []
    norms._workspace, norms._tasks = {}, {}
    norms.reset()
    return norms
