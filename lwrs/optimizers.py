r"""The optimizers, as pure functional state transitions.

Each factory returns an :class:`~lwrs.base.Optimizer` of pure functions::

    state = opt.init(params)
    params, state, diagnostics = opt.step(params, grads, state, norm_stats=None)
    updates, state, diagnostics = opt.update(grads, state, params, norm_stats=None)

``params`` and ``grads`` are pytrees (lists, tuples, dicts, NamedTuples) of
per-layer arrays from any array-API library (NumPy, PyTorch, CuPy, JAX,
array-api-strict); ``grads`` must have the structure of ``params`` (the same
dict keys; a list and a tuple of the same layers agree), else ``ValueError``
says where they differ. ``step`` never modifies its inputs; it returns new arrays
in the same library, on the same device, with the same dtypes, in the same
structure, and a :class:`~lwrs.diagnostics.LayerDiagnostics`.

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

from typing import Any

from array_api_compat import is_array_api_obj

from ._validation import check_bool, check_hyperparameter
from .base import (
    Common,
    LambState,
    LayerMask,
    MomentumState,
    OnNonFinite,
    Optimizer,
    StepResult,
    Transition,
    check_state,
    check_step_size,
    finish,
    functional,
    prepare,
    skipped_now,
    zeros,
)
from .diagnostics import LayerDiagnostics
from .moments import lamb_directions, lamb_moments, warn_float16
from .momentum import mnag_increments
from .nonfinite import momentum_step_bounds
from .norm_statistics import NormStatistics
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
from .schedules import Schedule, tvlars_schedule

__all__ = ["mgd", "mnag", "lars", "clars", "tvlars", "lamb"]

# kept importable from here for the callers of 0.1
_COMPAT = (LambState, MomentumState, Optimizer, StepResult, NormStatistics)


def decayed_directions(params, grads, decays) -> tuple[Any, ...]:
    r""":math:`\bar g_k + \lambda_k w_k` per layer (private)."""
    return tuple(g + wd * w if wd else g for w, g, wd in zip(params, grads, decays))


def _momentum_family(name: str, common: Common, trust: TrustOptions, beta: float, nesterov: bool) -> Optimizer:
    """Build mgd / mnag / lars / clars / tvlars around one transition."""
    needs_stats = "clars" if trust.kind == "clars" else ""
    nesterov = check_bool("nesterov", nesterov)

    def init_arrays(xp, leaves, step) -> MomentumState:
        return MomentumState(step, zeros(xp, leaves))

    def transition(params, grads, state, norm_stats, names=None) -> Transition:
        check_state(state, MomentumState)
        c = prepare(common, params, grads, state, norm_stats, {"trace": state.trace}, needs_stats, names)
        if c.skip_now:
            return skipped_now(c, state)
        directions = decayed_directions(params, grads, c.decays)
        direction_norms = None
        if trust.weight_decay_form == "norm_of_sum" and any(c.decays):
            direction_norms = _layer_norms(c.xp, directions)
        lars_r, factors, rates = layer_rates(c.w_norms, c.g_norms, learning_rate=c.lr, options=trust, adapt=c.adapt,
                                             weight_decays=c.decays, direction_norms=direction_norms,
                                             mean_norms=c.mean_norms)
        bounds = momentum_step_bounds(c.w_norms, rates, lars_denominators(c.w_norms, c.g_norms, weight_decay=list(c.decays)),
                                      c.state_norms["trace"], beta=beta, nesterov=nesterov)
        c = check_step_size(c, rates, bounds, [w.dtype for w in params])
        if c.skip_now:
            return skipped_now(c, state)
        increments, trace = mnag_increments(directions, state.trace, rates, beta=beta, nesterov=nesterov, xp=c.xp)
        diag = LayerDiagnostics(c.w_norms, c.g_norms, lars_r, factors, rates, c.lr, c.step)
        return finish(c, increments, [trace], [state.trace], MomentumState, diag)

    return functional(name, init_arrays, transition)


def _beta(beta: float) -> float:
    return check_hyperparameter("beta", beta, low=0.0, high=1.0, high_open=True)


def _trust(kind, eta, eps, max_ratio, larc_clip, weight_decay_form) -> TrustOptions:
    eta = check_hyperparameter("eta", eta, low=0.0, low_open=True)
    eps = check_hyperparameter("eps", eps, low=0.0)
    larc_clip = check_bool("larc_clip", larc_clip)
    if max_ratio is not None:
        max_ratio = check_hyperparameter("max_ratio", max_ratio, low=0.0, low_open=True)
        if larc_clip:
            raise ValueError("larc_clip and max_ratio cannot be combined: LARC clips the rate at the learning rate")
    if weight_decay_form not in ("sum_of_norms", "norm_of_sum"):
        raise ValueError(f'weight_decay_form must be "sum_of_norms" or "norm_of_sum", got {weight_decay_form!r}')
    return TrustOptions(kind, eta, eps, max_ratio, larc_clip, weight_decay_form)


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
    common = Common.build(learning_rate, weight_decay, None, weight_decay_mask, on_nonfinite)
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
    common = Common.build(learning_rate, weight_decay, None, weight_decay_mask, on_nonfinite)
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
    common = Common.build(learning_rate, weight_decay, adapt_mask, weight_decay_mask, on_nonfinite)
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
                 = \gamma^{\mathrm{LARS}}_k \cdot c_k,

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
    common = Common.build(learning_rate, weight_decay, adapt_mask, weight_decay_mask, on_nonfinite)
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
    schedule = tvlars_schedule(learning_rate, decay_coefficient=decay_coefficient, delay_steps=delay_steps,
                               alpha=alpha, gamma_min=gamma_min)
    common = Common.build(schedule, weight_decay, adapt_mask, weight_decay_mask, on_nonfinite)
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
    common = Common.build(learning_rate, weight_decay, adapt_mask, weight_decay_mask, on_nonfinite)
    b1 = check_hyperparameter("beta1", beta1, low=0.0, high=1.0, high_open=True)
    b2 = check_hyperparameter("beta2", beta2, low=0.0, high=1.0, high_open=True)
    eps = check_hyperparameter("eps", eps, low=0.0, low_open=True)

    def init_arrays(xp, leaves, step) -> LambState:
        warn_float16([w.dtype for w in leaves])
        return LambState(step, zeros(xp, leaves), zeros(xp, leaves))

    def transition(params, grads, state, norm_stats, names=None) -> Transition:
        check_state(state, LambState)
        arrays = {"first_moment": state.first_moment, "second_moment": state.second_moment}
        c = prepare(common, params, grads, state, norm_stats, arrays, "", names)
        if c.skip_now:
            return skipped_now(c, state)
        xp = c.xp
        factors = xp.ones_like(c.w_norms)
        if c.mean_norms is not None:  # reported, not used: LAMB has no per-sample term
            factors = clars_factors(
                lars_denominators(c.w_norms, c.g_norms, weight_decay=c.decays),
                clars_denominators(c.w_norms, c.mean_norms, weight_decay=c.decays),
            )
        m, v = lamb_moments(grads, state.first_moment, state.second_moment, beta1=b1, beta2=b2, xp=xp)
        t1 = xp.astype(c.step, c.w_norms.dtype) + 1 if is_array_api_obj(c.step) else c.step + 1
        u = lamb_directions(m, v, params, step=t1, beta1=b1, beta2=b2, eps=eps, weight_decays=c.decays, xp=xp)
        u_norms = _layer_norms(xp, u)
        ratios = layer_trust_ratios(c.w_norms, u_norms, eta=1.0, adapt=c.adapt, grad_norms=c.g_norms)
        rates = c.lr * ratios
        c = check_step_size(c, rates, c.w_norms + rates * u_norms, [w.dtype for w in params],
                            [("direction norm", u_norms)])
        if c.skip_now:
            return skipped_now(c, state)
        increments = tuple(-(xp.astype(rates[k], w.dtype) * uk) for k, (w, uk) in enumerate(zip(params, u)))
        diag = LayerDiagnostics(c.w_norms, c.g_norms, ratios, factors, rates, c.lr, c.step)
        return finish(c, increments, [m, v], [state.first_moment, state.second_moment], LambState, diag)

    return functional("lamb", init_arrays, transition)
