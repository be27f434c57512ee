r"""The optimizers, as pure functional state transitions.

Each factory returns an :class:`Optimizer`, a pair of pure functions::

    state = opt.init(params)
    params, state, diagnostics = opt.step(params, grads, state, norm_stats=None)

``params`` and ``grads`` are sequences (lists or tuples) of per-layer arrays
from any array-API library (NumPy, PyTorch, CuPy, JAX, array-api-strict).
``step`` never modifies its inputs; it returns new arrays in the same library,
on the same device, with the same dtypes, and a
:class:`~lwrs.diagnostics.LayerDiagnostics`.

=========  ====================================================================
factory    update
=========  ====================================================================
mgd        :math:`w \leftarrow w - \gamma_t \bar g` (CLARS eq. 2 with :math:`\beta = 0`)
mnag       mNAG, CLARS eq. (2)/(4), one rate for all layers
lars       mNAG with :math:`\gamma_k = \gamma_t \eta \|w_k\| / D^{\mathrm{LARS}}_k` (eq. 3)
clars      mNAG with :math:`\gamma_k = \gamma_t \eta \|w_k\| / \frac1B\sum_i\|g_{ik}\|` (eq. 5)
tvlars     LARS with :math:`\gamma_t = \gamma_{target}\,\phi_t` (TVLARS Algorithm 1)
lamb       LAMB (You et al. 2019), the baseline of the TVLARS paper
=========  ====================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from ._validation import NonFiniteError, check_hyperparameter, check_layers
from .masks import adapt_default, resolve_mask, weight_decay_default
from .diagnostics import LayerDiagnostics
from .momentum import apply_momentum
from .schedules import Schedule, as_schedule, tvlars_factor
from .norm_statistics import NormStatistics, check_statistics
from .rates import (
    TrustOptions,
    WeightDecayForm,
    _layer_norms,
    clars_denominators,
    clars_factors,
    lars_denominators,
    layer_rates,
    layer_trust_ratios,
)

__all__ = [
    "Optimizer",
    "StepResult",
    "MomentumState",
    "LambState",
    "mgd",
    "mnag",
    "lars",
    "clars",
    "tvlars",
    "lamb",
]

OnNonFinite = Literal["raise", "skip"]
LayerMask = Sequence[bool] | Callable[[Any], bool] | None


class MomentumState(NamedTuple):
    r"""State of mgd, mnag, lars, clars and tvlars.

    Attributes
    ----------
    step : int
        Number of updates made so far, :math:`t`.
    trace : tuple of arrays
        :math:`d_{t-1} = v_t - v_{t-1}`, the trace of rate-scaled steps
        (see :mod:`lwrs.momentum`).
    """

    step: int
    trace: tuple[Any, ...]


class LambState(NamedTuple):
    r"""State of LAMB.

    Attributes
    ----------
    step : int
        Number of updates made so far.
    first_moment : tuple of arrays
        Adam's moving average of the gradients, :math:`m`.
    second_moment : tuple of arrays
        Adam's moving average of the squared gradients, :math:`v`.
    """

    step: int
    first_moment: tuple[Any, ...]
    second_moment: tuple[Any, ...]


class StepResult(NamedTuple):
    """What :attr:`Optimizer.step` returns: unpack it as ``params, state, diagnostics``."""

    params: tuple[Any, ...]
    state: Any
    diagnostics: LayerDiagnostics


class Optimizer(NamedTuple):
    """A functional optimizer: ``init(params) -> state`` and ``step(...) -> StepResult``.

    Attributes
    ----------
    name : str
        Short name, e.g. ``"clars"``.
    init : callable
        ``init(params) -> state``.
    step : callable
        ``step(params, grads, state, *, norm_stats=None) -> StepResult``.

    Examples
    --------
    >>> import numpy as np, lwrs
    >>> opt = lwrs.mnag(0.1)
    >>> params = [np.array([1.0, -1.0])]
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...     params, state, diag = opt.step(params, [2 * params[0]], state)   # f = |w|^2
    >>> opt.name, state.step, bool(abs(params[0][0]) < 1.0)
    ('mnag', 3, True)
    """

    name: str
    init: Callable[[Sequence[Any]], Any]
    step: Callable[..., StepResult]


@dataclass(frozen=True)
class _Common:
    """Options every optimizer shares, checked once at construction."""

    learning_rate: Schedule
    weight_decay: float
    adapt_mask: LayerMask
    weight_decay_mask: LayerMask
    on_nonfinite: str

    @staticmethod
    def build(learning_rate, weight_decay, adapt_mask, weight_decay_mask, on_nonfinite) -> _Common:
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f'on_nonfinite must be "raise" or "skip", got {on_nonfinite!r}')
        return _Common(
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


def _check_state_step(state: Any, cls: type) -> int:
    if not isinstance(state, cls):
        raise TypeError(f"state must be a {cls.__name__} (from this optimizer's init), got {type(state).__name__}")
    if isinstance(state.step, bool) or not isinstance(state.step, int) or state.step < 0:
        raise ValueError(f"state.step must be an int >= 0, got {state.step!r}")
    return state.step


def _first_nonfinite(xp: Any, checks: Sequence[tuple[str, Any]]) -> str | None:
    """Name the first layer whose value is not finite, or ``None``; one host sync when all are finite."""
    flags = [xp.all(xp.isfinite(v)) for _, v in checks]
    if all(bool(f) for f in flags):
        return None
    for (what, values), ok in zip(checks, flags):
        if not bool(ok):
            for k in range(values.shape[0]):
                if not bool(xp.isfinite(values[k])):
                    return f"layer {k}: {what} is not finite (value {float(values[k])!r})"
    return "a value is not finite"  # pragma: no cover - unreachable: some flag was False


def _skipped(params, state, step, lr, norms_w, norms_g, xp) -> StepResult:
    ones = xp.ones_like(norms_w)
    diag = LayerDiagnostics(norms_w, norms_g, ones, ones, xp.zeros_like(norms_w), lr, step, skipped=True)
    return StepResult(tuple(params), state, diag)


def _handle_nonfinite(common: _Common, xp, checks, params, state, step, lr, w_norms, g_norms):
    problem = _first_nonfinite(xp, checks)
    if problem is None:
        return None
    if common.on_nonfinite == "raise":
        raise NonFiniteError(f"{problem} at step {step}; pass on_nonfinite='skip' to skip such steps")
    return _skipped(params, state, step, lr, w_norms, g_norms, xp)


def _checked_mean_norms(xp, norm_stats, w_norms, checks):
    """The mean per-sample norms in the statistics dtype, queued for the finiteness check."""
    if norm_stats is None:
        return None
    mean_norms = xp.astype(norm_stats.mean_norms(), w_norms.dtype)
    checks.append(("mean per-sample gradient norm", mean_norms))
    return mean_norms


def _decayed_directions(params, grads, decays) -> tuple[Any, ...]:
    return tuple(g + wd * w if wd else g for w, g, wd in zip(params, grads, decays))


def _momentum_family(
    name: str, common: _Common, trust: TrustOptions, beta: float, nesterov: bool
) -> Optimizer:
    """Build mgd / mnag / lars / clars / tvlars around one step function."""

    def init(params: Sequence[Any]) -> MomentumState:
        xp, _ = check_layers(params)
        return MomentumState(0, tuple(xp.zeros_like(w) for w in params))

    def step(params, grads, state, *, norm_stats: NormStatistics | None = None) -> StepResult:
        t = _check_state_step(state, MomentumState)
        xp, dev = check_layers(params, grads=grads, trace=state.trace)
        if trust.kind == "clars" and norm_stats is None:
            raise ValueError("clars needs norm_stats, the per-sample gradient-norm statistics of this batch")
        if norm_stats is not None:
            check_statistics(norm_stats, len(params), xp, dev)
        adapt, decay = common.masks(params)
        decays = common.layer_decays(decay)
        lr = common.learning_rate(t)

        w_norms = _layer_norms(xp, params)
        g_norms = _layer_norms(xp, grads)
        checks = [("parameter norm", w_norms), ("gradient norm", g_norms)]
        mean_norms = _checked_mean_norms(xp, norm_stats, w_norms, checks)
        skipped = _handle_nonfinite(common, xp, checks, params, state, t, lr, w_norms, g_norms)
        if skipped is not None:
            return skipped

        directions = _decayed_directions(params, grads, decays)
        direction_norms = None
        if trust.weight_decay_form == "norm_of_sum" and any(decays):
            direction_norms = _layer_norms(xp, directions)
        planned = layer_rates(w_norms, g_norms, learning_rate=lr, options=trust, adapt=adapt, weight_decays=decays,
                              direction_norms=direction_norms, mean_norms=mean_norms)
        lars_r, factors, rates = planned

        new_params, new_trace = apply_momentum(xp, params, directions, state.trace, rates, beta, nesterov)
        diag = LayerDiagnostics(w_norms, g_norms, lars_r, factors, rates, lr, t)
        return StepResult(new_params, MomentumState(t + 1, new_trace), diag)

    return Optimizer(name, init, step)


def _beta(beta: float) -> float:
    return check_hyperparameter("beta", beta, low=0.0, high=1.0, high_open=True)


def _trust(kind, eta, eps, max_ratio, larc_clip, weight_decay_form) -> TrustOptions:
    eta = check_hyperparameter("eta", eta, low=0.0, low_open=True)
    eps = check_hyperparameter("eps", eps, low=0.0)
    if max_ratio is not None:
        max_ratio = check_hyperparameter("max_ratio", max_ratio, low=0.0, low_open=True)
        if larc_clip:
            raise ValueError("larc_clip and max_ratio cannot be combined: LARC clips the rate at the learning rate")
    if weight_decay_form not in ("sum_of_norms", "norm_of_sum"):
        raise ValueError(f'weight_decay_form must be "sum_of_norms" or "norm_of_sum", got {weight_decay_form!r}')
    return TrustOptions(kind, eta, eps, max_ratio, bool(larc_clip), weight_decay_form)


def mgd(
    learning_rate: float | Schedule,
    *,
    weight_decay: float = 0.0,
    weight_decay_mask: LayerMask = None,
    on_nonfinite: OnNonFinite = "raise",
) -> Optimizer:
    r"""Mini-batch gradient descent (mGD).

    .. math:: w_{t+1} = w_t - \gamma_t\,(\bar g_t + \lambda w_t)

    CLARS eq. (2) with :math:`\beta = 0`; Theorem 1 analyses it.

    Parameters
    ----------
    learning_rate : float or schedule
        :math:`\gamma_t`, a number or a function of the step.
    weight_decay : float
        :math:`\lambda \ge 0`, added to the gradient of the layers in ``weight_decay_mask``.
    weight_decay_mask : sequence of bool or callable, optional
        Layers that get weight decay; all by default.
    on_nonfinite : {"raise", "skip"}
        What a non-finite gradient or parameter does: raise
        :class:`~lwrs.NonFiniteError` naming the layer, or skip the step.

    References
    ----------
    Huo, Gu & Huang (2021), AAAI, eq. (2) and Theorem 1.

    Examples
    --------
    >>> import numpy as np, lwrs
    >>> opt = lwrs.mgd(0.5)
    >>> params, state, _ = opt.step([np.array([1.0])], [np.array([2.0])], opt.init([np.array([1.0])]))
    >>> params[0]
    array([0.])
    """
    common = _Common.build(learning_rate, weight_decay, None, weight_decay_mask, on_nonfinite)
    return _momentum_family("mgd", common, TrustOptions("none"), 0.0, True)


def mnag(
    learning_rate: float | Schedule,
    *,
    beta: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    weight_decay_mask: LayerMask = None,
    on_nonfinite: OnNonFinite = "raise",
) -> Optimizer:
    r"""Mini-batch Nesterov accelerated gradient (mNAG), one rate for every layer.

    .. math::

        d_t &= \beta d_{t-1} - \gamma_t (\bar g_t + \lambda w_t), \\
        w_{t+1} &= w_t - \gamma_t (\bar g_t + \lambda w_t) + \beta d_t .

    CLARS eq. (2); with a constant rate this equals
    ``torch.optim.SGD(momentum=beta, nesterov=True)``. Theorem 2 analyses it.

    Parameters
    ----------
    learning_rate : float or schedule
        :math:`\gamma_t`.
    beta : float
        Momentum :math:`\beta \in [0, 1)`.
    nesterov : bool
        ``False`` gives heavy-ball momentum, :math:`w_{t+1} = w_t + d_t`.
    weight_decay, weight_decay_mask, on_nonfinite
        As in :func:`mgd`.

    References
    ----------
    Huo, Gu & Huang (2021), AAAI, eq. (2) and Theorem 2; Nesterov (1983).

    Examples
    --------
    >>> import numpy as np, lwrs
    >>> opt = lwrs.mnag(0.1, beta=0.9)
    >>> params, state, _ = opt.step([np.array([1.0])], [np.array([1.0])], opt.init([np.array([1.0])]))
    >>> params[0]      # the first step moves (1 + beta) * lr * g
    array([0.81])
    """
    common = _Common.build(learning_rate, weight_decay, None, weight_decay_mask, on_nonfinite)
    return _momentum_family("mnag", common, TrustOptions("none"), _beta(beta), nesterov)


def lars(
    learning_rate: float | Schedule,
    *,
    beta: float = 0.9,
    eta: float = 0.001,
    weight_decay: float = 0.0,
    weight_decay_form: WeightDecayForm = "sum_of_norms",
    eps: float = 0.0,
    max_ratio: float | None = None,
    larc_clip: bool = False,
    adapt_mask: LayerMask = None,
    weight_decay_mask: LayerMask = None,
    nesterov: bool = True,
    on_nonfinite: OnNonFinite = "raise",
) -> Optimizer:
    r"""LARS: layer-wise adaptive rate scaling on mNAG.

    .. math::

        \gamma_k = \gamma_t\, \eta\, \frac{\|w_k\|}{D_k + \epsilon}, \qquad
        D_k = \|\bar g_k\| + \lambda\|w_k\| \ \text{or}\ \|\bar g_k + \lambda w_k\|,

    then the mNAG step of :func:`mnag` with direction :math:`\bar g_k +
    \lambda w_k` and rate :math:`\gamma_k`. The ratio is 1 where
    :math:`\|w_k\| = 0` or :math:`D_k = 0` (weight decay still applies) and
    for layers outside ``adapt_mask``. It is also 1 where the raw gradient
    :math:`\bar g_k` vanishes, in both forms (timm's and apex's convention;
    optax's ``norm_of_sum`` gives :math:`\eta/\lambda` there), and the
    decay step :math:`\gamma_t \lambda w_k` still applies.

    Parameters
    ----------
    learning_rate : float or schedule
        :math:`\gamma_t`, e.g. :math:`\gamma_{scale}` from
        :func:`~lwrs.schedules.linear_scaling`, possibly with warm-up.
    beta : float
        Momentum :math:`\beta \in [0, 1)`.
    eta : float
        Trust coefficient :math:`\eta > 0` (0.001 in You et al. 2017).
    weight_decay : float
        :math:`\lambda \ge 0`.
    weight_decay_form : {"sum_of_norms", "norm_of_sum"}
        Where weight decay enters :math:`D_k` (see :data:`~lwrs.rates.WeightDecayForm`).
    eps : float
        Added to :math:`D_k`; 0 reproduces the paper.
    max_ratio : float or None
        Clip the ratio from above (the CLARS code uses 0.1).
    larc_clip : bool
        LARC's clipping (apex): :math:`\gamma_k = \min(\eta\|w_k\|/D_k,\ \gamma_t)`.
        The reported ratio is then :math:`\gamma_k / \gamma_t`.
    adapt_mask : sequence of bool or callable, optional
        Layers that get a trust ratio. Default: every layer with ``ndim > 1``
        (biases and normalisation parameters are excluded).
    weight_decay_mask : sequence of bool or callable, optional
        Layers that get weight decay; all by default.
    nesterov : bool
        ``False`` gives heavy-ball momentum.
    on_nonfinite : {"raise", "skip"}
        See :func:`mgd`.

    References
    ----------
    You, Gitman & Ginsburg (2017), *Scaling SGD Batch Size to 32K for ImageNet
    Training*; Huo, Gu & Huang (2021), AAAI, eq. (3).

    Examples
    --------
    >>> import numpy as np, lwrs
    >>> opt = lwrs.lars(1.0, eta=0.5, beta=0.0)
    >>> w, g = [np.array([[3.0, 4.0]])], [np.array([[0.0, 10.0]])]
    >>> params, state, diag = opt.step(w, g, opt.init(w))
    >>> diag.rates       # 1.0 * 0.5 * 5 / 10
    array([0.25])
    """
    common = _Common.build(learning_rate, weight_decay, adapt_mask, weight_decay_mask, on_nonfinite)
    trust = _trust("lars", eta, eps, max_ratio, larc_clip, weight_decay_form)
    return _momentum_family("lars", common, trust, _beta(beta), nesterov)


def clars(
    learning_rate: float | Schedule,
    *,
    beta: float = 0.9,
    eta: float = 0.01,
    weight_decay: float = 0.0,
    weight_decay_form: WeightDecayForm = "sum_of_norms",
    eps: float = 0.0,
    max_ratio: float | None = None,
    larc_clip: bool = False,
    adapt_mask: LayerMask = None,
    weight_decay_mask: LayerMask = None,
    nesterov: bool = True,
    on_nonfinite: OnNonFinite = "raise",
) -> Optimizer:
    r"""CLARS: complete layer-wise adaptive rate scaling on mNAG.

    .. math::

        \gamma_k = \gamma_t\, \eta\, \frac{\|w_k\|}{\frac1B \sum_{i \in I_t}\|g_{ik}\| + \lambda \|w_k\| + \epsilon}
                 = \gamma^{\mathrm{LARS}}_k \cdot c_k, \qquad
        c_k = \frac{\|\bar g_k\| + \lambda\|w_k\|}{\frac1B \sum_i \|g_{ik}\| + \lambda\|w_k\|} \in [0, 1]

    (the second equality for :math:`\epsilon = 0`), then the mNAG step. Each
    ``step`` needs ``norm_stats``, the :class:`~lwrs.NormStatistics` of the
    batch's per-sample gradients. Exact statistics give the paper's
    algorithm; :func:`~lwrs.subsample_norm_statistics` gives the paper's
    cheap estimator; :func:`~lwrs.minibatch_gradients` with ``max_ratio=0.1``
    gives the official code's variant. With ``weight_decay_form="norm_of_sum"``
    the statistics must be of the decayed per-sample gradients.

    Parameters
    ----------
    learning_rate : float or schedule
        :math:`\gamma_t`; CLARS is meant to need no warm-up.
    eta : float
        Trust coefficient; Algorithm 1 uses 0.01.
    beta, weight_decay, weight_decay_form, eps, max_ratio, larc_clip, adapt_mask, weight_decay_mask, nesterov, on_nonfinite
        As in :func:`lars`.

    References
    ----------
    Huo, Gu & Huang (2021), *Large Batch Optimization for Deep Learning Using
    New Complete Layer-Wise Adaptive Rate Scaling*, AAAI, eq. (5), Algorithm 1.

    Examples
    --------
    >>> import numpy as np, lwrs
    >>> per_sample = [np.array([[[3.0, 4.0]], [[0.0, 0.0]]])]    # 2 samples, 1 layer (1, 2)
    >>> w, g = [np.array([[1.0, 0.0]])], [np.mean(per_sample[0], axis=0)]
    >>> opt = lwrs.clars(1.0, eta=1.0)
    >>> stats = lwrs.per_sample_norm_statistics(per_sample)
    >>> _, _, diag = opt.step(w, g, opt.init(w), norm_stats=stats)
    >>> diag.clars_factors, diag.rates       # |mean| = 2.5, mean |g_i| = 2.5
    (array([1.]), array([0.4]))
    """
    common = _Common.build(learning_rate, weight_decay, adapt_mask, weight_decay_mask, on_nonfinite)
    trust = _trust("clars", eta, eps, max_ratio, larc_clip, weight_decay_form)
    return _momentum_family("clars", common, trust, _beta(beta), nesterov)


def tvlars(
    learning_rate: float | Schedule,
    *,
    decay_coefficient: float,
    delay_steps: float,
    alpha: float = 1.0,
    gamma_min: float = 0.0,
    beta: float = 0.9,
    eta: float = 0.001,
    weight_decay: float = 0.0,
    weight_decay_form: WeightDecayForm = "sum_of_norms",
    eps: float = 0.0,
    adapt_mask: LayerMask = None,
    weight_decay_mask: LayerMask = None,
    nesterov: bool = True,
    on_nonfinite: OnNonFinite = "raise",
) -> Optimizer:
    r"""TVLARS: LARS with a time-varying, sigmoid-shaped global rate and no warm-up.

    .. math::

        \phi_t = \frac{1}{\alpha + e^{\lambda (t - d_e)}} + \gamma_{\min}, \qquad
        \gamma_k = \gamma_{target}\, \phi_t\, \eta\, \frac{\|w_k\|}{\|\bar g_k\| + \lambda_{wd}\|w_k\|}

    then the mNAG step of :func:`lars`. The paper uses :math:`\alpha = 1` and
    no other scheduler; the official code's special case is
    ``alpha=0.1, gamma_min=0.0, delay_steps=-1``.

    Parameters
    ----------
    learning_rate : float or schedule
        :math:`\gamma_{target}` (a schedule is multiplied by :math:`\phi_t`).
    decay_coefficient : float
        :math:`\lambda \ge 0`, the decay coefficient (1e-2 ... 1e-6 in the paper).
    delay_steps : float
        :math:`d_e`, the delay in steps (the paper counts epochs; multiply by
        the steps per epoch).
    alpha : float
        :math:`\alpha > 0`.
    gamma_min : float
        :math:`\gamma_{\min} \ge 0`, the floor of :math:`\phi_t`.
    beta, eta, weight_decay, weight_decay_form, eps, adapt_mask, weight_decay_mask, nesterov, on_nonfinite
        As in :func:`lars`.

    References
    ----------
    The TVLARS paper (2023), Algorithm 1 and eq. (8)-(9); see also
    :func:`~lwrs.schedules.tvlars_factor`.

    Examples
    --------
    >>> import numpy as np, lwrs
    >>> opt = lwrs.tvlars(1.0, decay_coefficient=0.01, delay_steps=0, eta=1.0, beta=0.0)
    >>> w = [np.array([[1.0]])]
    >>> _, _, diag = opt.step(w, [np.array([[1.0]])], opt.init(w))
    >>> diag.learning_rate      # phi_0 = 1 / (1 + e^0)
    0.5
    """
    phi = tvlars_factor(decay_coefficient=decay_coefficient, delay_steps=delay_steps, alpha=alpha, gamma_min=gamma_min)
    target = as_schedule("learning_rate", learning_rate)

    def schedule(step: int) -> float:
        return target(step) * phi(step)

    common = _Common.build(schedule, weight_decay, adapt_mask, weight_decay_mask, on_nonfinite)
    trust = _trust("lars", eta, eps, None, False, weight_decay_form)
    return _momentum_family("tvlars", common, trust, _beta(beta), nesterov)


def lamb(
    learning_rate: float | Schedule,
    *,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    adapt_mask: LayerMask = None,
    weight_decay_mask: LayerMask = None,
    on_nonfinite: OnNonFinite = "raise",
) -> Optimizer:
    r"""LAMB: Adam directions with a layer-wise trust ratio.

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\bar g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2)\bar g_t^2, \\
        u_t &= \frac{m_t / (1 - \beta_1^{t})}{\sqrt{v_t / (1 - \beta_2^{t})} + \epsilon} + \lambda w_t,
        \qquad r_k = \frac{\|w_k\|}{\|u_k\|}, \\
        w_{t+1} &= w_t - \gamma_t\, r_k\, u_t ,

    with :math:`t` counted from 1, and :math:`r_k = 1` where :math:`\|w_k\|`,
    :math:`\|u_k\|` or :math:`\|\bar g_k\|` is 0 or the layer is outside
    ``adapt_mask``.

    Parameters
    ----------
    learning_rate : float or schedule
        :math:`\gamma_t`.
    beta1, beta2 : float
        Adam's :math:`\beta_1, \beta_2 \in [0, 1)`.
    eps : float
        Adam's :math:`\epsilon > 0`.
    weight_decay, adapt_mask, weight_decay_mask, on_nonfinite
        As in :func:`lars` (here weight decay is decoupled, added to :math:`u`).

    References
    ----------
    You et al. (2019), *Large Batch Optimization for Deep Learning: Training
    BERT in 76 minutes*, Algorithm 2; the TVLARS paper's LAMB baseline.

    Examples
    --------
    >>> import numpy as np, lwrs
    >>> opt = lwrs.lamb(0.1)
    >>> w = [np.array([[3.0, 4.0]])]
    >>> _, _, diag = opt.step(w, [np.array([[1.0, -1.0]])], opt.init(w))
    >>> np.round(diag.trust_ratios, 6)       # |w| / |u| with u ~ sign(g)
    array([3.535537])
    """
    common = _Common.build(learning_rate, weight_decay, adapt_mask, weight_decay_mask, on_nonfinite)
    b1 = check_hyperparameter("beta1", beta1, low=0.0, high=1.0, high_open=True)
    b2 = check_hyperparameter("beta2", beta2, low=0.0, high=1.0, high_open=True)
    eps = check_hyperparameter("eps", eps, low=0.0, low_open=True)

    def init(params: Sequence[Any]) -> LambState:
        xp, _ = check_layers(params)
        zeros = tuple(xp.zeros_like(w) for w in params)
        return LambState(0, zeros, zeros)

    def step(params, grads, state, *, norm_stats: NormStatistics | None = None) -> StepResult:
        t = _check_state_step(state, LambState)
        xp, dev = check_layers(params, grads=grads, first_moment=state.first_moment, second_moment=state.second_moment)
        if norm_stats is not None:
            check_statistics(norm_stats, len(params), xp, dev)
        adapt, decay = common.masks(params)
        decays = common.layer_decays(decay)
        lr = common.learning_rate(t)
        w_norms = _layer_norms(xp, params)
        g_norms = _layer_norms(xp, grads)
        checks = [("parameter norm", w_norms), ("gradient norm", g_norms)]
        mean_norms = _checked_mean_norms(xp, norm_stats, w_norms, checks)
        skipped = _handle_nonfinite(common, xp, checks, params, state, t, lr, w_norms, g_norms)
        if skipped is not None:
            return skipped
        factors = xp.ones_like(w_norms)
        if mean_norms is not None:  # reported, not used: LAMB has no per-sample term
            factors = clars_factors(
                lars_denominators(w_norms, g_norms, weight_decay=decays),
                clars_denominators(w_norms, mean_norms, weight_decay=decays),
            )

        m = tuple(b1 * mk + (1.0 - b1) * g for mk, g in zip(state.first_moment, grads))
        v = tuple(b2 * vk + (1.0 - b2) * (g * g) for vk, g in zip(state.second_moment, grads))
        c1, c2 = 1.0 - b1 ** (t + 1), 1.0 - b2 ** (t + 1)
        u = tuple(
            (mk / c1) / (xp.sqrt(vk / c2) + eps) + (wd * w if wd else 0.0)
            for mk, vk, w, wd in zip(m, v, params, decays)
        )
        ratios = layer_trust_ratios(w_norms, _layer_norms(xp, u), eta=1.0, adapt=adapt, grad_norms=g_norms)
        rates = lr * ratios
        new_params = tuple(w - xp.astype(rates[k], w.dtype) * uk for k, (w, uk) in enumerate(zip(params, u)))
        diag = LayerDiagnostics(w_norms, g_norms, ratios, factors, rates, lr, t)
        return StepResult(new_params, LambState(t + 1, m, v), diag)

    return Optimizer("lamb", init, step)
