r"""``torch.optim`` optimizers built on the lwrs core: MNAG, LARS, CLARS, TVLARS and LAMB.

Each class is a drop-in :class:`torch.optim.Optimizer`, built like ``torch/optim/sgd.py``:
the class gathers each group's tensors and state, and the functional layer
(:mod:`lwrs.backends.torch.functional`) computes and applies the step with one of three
implementations, tested to agree with the core:

* ``foreach=False``: the reference, the core's own functions on the tensors;
* ``foreach=True`` (the default): in-place kernels, one squared-norm pass per tensor
  list and BLAS ``axpby`` updates on the CPU;
* ``fused=True`` (CPU float32/float64): two compiled passes (:mod:`lwrs.backends.torch.fused`).

Hyperparameters live in ``param_groups`` under torch.optim's names (``lr``, ``momentum``,
``betas``, ``weight_decay``, ``eps``, ``nesterov``; :mod:`lwrs.table` maps them to the papers'),
so :mod:`torch.optim.lr_scheduler` works; they are checked when a group is added and again at
every step, on the host. ``lr`` may be a 0-d tensor (for ``torch.compile``). The state is flat
and string-keyed (``"step"``, a 0-d tensor, ``"momentum_buffer"``, ``"exp_avg"``,
``"exp_avg_sq"``), per parameter as in torch.optim.

A step is all-or-nothing: every group is gathered and checked, and its norms and rates
computed, before any parameter changes. Parameters without a gradient are skipped and their
state is left as it is. Errors name the group and the parameter (by name when the optimizer
was given ``model.named_parameters()``).

The momentum is the paper's mNAG (CLARS eq. 4): the buffer holds rate-scaled steps, so with
a varying rate it differs from ``torch.optim.SGD``, which multiplies a buffer of raw gradients
by the current rate.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

import lwrs
from lwrs._validation import check_hyperparameter
from lwrs.diagnostics import LayerDiagnostics
from lwrs.masks import one_d_masks
from lwrs.moments import warn_float16
from lwrs.rates import TrustOptions

from . import functional as F
from .distributed import local as _local
from ._groups import (COMMON_DOC, TRUST_DOC, Gathered, _label, check_lr, check_scalar, check_state_like,
                      check_statistics_values, from_grad_scaler, gather, group_statistics, load_checked,
                      quiet_array_api_compat)

__all__ = ["MNAG", "LARS", "CLARS", "TVLARS", "LAMB"]


def _default(optimizer: str, core_name: str) -> Any:
    """The default of a hyperparameter, from the optimizer table :mod:`lwrs.table`."""
    return lwrs.table.spec(optimizer).hyperparameter(core_name).default


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _schedules_take_tensors() -> bool:
    """Whether the core's schedules accept a 0-d tensor step (needed for TVLARS without a graph break)."""
    try:
        lwrs.schedules.tvlars_factor(decay_coefficient=0.1, delay_steps=0)(torch.zeros(()))
    except (TypeError, ValueError):
        return False
    return True


_TRACEABLE_SCHEDULES = _schedules_take_tensors()


class _Layerwise(torch.optim.Optimizer):
    """Shared machinery: groups, checks, state, the all-or-nothing step and the diagnostics."""

    _state_keys: tuple[str, ...] = ("step", "momentum_buffer")
    _state_kind = "none"  # in every group ("optimizer"): load_state_dict refuses another lwrs optimizer's state

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, foreach: bool | None,
                 fused: bool | None, norm_source: Any = None, grad_scaler: Any = None):
        if foreach and fused:
            raise ValueError("fused=True and foreach=True cannot be combined (as in torch.optim): pick one")
        self.foreach = foreach
        self.fused = bool(fused)
        self.norm_source = norm_source
        self.grad_scaler = grad_scaler
        self._diagnostics: list[list[LayerDiagnostics]] = [[]]
        super().__init__(params, dict(defaults, optimizer=self._state_kind))

    _kept_on_copy = ("foreach", "fused", "norm_source", "grad_scaler")

    def __getstate__(self) -> dict[str, Any]:
        """torch.optim's state plus what the constructor was given, so that ``copy.deepcopy`` and pickle give an
        optimizer that steps (torch.optim keeps only ``defaults``, ``state`` and ``param_groups``)."""
        return dict(super().__getstate__(), **{k: self.__dict__.get(k) for k in self._kept_on_copy})

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for k in self._kept_on_copy:
            self.__dict__.setdefault(k, False if k == "fused" else None)
        self._diagnostics = [[]]

    @property
    def diagnostics(self) -> list[LayerDiagnostics]:
        """The last step's :class:`lwrs.LayerDiagnostics`, one per group that had gradients."""
        return self._diagnostics[0]

    @property
    def implementation(self) -> str:
        """``"fused"``, ``"foreach"`` or ``"reference"``."""
        return F.implementation(self.foreach, self.fused)

    # ---- hyperparameters ------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as torch.optim does), checking its hyperparameters now and creating its state.

        The state (step counts and buffers) is created here rather than at the first step, so that
        the first step does not change the state's structure: ``torch.compile(opt.step)`` then
        compiles once.
        """
        with warnings.catch_warnings():  # a duplicate parameter is refused below, naming it
            warnings.filterwarnings("ignore", message="optimizer contains a parameter group with duplicate")
            super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            self._check_parameters(index, self.param_groups[-1])
            self._check_group(index, self.param_groups[-1])
        except BaseException:
            self.param_groups.pop()  # refused: not added
            raise
        self._init_state(self.param_groups[-1])

    def _check_parameters(self, index: int, group: dict[str, Any]) -> None:
        """Real floating-point parameters, each once: the per-layer norms and rates are defined for those (a
        parameter listed twice would be stepped twice per step, differently by each implementation)."""
        seen: set[int] = set()
        for j, p in enumerate(group["params"]):
            if id(p) in seen:
                raise ValueError(f"parameter {_label(group, index, j)} appears twice in its group; list it once")
            seen.add(id(p))
            if not p.is_floating_point():
                raise TypeError(f"parameter {_label(group, index, j)} is {p.dtype}: {type(self).__name__} takes "
                                "real floating-point parameters (for a complex one, optimize torch.view_as_real "
                                "of it)")

    def _check_group(self, index: int, group: dict[str, Any]) -> None:
        """Check one group's hyperparameters on the host (no device synchronisation)."""
        where = f"group {index}: "
        if group.get("optimizer", self._state_kind) != self._state_kind:
            raise ValueError(f'{where}optimizer is {group["optimizer"]!r}, this optimizer is a {self._state_kind}')
        check_lr(where, group["lr"])
        check_hyperparameter(f"{where}weight_decay", group["weight_decay"], low=0.0)
        if group["on_nonfinite"] not in ("raise", "skip"):
            raise ValueError(f'{where}on_nonfinite must be "raise" or "skip", got {group["on_nonfinite"]!r}')
        for flag in ("nesterov", "exclude_1d", "decay_1d"):
            if flag in group and not isinstance(group[flag], bool):
                raise TypeError(f"{where}{flag} must be a bool, got {group[flag]!r}")

    def _check_momentum_group(self, where: str, group: dict[str, Any]) -> None:
        check_scalar(f"{where}momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_hyperparameter(f"{where}eta", group["eta"], low=0.0, low_open=True)
        check_hyperparameter(f"{where}eps", group["eps"], low=0.0)
        if group["max_ratio"] is not None:
            check_hyperparameter(f"{where}max_ratio", group["max_ratio"], low=0.0, low_open=True)
        if not isinstance(group["larc_clip"], bool):
            raise TypeError(f"{where}larc_clip must be a bool, got {group['larc_clip']!r}")
        if group["larc_clip"] and group["max_ratio"] is not None:
            raise ValueError(f"{where}larc_clip and max_ratio cannot be combined: LARC clips the rate at lr")
        if group["weight_decay_form"] not in ("sum_of_norms", "norm_of_sum"):
            raise ValueError(f'{where}weight_decay_form must be "sum_of_norms" or "norm_of_sum", '
                             f'got {group["weight_decay_form"]!r}')

    # ---- state ------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state, refusing one from another optimizer or with a parameter missing (the message says which).

        A refused state leaves the optimizer as it was."""
        before = self.state, self.param_groups  # torch's load replaces both objects; they stay intact
        try:
            load_checked(self, state_dict)
            for i, group in enumerate(self.param_groups):
                self._check_group(i, group)
        except BaseException:
            self.state, self.param_groups = before
            raise
        for group in self.param_groups:
            self._init_state(group)  # entries a state saved before its first step lacks

    def _steps(self, gathered: Gathered) -> list[Any]:
        """Each parameter's step count before this step (compiled: a copy, as the count is then increased)."""
        steps = [st["step"] for st in gathered.states]
        return [s.clone() for s in steps] if _compiling() else steps

    def _init_state(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32)
            self._init_buffers(st, p)

    def _init_buffers(self, st: dict[str, Any], p: torch.Tensor) -> None:
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # ---- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None, *, norm_stats: Any = None) -> Any:
        """Perform one step of every group, or of none.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss (as in torch.optim).
        norm_stats : lwrs.NormStatistics or dict, optional
            CLARS's per-sample statistics: a :class:`lwrs.NormStatistics` with one entry per parameter that has
            a gradient (all groups, in order), or a dict ``param -> (S1, S2)``. Else CLARS reads its ``norm_source``.
        """
        loss = None
        if _compiling():
            quiet_array_api_compat()
        go, undo = from_grad_scaler(self, norm_stats)
        if not go:  # GradScaler.step found an inf: skipped
            return loss
        if undo is None:
            loss, gathered, plans, ok = self._prepare(closure, norm_stats)
        else:
            try:
                loss, gathered, plans, ok = self._prepare(closure, norm_stats)
            except BaseException:
                undo()  # refused before any update: the gradients as GradScaler handed them over
                raise
        if ok is False:  # skipped on the host: nothing changes
            self._diagnostics[0] = [p.diagnostics._replace(skipped=True, rates=torch.zeros_like(p.diagnostics.rates))
                                    for p in plans]
            return loss
        for g, plan in zip(gathered, plans):
            self._apply(g, plan, None if ok is True else ok)
            counts = [st["step"] for st in g.states]
            if ok is True and not _compiling():
                _increment(counts, self._impl(g))
            else:
                for c in counts:
                    c += 1 if ok is True else ok.to(c.dtype)
        # kept in a one-item box: torch.compile keeps this mutation (not an optimizer attribute's rebinding),
        # and guards only on the box's length, so a new list each step does not recompile
        self._diagnostics[0] = [p.diagnostics if ok is True else p.diagnostics._replace(skipped=~ok) for p in plans]
        return loss

    def _prepare(self, closure: Any, norm_stats: Any) -> tuple[Any, list[Gathered], list[Any], bool | torch.Tensor]:
        """Everything a step does before it changes anything: the closure, the gathering and checks of every
        group, the plans, and the decision (``_decide``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gathered = gather(self)  # refuses sparse gradients, naming group and parameter
        for g in gathered:
            self._check_group(g.index, g.group)
        gathered = [g for g in gathered if g.params]
        stats = group_statistics(self, gathered, norm_stats)
        plans = [self._plan(g, s) for g, s in zip(gathered, stats)]
        if not _compiling():
            for g, s, plan in zip(gathered, stats, plans):
                if s is not None and self._uses_statistics:
                    check_statistics_values(g, s, plan.diagnostics, self._statistics_denominators(g, plan))
        return loss, gathered, plans, self._decide(gathered, plans)

    _uses_statistics = False

    def _statistics_denominators(self, g: Gathered, plan: Any) -> torch.Tensor:
        return plan.diagnostics.grad_norms

    def _decide(self, gathered: list[Gathered], plans: list[Any]) -> bool | torch.Tensor:
        """``True`` (go), ``False`` (skip, decided on the host) or a 0-d bool tensor (skip with ``where``).

        ``on_nonfinite="raise"`` reads one flag on the host and raises naming the first bad
        value; ``"skip"`` does the same in eager mode, and under ``torch.compile`` keeps the
        flag on the device (no host synchronisation, no graph break).
        """
        if not plans:
            return True
        finite = torch.stack([p.finite for p in plans]).all()
        policies = {g.group["on_nonfinite"] for g in gathered}
        if _compiling() and policies == {"skip"}:
            return finite
        if bool(finite):
            return True
        for g, plan in zip(gathered, plans):
            problem = F.first_problem(plan.checks, g.labels)
            if problem is not None:
                if g.group["on_nonfinite"] == "raise":
                    raise lwrs.NonFiniteError(f"{problem} at step {plan.diagnostics.step}; no group was updated; "
                                              "pass on_nonfinite='skip' to skip such steps")
        return False

    # ---- the mNAG family ------------------------------------------------------------------------

    kind = "none"

    def _trust(self, group: dict[str, Any]) -> TrustOptions:
        return TrustOptions(self.kind, group["eta"], group["eps"], group["max_ratio"], group["larc_clip"],
                            group["weight_decay_form"])

    def _lr(self, gathered: Gathered) -> Any:
        return gathered.group["lr"]

    def _plan(self, g: Gathered, stats: Any) -> F.MomentumPlan:
        group = g.group
        adapt, decay = one_d_masks(g.params, exclude_1d=group["exclude_1d"], decay_1d=group["decay_1d"])
        decays = [group["weight_decay"] if d else 0.0 for d in decay]
        options = self._trust(group)
        if options.kind == "clars" and stats is None:
            raise ValueError(f"group {g.index}: CLARS needs per-sample norm statistics: pass norm_source= or "
                             "step(norm_stats=...)")
        bufs = [st["momentum_buffer"] for st in g.states]
        check_state_like(g, "momentum_buffer", bufs)
        dtype = F._stat_dtype(g.params)
        mean = None if stats is None else (stats.sum_norms / stats.count).to(dtype)
        steps = self._steps(g)
        step = steps[0] if _compiling() else int(steps[0])
        layouts = _layouts(g)  # DTensors: local shards, whole-layer norms (one collective)
        L = _local if layouts is not None else list
        impl = self._impl(g)
        try:
            return F.plan_momentum(L(g.params), L(g.grads), L(bufs), lr=self._lr(g), momentum=group["momentum"],
                                   nesterov=group["nesterov"], options=options, adapt=adapt, decays=decays,
                                   mean_norms=mean, step=step, implementation=impl, layouts=layouts)
        except RuntimeError:
            if impl == "fused":  # the compiled kernels check every layer; say which parameter they refused
                from . import fused

                fused.check_fusable(g.params, g.grads, g.labels, bufs)
            raise

    def _impl(self, g: Gathered) -> str:
        impl = self.implementation
        return "foreach" if impl == "fused" and g.sharded else impl  # DTensors: the fused kernels take foreach

    def _apply(self, g: Gathered, plan: Any, ok: torch.Tensor | None) -> None:
        bufs = [st["momentum_buffer"] for st in g.states]
        L = _local if _layouts(g) is not None else list
        F.apply_momentum(L(g.params), L(g.grads), L(bufs), plan.diagnostics.rates, plan.decays,
                         momentum=g.group["momentum"], nesterov=g.group["nesterov"], implementation=self._impl(g),
                         ok=ok)


def _increment(counts: list[torch.Tensor], impl: str) -> None:
    """Every step count + 1: the fused extension's loop where it is in use (on the CPU, one multi-tensor call
    still dispatches once per count), else one multi-tensor call."""
    if impl == "fused":
        from . import fused

        try:
            fused.load().increment(counts)
            return
        except RuntimeError:  # a count the loop does not take (not a one-element CPU tensor): checked before any
            pass
    # a list of 0-d ones, not the number 1: on the CPU a number costs a conversion per count
    ones = {key: torch.ones((), dtype=key[0], device=key[1]) for key in {(c.dtype, c.device) for c in counts}}
    torch._foreach_add_(counts, [ones[c.dtype, c.device] for c in counts])


def _layouts(g: Gathered) -> list[torch.Tensor] | None:
    """The group's parameters when they are DTensors (FSDP2, tensor parallel), else None."""
    return g.params if g.sharded else None


def _momentum_defaults(lr, momentum, weight_decay, nesterov, exclude_1d, decay_1d, on_nonfinite, **more):
    out = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, exclude_1d=exclude_1d,
               decay_1d=decay_1d, on_nonfinite=on_nonfinite, eta=1.0, eps=0.0, max_ratio=None, larc_clip=False,
               weight_decay_form="sum_of_norms")
    out.update(more)
    return out


class MNAG(_Layerwise):
    __doc__ = r"""mNAG (CLARS eq. 2/4) as a torch optimizer: one rate for every layer, the rate inside the buffer.

    .. math:: d_t = \beta d_{t-1} - \gamma_t(\bar g_t + \lambda w_t), \quad
              w_{t+1} = w_t - \gamma_t(\bar g_t + \lambda w_t) + \beta d_t

    With a constant ``lr`` this equals ``torch.optim.SGD(momentum, nesterov=True)``.

    Parameters
    ----------
    params : iterable
        Parameters, ``named_parameters()`` or dicts of groups.""" + COMMON_DOC + r"""

    Examples
    --------
    >>> import torch
    >>> from lwrs.backends.torch import MNAG
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = MNAG([w], lr=0.1, momentum=0.9)
    >>> w.grad = torch.ones(2); opt.step(); w.data
    tensor([0.8100, 0.8100])
    """

    kind = "none"
    _state_kind = "MNAG"

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor, momentum: float = _default("mnag", "beta"), *,
                 weight_decay: float = _default("mnag", "weight_decay"), nesterov: bool = _default("mnag", "nesterov"),
                 decay_1d: bool = True, on_nonfinite: str = _default("mnag", "on_nonfinite"),
                 foreach: bool | None = None, fused: bool = False):
        defaults = _momentum_defaults(lr, momentum, weight_decay, nesterov, False, decay_1d, on_nonfinite)
        super().__init__(params, defaults, foreach=foreach, fused=fused)

    def _check_group(self, index, group):
        super()._check_group(index, group)
        self._check_momentum_group(f"group {index}: ", group)


class LARS(MNAG):
    __doc__ = r"""LARS (You et al. 2017; CLARS eq. 3) on mNAG, as a torch optimizer.

    .. math:: \gamma_k = \gamma_t\,\eta\,\frac{\|w_k\|}{\|\bar g_k\| + \lambda\|w_k\| + \epsilon}

    Parameters
    ----------
    params : iterable
        Parameters, ``named_parameters()`` or dicts of groups.""" + COMMON_DOC + TRUST_DOC + r"""
    norm_source, grad_scaler
        Only for CLARS.

    Examples
    --------
    >>> import torch
    >>> from lwrs.backends.torch import LARS
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = LARS(model.named_parameters(), lr=1.0, eta=1e-3, weight_decay=5e-4)
    >>> model(torch.randn(8, 4)).sum().backward(); opt.step()
    >>> opt.diagnostics[0].trust_ratios.shape
    torch.Size([2])
    """

    kind = "lars"
    _state_kind = "LARS"

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor, momentum: float = _default("lars", "beta"), *,
                 eta: float = _default("lars", "eta"), weight_decay: float = _default("lars", "weight_decay"),
                 weight_decay_form: str = _default("lars", "weight_decay_form"), eps: float = _default("lars", "eps"),
                 max_ratio: float | None = _default("lars", "max_ratio"),
                 larc_clip: bool = _default("lars", "larc_clip"), exclude_1d: bool = True, decay_1d: bool = True,
                 nesterov: bool = _default("lars", "nesterov"), on_nonfinite: str = _default("lars", "on_nonfinite"),
                 foreach: bool | None = None, fused: bool = False, norm_source: Any = None, grad_scaler: Any = None):
        defaults = _momentum_defaults(lr, momentum, weight_decay, nesterov, exclude_1d, decay_1d, on_nonfinite,
                                      eta=eta, eps=eps, max_ratio=max_ratio, larc_clip=larc_clip,
                                      weight_decay_form=weight_decay_form)
        _Layerwise.__init__(self, params, defaults, foreach=foreach, fused=fused, norm_source=norm_source,
                            grad_scaler=grad_scaler)


class CLARS(LARS):
    __doc__ = r"""CLARS (CLARS eq. 5, Algorithm 1) on mNAG, as a torch optimizer.

    .. math:: \gamma_k = \gamma_t\,\eta\,\frac{\|w_k\|}{\frac1B\sum_i\|g_{ik}\| + \lambda\|w_k\| + \epsilon}

    The per-sample term comes from ``norm_source`` (e.g. a
    :class:`~lwrs.backends.torch.PerSampleNorms`) or from ``step(norm_stats=...)``, a
    :class:`lwrs.NormStatistics` (``S1 = sum_i |g_i|``, ``count = N``). Statistics that
    cannot come from the gradient (mean per-sample norm below the gradient's norm beyond
    rounding, negative sums, a count that is not a positive finite number, wrong shapes) are
    refused before any group is updated.

    Parameters
    ----------
    params : iterable
        Parameters, ``named_parameters()`` or dicts of groups.""" + COMMON_DOC + TRUST_DOC + r"""
    norm_source : object, optional
        Has ``norm_statistics(params, scale=...)``, and ``reset()`` (called by ``zero_grad``).
    grad_scaler : torch.amp.GradScaler, optional
        With mixed precision: the statistics are unscaled by its current scale. ``GradScaler.step``
        hands its scale to CLARS, so it is needed only where ``GradScaler.unscale_`` runs before
        (e.g. to clip gradients); without it that step is refused.

    Examples
    --------
    >>> import torch, lwrs
    >>> from lwrs.backends.torch import CLARS
    >>> w = torch.nn.Parameter(torch.ones(2, 2))
    >>> opt = CLARS([w], lr=1.0, eta=0.01)
    >>> w.grad = torch.full((2, 2), 0.5)
    >>> stats = lwrs.NormStatistics(torch.tensor([2.0]), torch.tensor([4.0]), 1)   # mean |g_i| = 2
    >>> opt.step(norm_stats=stats); opt.diagnostics[0].clars_factors
    tensor([0.5000])
    """

    kind = "clars"
    _state_kind = "CLARS"
    _uses_statistics = True
    _step_supports_amp_scaling = True  # GradScaler.step passes its scale: see _groups.from_grad_scaler

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor, momentum: float = _default("clars", "beta"), *,
                 eta: float = _default("clars", "eta"), weight_decay: float = _default("clars", "weight_decay"),
                 weight_decay_form: str = _default("clars", "weight_decay_form"),
                 eps: float = _default("clars", "eps"), max_ratio: float | None = _default("clars", "max_ratio"),
                 larc_clip: bool = _default("clars", "larc_clip"), exclude_1d: bool = True, decay_1d: bool = True,
                 nesterov: bool = _default("clars", "nesterov"),
                 on_nonfinite: str = _default("clars", "on_nonfinite"), foreach: bool | None = None,
                 fused: bool = False, norm_source: Any = None, grad_scaler: Any = None):
        super().__init__(params, lr, momentum, eta=eta, weight_decay=weight_decay,
                         weight_decay_form=weight_decay_form, eps=eps, max_ratio=max_ratio, larc_clip=larc_clip,
                         exclude_1d=exclude_1d, decay_1d=decay_1d, nesterov=nesterov, on_nonfinite=on_nonfinite,
                         foreach=foreach, fused=fused, norm_source=norm_source, grad_scaler=grad_scaler)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and, like them, the per-sample statistics of ``norm_source``."""
        super().zero_grad(set_to_none=set_to_none)
        if self.norm_source is not None and hasattr(self.norm_source, "reset"):
            self.norm_source.reset()

    def _check_group(self, index, group):
        super()._check_group(index, group)
        if (self.norm_source is not None and group["weight_decay_form"] == "norm_of_sum"
                and float(group["weight_decay"]) != 0.0):
            raise ValueError(
                f"group {index}: weight_decay_form='norm_of_sum' with weight decay {group['weight_decay']} needs the "
                "norms of the decayed per-sample gradients g_i + weight_decay * w, and norm_source measures the "
                "undecayed ones; use weight_decay_form='sum_of_norms' (the CLARS paper's eq. 5), or leave out "
                "norm_source and pass step(norm_stats=...) of the decayed per-sample gradients")

    def _statistics_denominators(self, g, plan):
        # the mean per-sample norm bounds the norm of the mean: |g| (or |g + lambda w| in the norm_of_sum form)
        return plan.diagnostics.grad_norms if g.group["weight_decay_form"] == "sum_of_norms" else plan.direction_norms


class TVLARS(LARS):
    __doc__ = r"""TVLARS (TVLARS Algorithm 1) on mNAG: LARS with :math:`\gamma_t = \gamma_{target}\,\phi_t`.

    .. math:: \phi_t = \frac{1}{\alpha + e^{\lambda(t - d_e)}} + \gamma_{\min}

    :math:`\phi_t` is the core's :func:`lwrs.schedules.tvlars_factor` at each parameter's step count.

    Parameters
    ----------
    params : iterable
        Parameters, ``named_parameters()`` or dicts of groups.
    decay_coefficient : float
        :math:`\lambda \ge 0`, the decay coefficient of :math:`\phi_t`.
    delay_steps : float
        :math:`d_e`, the delay in steps.
    alpha : float
        :math:`\alpha > 0` (the paper uses 1).
    gamma_min : float
        :math:`\gamma_{\min} \ge 0`, the floor of :math:`\phi_t`.""" + COMMON_DOC + TRUST_DOC.split(
        "    max_ratio")[0] + r"""    exclude_1d : bool
        Keep 1-D tensors at ratio 1.

    Examples
    --------
    >>> import torch
    >>> from lwrs.backends.torch import TVLARS
    >>> w = torch.nn.Parameter(torch.ones(2, 2))
    >>> opt = TVLARS([w], lr=1.0, decay_coefficient=0.01, delay_steps=0)
    >>> w.grad = torch.ones(2, 2); opt.step(); opt.diagnostics[0].learning_rate
    0.5
    """

    _state_kind = "TVLARS"

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor, momentum: float = _default("tvlars", "beta"), *,
                 decay_coefficient: float, delay_steps: float, alpha: float = _default("tvlars", "alpha"),
                 gamma_min: float = _default("tvlars", "gamma_min"), eta: float = _default("tvlars", "eta"),
                 weight_decay: float = _default("tvlars", "weight_decay"),
                 weight_decay_form: str = _default("tvlars", "weight_decay_form"),
                 eps: float = _default("tvlars", "eps"), exclude_1d: bool = True, decay_1d: bool = True,
                 nesterov: bool = _default("tvlars", "nesterov"),
                 on_nonfinite: str = _default("tvlars", "on_nonfinite"), foreach: bool | None = None,
                 fused: bool = False):
        defaults = _momentum_defaults(lr, momentum, weight_decay, nesterov, exclude_1d, decay_1d, on_nonfinite,
                                      eta=eta, eps=eps, weight_decay_form=weight_decay_form,
                                      decay_coefficient=decay_coefficient, delay_steps=delay_steps, alpha=alpha,
                                      gamma_min=gamma_min)
        _Layerwise.__init__(self, params, defaults, foreach=foreach, fused=fused)

    def _phi(self, group):
        return lwrs.schedules.tvlars_factor(decay_coefficient=group["decay_coefficient"],
                                            delay_steps=group["delay_steps"], alpha=group["alpha"],
                                            gamma_min=group["gamma_min"])

    def _check_group(self, index, group):
        super()._check_group(index, group)
        try:
            self._phi(group)
        except (TypeError, ValueError) as err:
            raise type(err)(f"group {index}: {err}") from None

    def _lr(self, g):
        phi = self._phi(g.group)
        steps = self._steps(g)
        # compiled, a step count stays a tensor where the core's schedule takes one (else a graph break here)
        factors = [phi(s if _compiling() and _TRACEABLE_SCHEDULES else int(s)) for s in steps]
        dtype = F._stat_dtype(g.params)
        if not _compiling() and len(set(factors)) == 1:  # the usual case: one step count, one global rate
            return g.group["lr"] * factors[0]
        if _compiling():
            return g.group["lr"] * torch.stack([torch.as_tensor(f, dtype=dtype) for f in factors])
        return torch.as_tensor(g.group["lr"], dtype=dtype) * torch.tensor(factors, dtype=dtype)


class LAMB(_Layerwise):
    __doc__ = r"""LAMB (You et al. 2019) as a torch optimizer (``foreach`` kernels or the reference).

    .. math:: u = \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \lambda w, \quad
              w \leftarrow w - \gamma_t \frac{\|w\|}{\|u\|} u

    Parameters
    ----------
    params : iterable
        Parameters, ``named_parameters()`` or dicts of groups.
    lr : float or 0-d tensor
        The global rate :math:`\gamma_t`.
    betas : (float, float)
        Adam's :math:`\beta_1, \beta_2 \in [0, 1)`.
    eps : float
        Adam's :math:`\epsilon > 0`.
    weight_decay : float
        :math:`\lambda \ge 0`, decoupled (added to the direction).
    exclude_1d : bool
        Keep 1-D tensors at ratio 1.
    decay_1d : bool
        Whether 1-D tensors get weight decay.
    on_nonfinite : {"raise", "skip"}
        As in :class:`LARS`.
    foreach : bool or None
        ``False`` for the per-tensor reference kernels.

    Examples
    --------
    >>> import torch
    >>> from lwrs.backends.torch import LAMB
    >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    >>> opt = LAMB([w], lr=0.1)
    >>> w.grad = torch.tensor([[1.0, -1.0]]); opt.step(); int(opt.state[w]["step"])
    1
    """

    _state_kind = "LAMB"
    _state_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor,
                 betas: tuple[float, float] = (_default("lamb", "beta1"), _default("lamb", "beta2")), *,
                 eps: float = _default("lamb", "eps"), weight_decay: float = _default("lamb", "weight_decay"),
                 exclude_1d: bool = True, decay_1d: bool = True, on_nonfinite: str = _default("lamb", "on_nonfinite"),
                 foreach: bool | None = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, exclude_1d=exclude_1d,
                        decay_1d=decay_1d, on_nonfinite=on_nonfinite)
        super().__init__(params, defaults, foreach=foreach, fused=False)

    def _check_group(self, index, group):
        super()._check_group(index, group)
        where = f"group {index}: "
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
        for k, b in enumerate(betas):
            check_scalar(f"{where}betas[{k}]", b, low=0.0, high=1.0, high_open=True)
        check_hyperparameter(f"{where}eps", group["eps"], low=0.0, low_open=True)

    def _init_buffers(self, st, p):
        if "exp_avg" not in st:
            warn_float16([p.dtype])
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _plan(self, g, stats):
        group = g.group
        adapt, decay = one_d_masks(g.params, exclude_1d=group["exclude_1d"], decay_1d=group["decay_1d"])
        decays = [group["weight_decay"] if d else 0.0 for d in decay]
        steps = [s if _compiling() else int(s) for s in self._steps(g)]
        mean = None if stats is None else (stats.sum_norms / stats.count).to(F._stat_dtype(g.params))
        m, v = ([st[key] for st in g.states] for key in ("exp_avg", "exp_avg_sq"))
        check_state_like(g, "exp_avg", m)
        check_state_like(g, "exp_avg_sq", v)
        L = _local  # DTensors: local shards, whole-layer norms
        return F.plan_lamb(L(g.params), L(g.grads), L(m), L(v), lr=group["lr"],
                               betas=tuple(group["betas"]), eps=group["eps"], adapt=adapt, decays=decays,
                               steps=steps, mean_norms=mean, implementation=self.implementation, layouts=_layouts(g))

    def _apply(self, g, plan, ok):
        F.apply_lamb(_local(g.params), _local([st["exp_avg"] for st in g.states]),
                         _local([st["exp_avg_sq"] for st in g.states]), plan, ok)
