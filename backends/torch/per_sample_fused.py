r"""Per-sample gradients that *are* the weight gradient: the fused mode of :class:`PerSampleNorms`.

For a convolution, and for a Linear layer applied to a sequence, the per-sample
weight gradients :math:`G_i = \sum_t \delta_{it} a_{it}^\top` cost as many
multiply-adds as the ordinary weight gradient :math:`\sum_i G_i`. Autograd
computes the latter anyway, so measuring the former with hooks doubles that
part of the backward pass. In the fused mode the layer's forward runs through
:class:`_PerSampleWeightGrad`, whose backward builds every :math:`G_i` once, takes
:math:`\|G_i\|^2` from them and returns :math:`\sum_i G_i` as the weight
gradient: the per-sample norms cost one reduction over the :math:`G_i`, and
autograd's own weight-gradient call is not made.

The input gradient is computed as autograd would
(``torch.nn.grad.conv*_input``, or :math:`\delta W`), and the bias gradient
and its per-sample norms come from :math:`\delta` directly. In float32 the weight
gradient differs from autograd's by rounding only (the sum runs in a different
order); in float64 it agrees to about 1e-15.

The per-sample gradients are built a chunk of samples at a time (about
``_CHUNK_ELEMENTS`` elements, 4 MiB in float32), so they stay in cache and the
memory needed does not grow with the batch.

The layer falls back to its ordinary forward (and the hook-based measurement)
where the fused form does not apply or does not pay: no gradient needed, inside
``torch.func`` transforms, under autocast, for a Linear layer with one row per
sample (the hook-based :math:`\|a_i\|^2\|\delta_i\|^2` is already almost free),
and for a Linear layer on short sequences, where the ghost norm's
:math:`T^2(p+d)` multiply-adds per sample cost less than writing and reading a
:math:`p \times d` gradient per sample (fused only when
:math:`T^2 (p+d) \ge 16\, p d`, a rule measured by ``benchmarks/sequence_linear.py``).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["InstanceForward", "conv_per_sample", "conv_sq_norms", "fused_linear", "fusable", "install", "linear_applies",
           "recording", "uninstall"]

# Per-sample gradients built at a time, in elements (4 MiB in float32): small enough to stay in cache and
# to bound the memory, large enough that each chunk is one efficient batched call.
_CHUNK_ELEMENTS = 1 << 20

# A Linear on sequences is fused when T^2 (p + d) >= _GHOST_FACTOR * p * d: below that the ghost norm
# (two T x T Gram matrices per sample, beside autograd's weight gradient) costs less than building.
_GHOST_FACTOR = 16


def recording() -> bool:
    """Whether a forward pass now is one to record: gradients on, no torch.func transform, and no graph capture.

    Under ``torch.jit.trace`` and ``torch.export`` the recorded layers run their ordinary forward and no hook
    records: the captured graph is the model's alone, and the recorder goes on measuring the live model.

    >>> recording()
    True
    """
    return (torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active()
            and not torch.jit.is_tracing() and not _exporting())


# torch.compiler.is_exporting exists from torch 2.6 (before, torch.export's tracing is not told apart)
_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


class InstanceForward:
    """An instance-level ``module.forward`` that copies of the module do not share.

    ``copy.deepcopy`` (``AveragedModel``, EMA, teachers) and pickling copy a
    module's ``__dict__``, and a plain function there would be shared: the copy
    would run the original module. A copy of this object is instead the
    module class's own forward, bound to the copy (:class:`_ClassForward`), so the
    copy is a plain, independent module that nothing records.

    Examples
    --------
    >>> import copy, torch
    >>> lin = torch.nn.Linear(2, 2)
    >>> lin.forward = InstanceForward(lin, lambda module, x: torch.zeros(1))
    >>> twin = copy.deepcopy(lin); x = torch.randn(3, 2)
    >>> lin(x).shape, bool(torch.equal(twin(x), torch.nn.functional.linear(x, twin.weight, twin.bias)))
    (torch.Size([1]), True)

    ``function`` is called with the module first. The module is held weakly and ``function`` must
    not hold it either, so that a recorded module is no reference cycle: it is freed as soon as its
    last reference goes, like any module (a cycle kept it, and what it holds, such as the hooks
    DistributedDataParallel puts on its parameters, until a garbage collection).
    """

    __slots__ = ("module", "function")

    def __init__(self, module: torch.nn.Module, function: Callable[..., Any]):
        self.module, self.function = weakref.ref(module), function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module()
        if module is None:  # a forward kept apart from its module (or a copy.copy's), after the module was freed
            raise RuntimeError("this forward belongs to a recorded module that has been freed (a forward saved "
                               "apart from its module, or the forward of a copy.copy of one): call the module "
                               "itself, or copy it with copy.deepcopy")
        return self.function(module, *args, **kwargs)

    def __reduce__(self) -> tuple:  # copy.deepcopy and pickle: the copy's module gets its class's forward
        return (_ClassForward, (self.module(),))


class _ClassForward:
    """The forward of a copy of a module that had an :class:`InstanceForward`: its class's own (removed at first use)."""

    __slots__ = ("module",)

    def __init__(self, module: torch.nn.Module):
        self.module = weakref.ref(module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module()
        drop_copied(module)
        return type(module).forward(module, *args, **kwargs)

    def __reduce__(self) -> tuple:
        return (_ClassForward, (self.module(),))


def drop_copied(module: torch.nn.Module) -> None:
    """Remove what a copy of a recorded module kept of its recording (see :class:`InstanceForward`)."""
    if isinstance(module.__dict__.get("forward"), _ClassForward):
        del module.__dict__["forward"]
        module.__dict__.pop("_lwrs_per_sample_recorders", None)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _PerSampleWeightGrad(torch.autograd.Function):
    """``op(x, weight, bias)`` whose backward returns the sum of per-sample weight gradients and records their norms."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: "_Layer", rec: Any):
        ctx.layer, ctx.rec = layer, rec
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return layer.op(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        layer: _Layer = ctx.layer
        rec = ctx.rec
        rec.enter()
        grad_x = layer.input_grad(x, weight, grad_out) if ctx.needs_input_grad[0] else None
        keep = rec.want("weight")
        grad_w, sq_norms, built = _sum_and_sq_norms(layer, x, grad_out, weight, keep=keep)
        rec.record("weight", built if keep else sq_norms, keep)
        grad_w = grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = None
        if ctx.has_bias:
            per_sample_bias = layer.per_sample_bias(grad_out)
            keep = rec.want("bias")
            rec.record("bias", per_sample_bias if keep else sq_norms_of(per_sample_bias), keep)
            grad_b = per_sample_bias.sum(dim=0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


def _sum_and_sq_norms(layer: "_Layer", x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor,
                      with_sum: bool = True, keep: bool = False
                      ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``sum_i G_i`` (unless ``with_sum`` is false), ``||G_i||^2`` and, if ``keep``, the ``G_i`` themselves.

    They are built a chunk of samples at a time (all at once if ``keep``).
    """
    batch = x.shape[0]
    if keep:  # a parameter with several contributions in this pass: its contributions are summed later
        g = layer.per_sample(x, grad_out, weight.shape)
        return g.sum(dim=0), sq_norms_of(g), g
    chunk = max(1, min(batch, _CHUNK_ELEMENTS // max(1, weight.numel())))
    dtype = _stat_dtype(x)
    total = None
    sq_norms = torch.empty(batch, dtype=torch.float64, device=weight.device)
    buffer = layer.buffer((chunk, *weight.shape), dtype, weight.device) if layer.writes_into_buffer else None
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        out = buffer[: stop - start] if buffer is not None else None
        g = layer.per_sample(x[start:stop], grad_out[start:stop], weight.shape, out=out)  # (chunk, *weight.shape)
        sq_norms[start:stop] = sq_norms_of(g)
        if with_sum:
            chunk_sum = g.sum(dim=0)
            total = chunk_sum if total is None else total.add_(chunk_sum)
    return total, sq_norms, None


def sq_norms_of(g: torch.Tensor) -> torch.Tensor:
    """``||G_i||^2`` of a ``(B, ...)`` tensor, in float64: finite wherever ``G_i`` is (a large loss scale).

    A float32 norm sums squares in float32, which overflow from about 1.8e19; such rows are summed
    again in float64 (on the host, where checking costs no synchronisation; always on accelerators).
    """
    g = g.reshape(g.shape[0], -1)
    if g.dtype == torch.float32 and g.device.type == "cpu":
        norms = torch.linalg.vector_norm(g, dim=1)
        if bool(torch.isfinite(norms).all()) or not bool(torch.isfinite(g).all()):
            return norms.double().square()
    return torch.linalg.vector_norm(g, dim=1, dtype=torch.float64).square()


def conv_sq_norms(module: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    r"""Squared norms of a convolution's per-sample weight gradients (the hook path), a chunk of samples at a time.

    .. math:: \|G_i\|^2, \qquad G_i = \sum_t \delta_{it}\, a_{it}^\top

    with :math:`a_{it}` the input patch and :math:`\delta_{it}` the output
    gradient at position :math:`t` of sample :math:`i`: the per-sample term of
    the CLARS denominator (eq. 5), computed with grouped weight-gradient calls
    (the samples folded into the groups). Returns a ``(B,)`` tensor in float32
    (float64 for float64 inputs).

    Examples
    --------
    >>> import torch
    >>> conv, x = torch.nn.Conv1d(1, 2, 3).double(), torch.randn(4, 1, 8, dtype=torch.float64)
    >>> d = torch.randn(4, 2, 6, dtype=torch.float64)
    >>> g0 = torch.nn.grad.conv1d_weight(x[:1], conv.weight.shape, d[:1])
    >>> bool(torch.isclose(conv_sq_norms(conv, x, d)[0], g0.pow(2).sum()))
    True
    """
    layer = _ConvLayer(module)
    return _sum_and_sq_norms(layer, x, grad_out, module.weight, with_sum=False)[1]


def conv_per_sample(module: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    r"""A convolution's per-sample weight gradients :math:`G_i = \sum_t \delta_{it} a_{it}^\top`, ``(B, *weight.shape)``.

    Built for all samples at once, with the samples folded into the groups of
    one weight-gradient call; the contributions of a parameter used more than
    once in a pass are summed from these (CLARS eq. 5's per-sample term).

    Examples
    --------
    >>> import torch
    >>> conv, x = torch.nn.Conv1d(1, 2, 3).double(), torch.randn(4, 1, 8, dtype=torch.float64)
    >>> d = torch.randn(4, 2, 6, dtype=torch.float64)
    >>> g = conv_per_sample(conv, x, d)
    >>> bool(torch.allclose(g.sum(dim=0), torch.nn.grad.conv1d_weight(x, conv.weight.shape, d)))
    True
    """
    return _ConvLayer(module).per_sample(x, grad_out, module.weight.shape)


class _Layer:
    """How one module's forward, input gradient and per-sample gradients are computed."""

    def __init__(self, module: torch.nn.Module, workspace: dict | None = None):
        # (the module's settings are read here; the layer holds no reference to the module, see InstanceForward)
        # shared by the layers of one recorder (their backward passes run one at a time): one chunk's buffer,
        # kept between steps so that it is not allocated (and faulted in) again at every backward
        self.workspace = {} if workspace is None else workspace

    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of ``shape`` on the shared workspace (contents undefined)."""
        n = math.prod(shape)
        key = (dtype, device)
        flat = self.workspace.get(key)
        if flat is None or flat.numel() < n:
            flat = self.workspace[key] = torch.empty(n, dtype=dtype, device=device)
        return flat[:n].view(shape)

    writes_into_buffer = False  # whether ``per_sample`` can write into a given ``out`` tensor

    # per-type pieces, overridden below
    def op(self, x, weight, bias):  # pragma: no cover - abstract
        raise NotImplementedError

    def input_grad(self, x, weight, grad_out):  # pragma: no cover - abstract
        raise NotImplementedError

    def per_sample(self, x, grad_out, weight_shape, out=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def per_sample_bias(self, grad_out):  # pragma: no cover - abstract
        raise NotImplementedError

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return True


class _ConvLayer(_Layer):
    def __init__(self, module, workspace=None):
        super().__init__(module, workspace)
        two_d = isinstance(module, torch.nn.Conv2d)
        self._conv = F.conv2d if two_d else F.conv1d
        self._input = torch.nn.grad.conv2d_input if two_d else torch.nn.grad.conv1d_input
        self._weight = torch.nn.grad.conv2d_weight if two_d else torch.nn.grad.conv1d_weight
        m = module
        self._args = dict(stride=m.stride, padding=m.padding, dilation=m.dilation)
        self._groups = m.groups

    def op(self, x, weight, bias):
        return self._conv(x, weight, bias, groups=self._groups, **self._args)

    def input_grad(self, x, weight, grad_out):
        return self._input(x.shape, weight, grad_out, groups=self._groups, **self._args)

    def per_sample(self, x, grad_out, weight_shape, out=None):  # no ``out``: the weight-gradient call allocates
        # the batch folded into the groups: every sample's weight gradient in one call
        dtype = _stat_dtype(x)
        x, d = x.to(dtype), grad_out.to(dtype)
        b, w = x.shape[0], tuple(weight_shape)
        g = self._weight(x.reshape(1, -1, *x.shape[2:]), (b * w[0], *w[1:]),
                         d.reshape(1, -1, *d.shape[2:]), groups=b * self._groups, **self._args)
        return g.reshape(b, *w)

    def per_sample_bias(self, grad_out):
        d = grad_out.to(_stat_dtype(grad_out))
        return d.reshape(d.shape[0], d.shape[1], -1).sum(dim=2)


class _SequenceLinearLayer(_Layer):
    writes_into_buffer = True

    def op(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def input_grad(self, x, weight, grad_out):
        return grad_out @ weight.to(grad_out.dtype)

    def per_sample(self, x, grad_out, weight_shape, out=None):
        dtype = _stat_dtype(x)
        a = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)
        d = grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1]).to(dtype)
        return torch.bmm(d.transpose(1, 2), a, out=out)

    def per_sample_bias(self, grad_out):
        d = grad_out.to(_stat_dtype(grad_out))
        return d.reshape(d.shape[0], -1, d.shape[-1]).sum(dim=1)

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        # one row per sample (ndim 2): the hook path's ||a_i||^2 ||d_i||^2 is cheaper
        return linear_applies(x, weight)


def fusable(module: torch.nn.Module) -> bool:
    """Whether the fused mode can take over ``module``'s weight gradient (Conv1d, Conv2d, Linear).

    Subclasses count when they keep the parent's forward.

    Examples
    --------
    >>> import torch
    >>> fusable(torch.nn.Conv2d(1, 2, 3)), fusable(torch.nn.Linear(2, 2)), fusable(torch.nn.LayerNorm(2))
    (True, True, False)
    """
    for cls in (torch.nn.Conv1d, torch.nn.Conv2d):
        if isinstance(module, cls) and all(getattr(type(module), m) is getattr(cls, m)
                                           for m in ("forward", "_conv_forward")):
            return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rec: Any,
                 workspace: dict | None = None) -> torch.Tensor:
    r"""``F.linear(x, weight, bias)`` whose backward builds the per-sample weight gradients and reports them to ``rec``.

    ``x`` has the samples along dim 0. ``rec`` receives ``enter()``, then
    ``want(role)`` and ``record(role, tensor, built)`` for ``role`` in
    ``"weight"``, ``"bias"``: :math:`\|c_i\|^2` (or the contributions
    :math:`c_i = \sum_t \delta_{it} a_{it}^\top` where wanted; CLARS eq. 5's
    per-sample term). ``weight`` may be a view of a parameter (a slice).

    Examples
    --------
    >>> import torch
    >>> class Rec:
    ...     seen = []
    ...     def enter(self): pass
    ...     def want(self, role): return False
    ...     def record(self, role, t, built): self.seen.append((role, tuple(t.shape)))
    >>> w = torch.randn(3, 4, requires_grad=True)
    >>> fused_linear(torch.randn(2, 5, 4), w, None, Rec()).sum().backward(); Rec.seen
    [('weight', (2,))]
    """
    return _PerSampleWeightGrad.apply(x, weight, bias, _SequenceLinearLayer(None, workspace), rec)


def linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether building beats the ghost norm for a Linear on ``x`` (``T^2 (p + d) >= 16 p d``)."""
    if x.ndim < 3:
        return False
    d, p = weight.shape
    tokens = x.numel() // max(1, x.shape[0] * p)
    return tokens * tokens * (p + d) >= _GHOST_FACTOR * p * d


def install(module: torch.nn.Module, begin: Callable[[torch.Tensor], Any], fallback: Callable[[Any, Any], None],
            workspace: dict | None = None) -> None:
    r"""Route ``module``'s forward through the fused per-sample weight gradient.

    ``begin(module, x)`` is called before a fused forward and returns the recorder of
    that call (see :func:`fused_linear` for what it receives in backward);
    ``fallback(module, inputs, output)`` is called after an ordinary forward when the
    fused form does not apply, so that the caller can measure it another way;
    ``workspace`` (a dict) holds one chunk's buffer between steps and may be
    shared by the layers of one model. :func:`uninstall` restores the module. (Reference: CLARS eq. 5's
    per-sample term; see the module notes.)

    Examples
    --------
    >>> import torch
    >>> conv, seen = torch.nn.Conv1d(1, 2, 3), []
    >>> class Rec:
    ...     def enter(self): pass
    ...     def want(self, role): return False
    ...     def record(self, role, t, built): seen.append((role, t.shape))
    >>> install(conv, lambda m, x: Rec(), lambda m, i, o: None)
    >>> conv(torch.randn(4, 1, 8)).sum().backward(); uninstall(conv); seen
    [('weight', torch.Size([4])), ('bias', torch.Size([4]))]
    """
    drop_copied(module)
    if "forward" in module.__dict__:
        raise RuntimeError(f"{module} already has an instance-level forward; cannot fuse its per-sample gradients")
    kind = _ConvLayer if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)) else _SequenceLinearLayer
    workspace = {} if workspace is None else workspace

    def forward(module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        # one input, by position or as ``input=``; anything else takes the ordinary forward
        x = args[0] if len(args) == 1 and not kwargs else kwargs.get("input") if not args and len(kwargs) == 1 else None
        weight, bias = module.weight, module.bias
        layer = kind(module, workspace)  # the module's settings of this call (stride, padding, ...)
        use = (isinstance(x, torch.Tensor) and weight.requires_grad and recording()
               and not torch.is_autocast_enabled(x.device.type) and layer.applies(x, weight))
        if not use:
            out = type(module).forward(module, *args, **kwargs)
            fallback(module, args or tuple(kwargs.values()), out)
            return out
        return _PerSampleWeightGrad.apply(x, weight, bias, layer, begin(module, x))

    module.forward = InstanceForward(module, forward)


def uninstall(module: torch.nn.Module) -> None:
    """Give ``module`` its class's forward back (see :func:`install`)."""
    module.__dict__.pop("forward", None)
