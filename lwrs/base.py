r"""The functional optimizer type, its states, and the step shared by every optimizer.

An :class:`Optimizer` is three pure functions::

    state = opt.init(params)
    params, state, diagnostics = opt.step(params, grads, state, norm_stats=None)
    updates, state, diagnostics = opt.update(grads, state, params, norm_stats=None)   # optax order

``params`` and ``grads`` are pytrees (any nesting of lists, tuples, dicts and
NamedTuples, see :mod:`lwrs.pytree`) of per-layer arrays from one array-API
library; one leaf is one layer. Results come back in the caller's structure;
the state holds one array per leaf, in leaf order. ``update`` returns the
increments :math:`\Delta w_k`, computed directly, so that
``params + updates`` is exactly what ``step`` returns:

.. math:: w_{t+1,k} = w_{t,k} + \Delta w_k

Torch tensors that require grad are detached on the way in: a functional
step keeps no autograd graph (differentiate through a step with JAX).

The step count in the state may be a Python int (eager; the default) or a
0-d integer array (``init(params, step=xp.asarray(0))``, or anything traced
by ``jax.jit``/``torch.compile``): then schedules are array arithmetic and
``on_nonfinite="skip"`` selects with ``where``, with no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from array_api_compat import array_namespace, is_array_api_obj

from ._validation import (
    NonFiniteError,
    check_hyperparameter,
    check_layers,
    check_same_structure,
    check_step,
    flatten_layers,
    is_traced,
)
from .diagnostics import LayerDiagnostics
from .masks import adapt_default, resolve_mask, weight_decay_default
from .nonfinite import (
    STEP_SIZE,
    all_finite,
    first_nonfinite,
    select,
    skipped_diagnostics,
    step_after,
    step_size_check,
    where_skipped_diagnostics,
)
from .norm_statistics import NormStatistics, check_statistics, mean_norms_checked
from .pytree import Structure, leaf_names, unflatten
from .rates import _layer_norms
from .schedules import Schedule, as_schedule

__all__ = ["Optimizer", "StepResult", "MomentumState", "LambState", "OnNonFinite", "LayerMask"]

OnNonFinite = Literal["raise", "skip"]
LayerMask = Any  # a pytree of bools matching params, a callable array -> bool, or None


class MomentumState(NamedTuple):
    r"""State of mgd, mnag, lars, clars and tvlars.

    Attributes
    ----------
    step : int or 0-d integer array
        Number of updates made so far, :math:`t`.
    trace : tuple of arrays
        :math:`d_{t-1} = v_t - v_{t-1}`, the trace of rate-scaled steps
        (see :mod:`lwrs.momentum`), one per layer in leaf order.
    """

    step: Any
    trace: tuple[Any, ...]


class LambState(NamedTuple):
    r"""State of LAMB.

    Attributes
    ----------
    step : int or 0-d integer array
        Number of updates made so far.
    first_moment : tuple of arrays
        Adam's moving average of the gradients, :math:`m`.
    second_moment : tuple of arrays
        Adam's moving average of the squared gradients, :math:`v`.
    """

    step: Any
    first_moment: tuple[Any, ...]
    second_moment: tuple[Any, ...]


class StepResult(NamedTuple):
    """What :attr:`Optimizer.step` returns: unpack it as ``params, state, diagnostics``."""

    params: Any
    state: Any
    diagnostics: LayerDiagnostics


class Optimizer(NamedTuple):
    """A functional optimizer: ``init``, ``step`` and ``update``.

    Attributes
    ----------
    name : str
        Short name, e.g. ``"clars"`` (the key of :mod:`lwrs.table`).
    init : callable
        ``init(params, *, step=0) -> state``; ``step`` may be a 0-d integer array.
    step : callable
        ``step(params, grads, state, *, norm_stats=None) -> StepResult``.
    update : callable
        ``update(grads, state, params, *, norm_stats=None) -> (updates, state, diagnostics)``,
        with ``params + updates`` equal to ``step``'s new params.

    Examples
    --------
    >>> import numpy as np, lwrs
    >>> opt = lwrs.mnag(0.1)
    >>> params = {"w": np.array([1.0, -1.0])}
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...     params, state, diag = opt.step(params, {"w": 2 * params["w"]}, state)   # f = |w|^2
    >>> opt.name, state.step, bool(abs(params["w"][0]) < 1.0)
    ('mnag', 3, True)
    >>> updates, _, _ = opt.update({"w": 2 * params["w"]}, state, params)
    >>> new, _, _ = opt.step(params, {"w": 2 * params["w"]}, state)
    >>> bool(np.all(params["w"] + updates["w"] == new["w"]))
    True
    """

    name: str
    init: Callable[..., Any]
    step: Callable[..., StepResult]
    update: Callable[..., tuple[Any, Any, LayerDiagnostics]]


@dataclass(frozen=True)
class Common:
    """Options every optimizer shares, checked once at construction (private)."""

    learning_rate: Schedule
    weight_decay: float
    adapt_mask: LayerMask
    weight_decay_mask: LayerMask
    on_nonfinite: str

    @staticmethod
    def build(learning_rate, weight_decay, adapt_mask, weight_decay_mask, on_nonfinite) -> Common:
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f'on_nonfinite must be "raise" or "skip", got {on_nonfinite!r}')
        return Common(
            as_schedule("learning_rate", learning_rate),
            check_hyperparameter("weight_decay", weight_decay, low=0.0),
            adapt_mask,
            weight_decay_mask,
            on_nonfinite,
        )

    def masks(self, params: Sequence[Any]) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
        adapt = resolve_mask("adapt_mask", self.adapt_mask, params, adapt_default)
        decay = resolve_mask("weight_decay_mask", self.weight_decay_mask, params, weight_decay_default)
        return adapt, decay

    def layer_decays(self, decay: Sequence[bool]) -> tuple[float, ...]:
        return tuple(self.weight_decay if d else 0.0 for d in decay)

    def rate(self, xp: Any, step: Any, dtype: Any) -> Any:
        """The global rate at ``step``: a float, or a 0-d array of ``dtype`` for an array step."""
        if is_array_api_obj(step):
            step = xp.astype(step, dtype)
        lr = self.learning_rate(step)
        if is_array_api_obj(lr) and lr.dtype != dtype:
            lr = xp.astype(lr, dtype)
        return lr


class Transition(NamedTuple):
    """One step's outcome on the flat layers (private): ``increments is None`` means skipped eagerly."""

    increments: tuple[Any, ...] | None
    state: Any
    diagnostics: LayerDiagnostics


class Checked(NamedTuple):
    """What every step computes before its own math (private)."""

    xp: Any
    step: Any
    adapt: tuple[bool, ...]
    decays: tuple[float, ...]
    lr: Any
    w_norms: Any
    g_norms: Any
    mean_norms: Any
    ok: Any  # None, or a 0-d bool array for the where-based skip
    skip_now: bool  # skipped eagerly: return the inputs
    state_norms: dict[str, Any]  # per-layer norms of each state sequence
    on_nonfinite: str
    names: Any  # the layers' pytree paths, or None for a flat list


def check_state(state: Any, cls: type) -> Any:
    if not isinstance(state, cls):
        raise TypeError(f"state must be a {cls.__name__} (from this optimizer's init), got {type(state).__name__}")
    return check_step(state.step)


STATE_CHECKS = {"trace": "momentum buffer norm", "first_moment": "first moment norm",
                "second_moment": "second moment norm"}


def prepare(common: Common, params, grads, state, norm_stats, arrays: dict[str, Any], needs_stats: str = "",
            names: Any = None) -> Checked:
    """Checks, masks, norms, the global rate and the non-finite policy on the inputs and the state (private)."""
    t = state.step
    xp, dev = check_layers(params, names, grads=grads, **arrays)
    if needs_stats and norm_stats is None:
        raise ValueError(f"{needs_stats} needs norm_stats, the per-sample gradient-norm statistics of this batch")
    if norm_stats is not None:
        check_statistics(norm_stats, len(params), xp, dev)
    adapt, decay = common.masks(params)
    w_norms = _layer_norms(xp, params)
    g_norms = _layer_norms(xp, grads)
    lr = common.rate(xp, t, w_norms.dtype)
    checks = [("parameter norm", w_norms), ("gradient norm", g_norms)]
    mean_norms = None
    if norm_stats is not None:
        mean_norms = mean_norms_checked(xp, norm_stats, w_norms.dtype, names)
        checks.append(("mean per-sample gradient norm", mean_norms))
    state_norms = {name: _layer_norms(xp, a) for name, a in arrays.items()}
    checks += [(STATE_CHECKS[name], n) for name, n in state_norms.items()]
    ok, skip_now = nonfinite_policy(common.on_nonfinite, xp, checks, t, names)
    return Checked(xp, t, adapt, common.layer_decays(decay), lr, w_norms, g_norms, mean_norms, ok, skip_now,
                   state_norms, common.on_nonfinite, names)


def check_step_size(c: Checked, rates: Any, bounds: Any, dtypes: Sequence[Any], extra: Sequence[Any] = ()) -> Checked:
    """The policy again, on the step's size (a step that would overflow its dtype); combines the flags (private)."""
    checks = [*extra, (STEP_SIZE, step_size_check(rates, bounds, dtypes, xp=c.xp))]
    ok, skip_now = nonfinite_policy(c.on_nonfinite, c.xp, checks, c.step, c.names)
    if c.ok is not None and ok is not None:
        ok = c.ok & ok
    elif c.ok is not None:
        ok = c.ok
    return c._replace(ok=ok, skip_now=skip_now)


def nonfinite_policy(on_nonfinite: str, xp: Any, checks: list[tuple[str, Any]], step: Any,
                     names: Any = None) -> tuple[Any, bool]:
    """``(ok, skip_now)``: raise, skip eagerly (one host sync), or a device flag for a where-based skip."""
    values = [v for _, v in checks]
    traced = any(is_traced(v) for v in values)
    if on_nonfinite == "raise":
        if traced:
            raise TypeError(
                'on_nonfinite="raise" cannot check traced values (jax.jit, vmap, grad, torch.compile): raising '
                'needs the values on the host. Pass on_nonfinite="skip", which skips a non-finite step with '
                "where() and needs no host synchronisation"
            )
        problem = first_nonfinite(checks, xp=xp, names=names)
        if problem is not None:
            raise NonFiniteError(f"{problem} at step {step}; pass on_nonfinite='skip' to skip such steps")
        return None, False
    if not traced and not is_array_api_obj(step):
        return None, first_nonfinite(checks, xp=xp) is not None
    return all_finite(values, xp=xp), False


def finish(c: Checked, increments, new_state_arrays, old_state_arrays, make_state, diag) -> Transition:
    """Apply the where-based skip (if any) to the increments, the state and the diagnostics (private)."""
    if c.ok is None:
        return Transition(tuple(increments), make_state(c.step + 1, *new_state_arrays), diag)
    xp = c.xp
    increments = select(c.ok, increments, [0.0] * len(increments), xp=xp)
    arrays = [select(c.ok, new, old, xp=xp) for new, old in zip(new_state_arrays, old_state_arrays)]
    return Transition(increments, make_state(step_after(c.ok, c.step, xp=xp), *arrays),
                      where_skipped_diagnostics(c.ok, diag))


def skipped_now(c: Checked, state: Any) -> Transition:
    return Transition(None, state, skipped_diagnostics(c.w_norms, c.g_norms, c.lr, c.step))


def functional(name: str, init_arrays: Callable[[Any, list[Any], Any], Any],
               transition: Callable[..., Transition]) -> Optimizer:
    """Wrap a flat-layer transition into ``init``/``step``/``update`` on pytrees (private)."""

    def init(params: Any, *, step: Any = 0) -> Any:
        leaves, _ = flatten_layers("params", params)
        leaves = detached(leaves)
        xp, _ = check_layers(leaves)
        return init_arrays(xp, leaves, check_step(step, "step"))

    def _run(params, grads, state, norm_stats) -> tuple[list[Any], Structure, Transition]:
        leaves, structure = flatten_layers("params", params)
        grad_leaves, grad_structure = flatten_layers("grads", grads)
        if len(grad_leaves) == len(leaves):  # (another count is refused by the layer checks, with the counts)
            check_same_structure("grads", structure, grad_structure)
        leaves, grad_leaves = detached(leaves), detached(grad_leaves)
        if isinstance(state, (MomentumState, LambState)) and any(
                getattr(a, "requires_grad", False) for f in state[1:] for a in f):
            state = type(state)(state[0], *[tuple(detached(f)) for f in state[1:]])
        if isinstance(norm_stats, NormStatistics) and any(getattr(a, "requires_grad", False) for a in norm_stats):
            norm_stats = NormStatistics(*detached(norm_stats))
        return leaves, structure, transition(leaves, grad_leaves, state, norm_stats, leaf_names(structure))

    def step(params: Any, grads: Any, state: Any, *, norm_stats: Any = None) -> StepResult:
        leaves, structure, tr = _run(params, grads, state, norm_stats)
        new = leaves if tr.increments is None else _arrays(leaves, [w + d for w, d in zip(leaves, tr.increments)])
        return StepResult(unflatten(structure, new), _state_arrays(leaves, tr.state), tr.diagnostics)

    def update(grads: Any, state: Any, params: Any, *, norm_stats: Any = None) -> tuple[Any, Any, LayerDiagnostics]:
        leaves, structure, tr = _run(params, grads, state, norm_stats)
        if tr.increments is None:
            xp, _ = check_layers(leaves)
            increments = [xp.zeros_like(w) for w in leaves]
        else:
            increments = _arrays(leaves, list(tr.increments))
        return unflatten(structure, increments), _state_arrays(leaves, tr.state), tr.diagnostics

    return Optimizer(name, init, step, update)


def _arrays(leaves: Sequence[Any], values: Sequence[Any]) -> list[Any]:
    """``values``, a 0-d result that NumPy's operators gave as a scalar made a 0-d array again (private)."""
    if not any(getattr(w, "ndim", None) == 0 for w in leaves):
        return list(values)
    xp = array_namespace(*leaves)
    return [xp.asarray(v) if getattr(v, "ndim", None) == 0 else v for v in values]


def _state_arrays(leaves: Sequence[Any], state: Any) -> Any:
    """A state's per-layer tuples through :func:`_arrays` (private)."""
    if not isinstance(state, (MomentumState, LambState)) or not any(getattr(w, "ndim", None) == 0 for w in leaves):
        return state
    return type(state)(state[0], *[tuple(_arrays(leaves, f)) for f in state[1:]])


def detached(values: Sequence[Any]) -> list[Any]:
    """Torch tensors that require grad, detached: the functional core keeps no autograd graph (private).

    Without this, a step on ``model.parameters()`` would chain every step's
    result to the previous one through autograd, and memory would grow without
    bound. Arrays of other libraries pass unchanged.
    """
    return [v.detach() if getattr(v, "requires_grad", False) else v for v in values]


def zeros(xp: Any, leaves: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(xp.zeros_like(w) for w in leaves)
