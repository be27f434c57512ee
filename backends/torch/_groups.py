"""Gathering and checking the groups of the torch optimizers (private): the parts a step checks for every
group before it updates any, and the checks of a loaded state."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from lwrs._validation import check_hyperparameter
from lwrs.norm_statistics import NormStatistics

from .distributed import is_sharded

__all__ = ["Gathered", "gather", "group_statistics", "check_statistics_values", "load_checked", "check_lr", "from_grad_scaler",
           "quiet_array_api_compat", "check_scalar",
           "COMMON_DOC", "TRUST_DOC"]


class Gathered(NamedTuple):
    """One group's parameters that have a gradient, their gradients and their labels for messages."""

    index: int
    group: dict[str, Any]
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    labels: Labels
    sharded: bool  # the parameters are DTensors (FSDP2, tensor parallel)
    states: list[dict[str, Any]]  # their entries of the optimizer's state, in order


def _label(group: dict[str, Any], index: int, j: int) -> str:
    names = group.get("param_names")
    return f"{names[j]!r} (group {index})" if names else f"{j} of group {index}"


class Labels(Sequence):
    """The labels of a group's gathered parameters, made when a message needs one (not at every step)."""

    def __init__(self, group: dict[str, Any], index: int, positions: list[int]):
        self._group, self._index, self._positions = group, index, positions

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        return _label(self._group, self._index, self._positions[k])


def check_state_like(g: Gathered, key: str, tensors: list[torch.Tensor]) -> None:
    """Refuse, before any group is updated, a state tensor whose dtype or shape is not its parameter's (a model
    converted after its optimizer was made, e.g. ``model.double()``, would otherwise fail half-way through a step,
    or mix precisions). A device mismatch fails in the norms, before any update, too."""
    bad = [k for k, (p, t) in enumerate(zip(g.params, tensors)) if t.dtype != p.dtype or t.shape != p.shape]
    if bad:
        p, t = g.params[bad[0]], tensors[bad[0]]
        raise ValueError(f"parameter {g.labels[bad[0]]}: its state {key!r} is {t.dtype} {tuple(t.shape)}, the "
                         f"parameter {p.dtype} {tuple(p.shape)} (was the model converted after the optimizer was "
                         "made? make the optimizer after, or load its state_dict into a new one); no group was updated")


def gather(opt: torch.optim.Optimizer) -> list[Gathered]:
    """Every group's parameters with a gradient (the others are skipped, state untouched), checked: no sparse
    gradient."""
    out = []
    state = opt.state
    for i, group in enumerate(opt.param_groups):
        params, grads, positions, states = [], [], [], []
        for j, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"{type(opt).__name__} does not support sparse gradients: parameter "
                                   f"{_label(group, i, j)} has one; no group was updated")
            params.append(p)
            grads.append(g)
            positions.append(j)
            states.append(state[p])
        out.append(Gathered(i, group, params, grads, Labels(group, i, positions), is_sharded(params), states))
    return out


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_shapes(stats: Any, count: int, where: str) -> NormStatistics:
    if not isinstance(stats, NormStatistics):
        raise TypeError(f"{where}norm_stats must be a lwrs.NormStatistics or a dict param -> (S1, S2), "
                        f"got {type(stats).__name__}")
    for name in ("sum_norms", "sum_squared_norms"):
        a = getattr(stats, name)
        if not isinstance(a, torch.Tensor) or tuple(a.shape) != (count,):
            shape = tuple(a.shape) if hasattr(a, "shape") else type(a).__name__
            raise ValueError(f"{where}norm_stats.{name} has shape {shape}, expected ({count},): one entry per "
                             "parameter with a gradient, in order")
    n = stats.count
    if not _compiling() and not (isinstance(n, torch.Tensor) and n.device.type != "cpu"):
        value = float(n)
        if isinstance(n, bool) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{where}norm_stats.count must be a positive finite number of samples, got {n!r}")
    return stats


def group_statistics(opt: Any, gathered: list[Gathered], norm_stats: Any) -> list[NormStatistics | None]:
    """Each group's CLARS statistics (``None`` where there are none), with their shapes checked."""
    if norm_stats is None and getattr(opt, "norm_source", None) is not None:
        # the statistics were recorded from scaled gradients; step() runs after GradScaler.unscale_
        given = getattr(opt, "grad_scale", None)  # set by GradScaler.step when it left the gradients scaled
        scale = float(given) if given is not None else (
            float(opt.grad_scaler.get_scale()) if opt.grad_scaler is not None else 1.0)
        return [_check_shapes(opt.norm_source.norm_statistics(g.params, scale=scale), len(g.params),
                              f"group {g.index}: ") for g in gathered]
    if norm_stats is None:
        return [None] * len(gathered)
    if isinstance(norm_stats, dict):
        out = []
        for g in gathered:
            missing = [label for p, label in zip(g.params, g.labels) if p not in norm_stats]
            if missing:
                raise ValueError(f"norm_stats has no entry for parameter {missing[0]}")
            out.append(NormStatistics(torch.stack([torch.as_tensor(norm_stats[p][0]) for p in g.params]),
                                      torch.stack([torch.as_tensor(norm_stats[p][1]) for p in g.params]), 1))
        return [_check_shapes(s, len(g.params), f"group {g.index}: ") for s, g in zip(out, gathered)]
    total = sum(len(g.params) for g in gathered)
    stats = _check_shapes(norm_stats, total, "")
    out, start = [], 0
    for g in gathered:
        k = len(g.params)
        out.append(NormStatistics(stats.sum_norms[start:start + k], stats.sum_squared_norms[start:start + k],
                                  stats.count))
        start += k
    return out


def check_statistics_values(g: Gathered, stats: NormStatistics, diagnostics: Any, denominators: Any) -> None:
    r"""Refuse statistics that cannot belong to this gradient (one host read).

    By the triangle inequality the mean per-sample norm is at least the norm of the mean,
    :math:`\frac1N\sum_i\|g_{ik}\| \ge \|\bar g_k\|` (CLARS eq. 5 and the factor in :math:`[0, 1]`);
    statistics below it beyond rounding (:math:`\sqrt{\epsilon}` relative), or with negative sums,
    would let CLARS step further than LARS. Non-finite values are left to ``on_nonfinite``.
    """
    s1, s2 = stats.sum_norms, stats.sum_squared_norms
    mean = (s1 / stats.count).to(denominators.dtype)
    rtol = math.sqrt(torch.finfo(denominators.dtype).eps)
    finite = torch.isfinite(mean) & torch.isfinite(denominators)
    bad = ((s1 < 0) | (s2 < 0) | (finite & (mean < denominators * (1 - rtol)))).nonzero()
    if bad.numel():
        k = int(bad[0, 0])
        raise ValueError(
            f"norm_stats for parameter {g.labels[k]} cannot come from its gradient: mean per-sample norm "
            f"{float(mean[k])!r} (S1 {float(s1[k])!r}, S2 {float(s2[k])!r}, count {stats.count!r}) is negative or "
            f"below the norm of the mean gradient {float(denominators[k])!r}; were they recorded for another "
            "batch, or not reset by zero_grad()? No group was updated")


def from_grad_scaler(opt: Any, norm_stats: Any) -> tuple[bool, Callable[[], None] | None]:
    """The part of a step called by ``GradScaler.step`` (torch's protocol for ``_step_supports_amp_scaling``):
    ``(False, None)`` when the scaler found an inf or NaN (the step is skipped, as GradScaler does), else
    ``(True, undo)``, ``undo`` being ``None`` unless the gradients were unscaled here.

    The scaler sets ``opt.found_inf`` and, unless ``GradScaler.unscale_`` already ran, ``opt.grad_scale``
    and leaves the gradients scaled: they are unscaled here and the statistics with the same scale. After
    ``unscale_`` the scaler does not pass its scale, and the statistics recorded from the scaled backward
    would be off by the loss scale: the optimizer needs ``grad_scaler=`` then, and refuses the step without.
    ``undo``, called when the step is refused before any update, scales the gradients back and drops the
    scaler's attributes (which ``GradScaler.step`` removes only after a step that returned), so that a retry
    unscales them once, as the first try did.
    """
    found_inf = getattr(opt, "found_inf", None)
    if found_inf is None:
        return True, None
    scale = getattr(opt, "grad_scale", None)

    def forget() -> None:
        for name in ("found_inf", "grad_scale"):
            opt.__dict__.pop(name, None)

    if (scale is None and opt.grad_scaler is None and norm_stats is None
            and getattr(opt, "norm_source", None) is not None):
        forget()
        raise ValueError(f"{type(opt).__name__} is stepped by a GradScaler after GradScaler.unscale_, but was "
                         "not given the scaler: the per-sample statistics were recorded from the scaled backward "
                         "and their scale is unknown here; pass grad_scaler=scaler to the optimizer. "
                         "No group was updated")
    if float(found_inf):
        return False, None
    if scale is None:
        return True, forget
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    originals = [g.clone() for g in grads] if _inexact_reciprocal(scale) else None
    torch._foreach_mul_(grads, scale.double().reciprocal().float())  # as GradScaler.unscale_ does

    def undo() -> None:
        if originals is None:  # a power of two: multiplying back is exact
            torch._foreach_mul_(grads, scale.float())
        else:
            torch._foreach_copy_(grads, originals)
        forget()

    return True, undo


def _inexact_reciprocal(scale: torch.Tensor) -> bool:
    """Whether unscaling by ``scale`` may round (a scale that is not a power of two; GradScaler's are)."""
    mantissa, _ = math.frexp(float(scale))
    return mantissa != 0.5


def check_scalar(where: str, value: Any, **bounds: Any) -> None:
    """:func:`lwrs._validation.check_hyperparameter`, but not while compiling: a float that a scheduler changes
    (``momentum``, ``betas``) becomes dynamic there, and checking it would break the graph or specialise it on
    its value at every step. Eager steps, ``add_param_group`` and ``load_state_dict`` check it."""
    if _compiling():
        return
    check_hyperparameter(where, value, **bounds)


def quiet_array_api_compat() -> bool:
    """Let Dynamo trace array_api_compat's cached helpers without a warning for each (called while compiling).

    The core's functions find their namespace with ``array_namespace``, whose helpers are
    ``functools.lru_cache``-wrapped pure functions of a class (which library an array's type
    belongs to). Dynamo traces through them correctly but warns once per helper that it ignores
    the cache; torch marks einops's pure cached helpers the same way. Run by Dynamo at trace
    time as a constant (``torch.compiler.assume_constant_result``, whose mark is set directly
    so that importing the backend does not import Dynamo).
    """
    try:
        from array_api_compat.common import _helpers
        from torch._dynamo.utils import allow_lru_cache_wrapper_trace_without_warning as allow
        from torch._dynamo.utils import is_lru_cache_wrapped_function as cached
    except ImportError:  # another torch or array_api_compat: the warnings stay, the results are the same
        return False
    for obj in vars(_helpers).values():
        if cached(obj):
            allow(obj)
    return True


quiet_array_api_compat._dynamo_marked_constant = True  # type: ignore[attr-defined]


# keys torch's schedulers and SWA add to parameter groups (LRScheduler, OneCycleLR, CyclicLR, SWALR)
SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr"})


def load_checked(opt: Any, state_dict: dict[str, Any]) -> None:
    """``torch.optim.Optimizer.load_state_dict`` after checking that the state is this optimizer's."""
    name = type(opt).__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(f"{name}.load_state_dict needs a dict with 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"{name}.load_state_dict: the state has {len(saved_groups)} parameter groups, "
                         f"this optimizer {len(opt.param_groups)}")
    ignore = {"params", "param_names"}
    ours = set(opt.defaults) - {"optimizer"}  # this optimizer's hyperparameters
    kind = getattr(opt, "_state_kind", name)
    for i, (saved, own) in enumerate(zip(saved_groups, opt.param_groups)):
        # the lwrs optimizer that saved the state (MNAG, LARS and CLARS share their hyperparameters' names);
        # states saved before it was recorded lack it and are checked by their names only
        origin = saved.get("optimizer", kind) if isinstance(saved, dict) else kind
        if origin != kind:
            raise ValueError(f"{name}.load_state_dict: group {i} is the state of a {origin} optimizer, not of a "
                             f"{kind}; is this the state of another optimizer? Create a {origin} to load it")
        # keys beyond the hyperparameters (a scheduler's initial_lr, max_lr, ...) load as in torch.optim; a
        # state saved before the optimizer was recorded is checked by all its names
        tagged = isinstance(saved, dict) and "optimizer" in saved
        extra = set() if tagged else set(saved) - set(own) - ignore - SCHEDULER_KEYS
        missing = ours - set(saved)
        if extra or missing:
            raise ValueError(f"{name}.load_state_dict: group {i} is not a {name} group (unexpected "
                             f"hyperparameters {sorted(extra)}, missing {sorted(missing)}); is this the state of "
                             "another optimizer?")
        if len(saved["params"]) != len(own["params"]):
            raise ValueError(f"{name}.load_state_dict: group {i} has {len(saved['params'])} parameters in the "
                             f"state and {len(own['params'])} here")
        state = state_dict["state"]
        have = [j for j, pid in enumerate(saved["params"]) if pid in state]
        if have and len(have) != len(saved["params"]):
            j = next(j for j, pid in enumerate(saved["params"]) if pid not in state)
            raise ValueError(f"{name}.load_state_dict: the state has no entry for parameter {_label(saved, i, j)} "
                             "while the other parameters of its group have one")
        for j in have:
            entry, p = state[saved["params"][j]], own["params"][j]
            keys = set(entry)
            if "step" not in keys or not keys <= set(opt._state_keys):
                raise ValueError(f"{name}.load_state_dict: parameter {_label(saved, i, j)} has state keys "
                                 f"{sorted(keys)}, a {name} state has {list(opt._state_keys)} (step required); "
                                 "is this the state of another optimizer?")
            for key in keys - {"step"}:
                if tuple(entry[key].shape) != tuple(p.shape):
                    raise ValueError(f"{name}.load_state_dict: {key} of parameter {_label(saved, i, j)} has shape "
                                     f"{tuple(entry[key].shape)}, the parameter {tuple(p.shape)}")
    torch.optim.Optimizer.load_state_dict(opt, state_dict)
    for group in opt.param_groups:  # an older state's groups: recorded now
        group.setdefault("optimizer", kind)
    for st in opt.state.values():  # step counts as 0-d tensors (older states kept ints)
        if "step" in st and not isinstance(st["step"], torch.Tensor):
            st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)


def check_lr(where: str, lr: Any) -> None:
    """``lr`` is a finite number >= 0, or a 0-d floating tensor (value checked where it is on the host)."""
    if isinstance(lr, torch.Tensor):
        if lr.ndim != 0 or not lr.is_floating_point():
            raise ValueError(f"{where}lr must be a number or a 0-d floating tensor, got shape {tuple(lr.shape)}, "
                             f"{lr.dtype}")
        if _compiling() or lr.device.type != "cpu":
            return  # no host synchronisation for a tensor learning rate on a device
        lr = float(lr)
    check_hyperparameter(f"{where}lr", lr, low=0.0)


COMMON_DOC = """
    lr : float or 0-d tensor
        The global rate :math:`\\gamma_t` (a tensor keeps ``torch.compile`` from recompiling when a
        scheduler changes it).
    momentum : float
        :math:`\\beta \\in [0, 1)` of mNAG (CLARS eq. 4).
    weight_decay : float
        :math:`\\lambda \\ge 0`, added to the gradient.
    nesterov : bool
        Nesterov momentum (the paper's mNAG); ``False`` gives heavy ball.
    decay_1d : bool
        Whether 1-D tensors (biases, norm parameters) get weight decay.
    on_nonfinite : {"raise", "skip"}
        What a non-finite gradient, state, statistic or step does: raise
        :class:`lwrs.NonFiniteError` naming the group and parameter, or skip the whole step
        (under ``torch.compile``, "skip" needs no host synchronisation).
    foreach : bool or None
        ``False`` runs the reference (the core's functions); ``None``/``True`` the in-place kernels.
    fused : bool
        The compiled CPU kernels (float32/float64, contiguous tensors)."""

TRUST_DOC = """
    eta : float
        The trust coefficient :math:`\\eta > 0`.
    weight_decay_form : {"sum_of_norms", "norm_of_sum"}
        Where weight decay enters the denominator: :math:`\\|g\\| + \\lambda\\|w\\|` or :math:`\\|g + \\lambda w\\|`.
    eps : float
        Added to the denominator (0 reproduces the papers).
    max_ratio : float or None
        Upper clip of the trust ratio (the CLARS code uses 0.1).
    larc_clip : bool
        apex LARC's clipping: the layer rate is :math:`\\min(\\eta\\|w\\|/D, \\gamma_t)`.
    exclude_1d : bool
        Keep 1-D tensors at ratio 1."""
