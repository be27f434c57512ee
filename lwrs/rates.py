r"""Per-layer rates: the trust ratios of LARS, CLARS and LAMB, and the rates they give.

All three scale a layer's step by a *trust ratio* :math:`\eta\,\|w_k\| / D_k`,
and differ only in the denominator :math:`D_k`:

.. list-table::
   :header-rows: 1

   * - optimizer
     - denominator :math:`D_k`
     - reference
   * - LARS
     - :math:`\|\bar g_k\| + \lambda\|w_k\|` or :math:`\|\bar g_k + \lambda w_k\|`
     - CLARS eq. (3); You et al. 2017
   * - CLARS
     - :math:`\frac1B\sum_i \|g_{ik}\|`, plus the same weight-decay term
     - CLARS eq. (5)
   * - LAMB
     - :math:`\|u_k\|`, the Adam direction plus weight decay, with :math:`\eta = 1`
     - You et al. 2019

A ratio is 1 where :math:`\|w_k\| = 0` or :math:`D_k = 0` (the optax and timm
convention), where :math:`D_k + \epsilon` is below the smallest normal floating-point
number times :math:`\max(1, \eta\|w_k\|)` (a vanishing gradient, e.g. a subnormal
norm: the ratio would overflow or be meaningless), and for layers excluded from
adaptation. Every function works on
1-D arrays with one entry per layer, in one array-API expression, so no host
synchronisation is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from array_api_compat import array_namespace, device, is_array_api_obj

from ._validation import check_hyperparameter, check_layers

__all__ = [
    "WeightDecayForm",
    "statistics_dtype",
    "layer_norms",
    "weight_decayed_norms",
    "layer_trust_ratios",
    "lars_denominators",
    "clars_denominators",
    "clars_factors",
    "TrustOptions",
    "LayerRates",
    "layer_rates",
]

WeightDecayForm = Literal["sum_of_norms", "norm_of_sum"]
"""Where weight decay :math:`\\lambda` enters the LARS denominator.

``"sum_of_norms"``: :math:`\\|\\bar g_k\\| + \\lambda \\|w_k\\|` (You et al. 2017, TF
contrib LARS, timm, apex LARC, the TVLARS paper).
``"norm_of_sum"``: :math:`\\|\\bar g_k + \\lambda w_k\\|` (optax, the CLARS and TVLARS code).
"""

_FORMS = ("sum_of_norms", "norm_of_sum")


def statistics_dtype(xp: Any, dtypes: Sequence[Any]) -> Any:
    r"""The dtype that per-layer norms, ratios, rates and statistics are kept in.

    .. math:: \text{dtype} = \max\big(\texttt{float32},\ \max_k \text{dtype}(w_k)\big)

    The widest of the layers' dtypes, and at least ``float32`` so that
    ``float16``/``bfloat16`` layers accumulate their norms in ``float32``.
    This is the one place the rule is written; the backends call it.

    Examples
    --------
    >>> import numpy as np
    >>> statistics_dtype(np, [np.float16]), statistics_dtype(np, [np.float32, np.float64])
    (<class 'numpy.float32'>, <class 'numpy.float64'>)
    """
    widest = xp.float32
    for dt in dict.fromkeys(dtypes):  # each distinct dtype once, in order
        if xp.finfo(dt).bits > xp.finfo(widest).bits:
            widest = dt
    return widest


def layer_norms(arrays: Sequence[Any], *, xp: Any = None) -> Any:
    r"""The Euclidean norm of every layer, as one 1-D array.

    .. math:: n_k = \|x_k\|_2 = \Big(\sum_j x_{k,j}^2\Big)^{1/2}

    With ``xp`` given, the layers are not checked (a kernel's inner call).
    Low-precision layers (``float16``, ``bfloat16``) are accumulated in
    ``float32``; the result has the :func:`statistics_dtype` of the layers.
    The norm is the square root of a sum of squares, which every array
    library reduces pairwise (or in a tree): in float32 it is within about
    1e-7 of the exact norm of the same values, also for layers of millions
    of entries. (Like the libraries' own ``vector_norm``, it does not rescale:
    squares beyond the dtype's range overflow.)

    Examples
    --------
    >>> import numpy as np
    >>> layer_norms([np.array([3.0, 4.0]), np.zeros((2, 2))])
    array([5., 0.])
    """
    if xp is None:
        xp, _ = check_layers(arrays)
    return _layer_norms(xp, arrays)


def _layer_norms(xp: Any, arrays: Sequence[Any]) -> Any:
    dtype = statistics_dtype(xp, [a.dtype for a in arrays])
    return xp.stack([_norm(xp, xp.astype(a, dtype)) for a in arrays])


def _norm(xp: Any, a: Any, axis: Any = None) -> Any:
    r""":math:`\sqrt{\sum_j a_j^2}` as a sum of squares: every library sums pairwise or in a tree, to about one
    rounding of the dtype; torch's ``vector_norm`` on a float32 CPU tensor of 4M entries is off by 8e-5."""
    return xp.sqrt(xp.sum(a * a, axis=axis))


def weight_decayed_norms(
    params: Sequence[Any],
    grads: Sequence[Any],
    *,
    weight_decays: Sequence[float],
    weight_decay_form: WeightDecayForm = "sum_of_norms",
    xp: Any = None,
) -> Any:
    r"""The weight-decayed gradient norm of every layer, the LARS denominator, in either form.

    .. math::

        D_k = \|\bar g_k\| + \lambda_k \|w_k\| \quad (\texttt{sum\_of\_norms}),

        D_k = \|\bar g_k + \lambda_k w_k\| \quad (\texttt{norm\_of\_sum}).

    The second form is the norm of the decayed direction itself. It is not
    expanded as :math:`\sqrt{\|\bar g\|^2 + 2\lambda\langle \bar g, w\rangle
    + \lambda^2\|w\|^2}`: near the weight-decay equilibrium
    :math:`\bar g \approx -\lambda w` that sum cancels catastrophically (all
    digits lost at :math:`\|\bar g + \lambda w\| / \|\lambda w\| = 10^{-4}`
    in float32), while the direct norm is exact to rounding. A fast path that
    has only the three sums must be tested against this function.

    References: CLARS eq. (3); You, Gitman & Ginsburg (2017) for the first
    form; optax ``lars`` and the CLARS/TVLARS code for the second.

    Examples
    --------
    >>> import numpy as np
    >>> w, g = [np.array([3.0, 4.0])], [np.array([-1.5, -2.0])]
    >>> weight_decayed_norms(w, g, weight_decays=[0.5]), weight_decayed_norms(
    ...     w, g, weight_decays=[0.5], weight_decay_form="norm_of_sum")
    (array([5.]), array([0.]))
    """
    _check_form(weight_decay_form)
    if xp is None:
        xp, _ = check_layers(params, grads=grads)
    w_norms = _layer_norms(xp, params)
    if weight_decay_form == "norm_of_sum":
        return _layer_norms(xp, [g + wd * w if wd else g for w, g, wd in zip(params, grads, weight_decays)])
    return _layer_norms(xp, grads) + _per_layer(xp, list(weight_decays), w_norms) * w_norms


def _per_layer(xp: Any, values: Any, like: Any) -> Any:
    """A scalar or per-layer sequence as a 1-D array matching ``like``."""
    if isinstance(values, (int, float)):
        values = [float(values)] * like.shape[0]
    return xp.asarray(values, dtype=like.dtype, device=device(like))


def layer_trust_ratios(
    weight_norms: Any,
    denominators: Any,
    *,
    eta: float = 1.0,
    eps: float = 0.0,
    max_ratio: float | None = None,
    adapt: Sequence[bool] | None = None,
    grad_norms: Any = None,
) -> Any:
    r"""Per-layer trust ratios :math:`\eta \|w_k\| / (D_k + \epsilon)`.

    .. math::

        r_k = \begin{cases}
            \min\!\big(\eta\,\|w_k\| / (D_k + \epsilon),\ r_{\max}\big)
                & \|w_k\| > 0,\ \|\bar g_k\| > 0,\ D_k > 0,\ k \text{ adapted} \\
            1 & \text{otherwise}
        \end{cases}

    The condition on the raw gradient norm :math:`\|\bar g_k\|` (applied
    when ``grad_norms`` is given) is timm's and apex's convention: a layer with
    a zero gradient gets ratio 1, and its weight decay still applies. A
    denominator below the smallest normal number times
    :math:`\max(1, \eta\|w_k\|)` counts as vanishing too (ratio 1), so every
    ratio stays below ``1 / smallest_normal`` and no infinity reaches the update.

    With :math:`D_k` from :func:`lars_denominators` this is LARS (CLARS paper
    eq. 3); from :func:`clars_denominators`, CLARS (eq. 5); with
    :math:`\eta = 1` and :math:`D_k = \|u_k\|`, LAMB's ratio.

    Parameters
    ----------
    weight_norms, denominators : 1-D array
        :math:`\|w_k\|` and :math:`D_k`, one entry per layer.
    eta : float or 0-d array
        Trust coefficient :math:`\eta > 0` (0.001 in You et al. 2017, 0.01 in CLARS Algorithm 1).
    eps : float or 0-d array
        Added to the denominator; 0 reproduces the papers.
    max_ratio : float, 0-d array or None
        Upper clip :math:`r_{\max}` (the CLARS code clips at 0.1). Numbers are
        range-checked; arrays (traced hyperparameters) are not read.
    adapt : sequence of bool or None
        Layers whose ratio is computed; the others get 1. ``None`` adapts all.
    grad_norms : 1-D array, optional
        :math:`\|\bar g_k\|` without weight decay; the ratio is 1 where it is 0.

    Examples
    --------
    >>> import numpy as np
    >>> layer_trust_ratios(np.array([2.0, 0.0, 1.0]), np.array([4.0, 1.0, 0.0]), eta=0.1)
    array([0.05, 1.  , 1.  ])
    """
    xp = array_namespace(weight_norms, denominators)
    if not is_array_api_obj(eta):  # an array eta (LARC's eta / lr under tracing) is not read
        eta = check_hyperparameter("eta", eta, low=0.0, low_open=True)
    if not is_array_api_obj(eps):  # arrays (e.g. injected hyperparameters under jit) are not read
        eps = check_hyperparameter("eps", eps, low=0.0)
    if weight_norms.shape != denominators.shape or weight_norms.ndim != 1:
        raise ValueError(
            f"weight_norms {tuple(weight_norms.shape)} and denominators {tuple(denominators.shape)} "
            "must be 1-D arrays of one entry per layer"
        )
    # a denominator below the smallest normal number (times max(1, eta |w|)) is a vanishing gradient: ratio 1.
    # This keeps every ratio below 1 / smallest_normal, so it cannot overflow, and nothing here under/overflows.
    floor = xp.finfo(weight_norms.dtype).smallest_normal * xp.maximum(eta * weight_norms, xp.ones_like(weight_norms))
    valid = (weight_norms > 0) & (denominators > 0) & (denominators + eps >= floor)
    if grad_norms is not None:
        valid = valid & (grad_norms > 0)
    safe_den = xp.where(valid, denominators + eps, xp.ones_like(denominators))
    ratio = xp.where(valid, eta * weight_norms / safe_den, xp.ones_like(weight_norms))
    if max_ratio is not None:
        if is_array_api_obj(max_ratio):
            cap = xp.astype(max_ratio, ratio.dtype) * xp.ones_like(ratio)
        else:
            cap = xp.full_like(ratio, check_hyperparameter("max_ratio", max_ratio, low=0.0, low_open=True))
        ratio = xp.where(valid, xp.minimum(ratio, cap), ratio)
    if adapt is not None:
        if len(adapt) != weight_norms.shape[0]:
            raise ValueError(f"adapt has {len(adapt)} entries but there are {weight_norms.shape[0]} layers")
        mask = xp.asarray(list(adapt), dtype=xp.bool, device=device(ratio))
        ratio = xp.where(mask, ratio, xp.ones_like(ratio))
    return ratio


def _check_form(form: str) -> None:
    if form not in _FORMS:
        raise ValueError(f"weight_decay_form must be one of {_FORMS}, got {form!r}")


def lars_denominators(
    weight_norms: Any,
    grad_norms: Any,
    *,
    weight_decay: float | Sequence[float] = 0.0,
    weight_decay_form: WeightDecayForm = "sum_of_norms",
    direction_norms: Any = None,
) -> Any:
    r"""The LARS denominator of every layer, in either weight-decay form.

    .. math::

        D_k = \|\bar g_k\| + \lambda_k \|w_k\| \quad (\texttt{sum\_of\_norms}),

        D_k = \|\bar g_k + \lambda_k w_k\| \quad (\texttt{norm\_of\_sum}).

    References: CLARS eq. (3) (no weight decay); You, Gitman & Ginsburg (2017)
    for the first form; optax ``lars`` for the second.

    Parameters
    ----------
    weight_norms, grad_norms : 1-D array
        :math:`\|w_k\|` and :math:`\|\bar g_k\|`.
    weight_decay : float or sequence of float
        :math:`\lambda_k`, one value for all layers or one per layer.
    weight_decay_form : {"sum_of_norms", "norm_of_sum"}
    direction_norms : 1-D array, optional
        :math:`\|\bar g_k + \lambda_k w_k\|`; required for ``"norm_of_sum"``.

    Examples
    --------
    >>> import numpy as np
    >>> lars_denominators(np.array([2.0]), np.array([1.0]), weight_decay=0.5)
    array([2.])
    """
    xp = array_namespace(weight_norms, grad_norms)
    _check_form(weight_decay_form)
    if weight_decay_form == "norm_of_sum":
        if direction_norms is None:
            raise ValueError('weight_decay_form="norm_of_sum" needs direction_norms, the norms of g + wd * w')
        return direction_norms
    return grad_norms + _per_layer(xp, weight_decay, weight_norms) * weight_norms


def clars_denominators(
    weight_norms: Any,
    mean_sample_norms: Any,
    *,
    weight_decay: float | Sequence[float] = 0.0,
    weight_decay_form: WeightDecayForm = "sum_of_norms",
) -> Any:
    r"""The CLARS denominator: the mean per-sample gradient norm of every layer.

    .. math::

        D_k = \frac{1}{B}\sum_{i \in I_t} \|g_{ik}\| + \lambda_k \|w_k\|
        \quad (\texttt{sum\_of\_norms}),

        D_k = \frac{1}{B}\sum_{i \in I_t} \|g_{ik} + \lambda_k w_k\|
        \quad (\texttt{norm\_of\_sum}).

    With :math:`\lambda = 0` both are CLARS eq. (5). The paper has no weight
    decay; lwrs extends it as the per-sample analogue of each LARS form, so
    that by the triangle inequality :math:`D^{\mathrm{CLARS}}_k \ge
    D^{\mathrm{LARS}}_k` and CLARS never steps further than LARS. For
    ``"norm_of_sum"``, ``mean_sample_norms`` must already be the norms of the
    decayed per-sample gradients :math:`g_{ik} + \lambda_k w_k`.

    References: CLARS eq. (5) and Algorithm 1 (line 4 writes squared norms;
    eq. 5, the definition, uses plain norms).

    Examples
    --------
    >>> import numpy as np
    >>> clars_denominators(np.array([2.0]), np.array([3.0]), weight_decay=0.5)
    array([4.])
    """
    xp = array_namespace(weight_norms, mean_sample_norms)
    _check_form(weight_decay_form)
    if weight_decay_form == "norm_of_sum":
        return mean_sample_norms
    return mean_sample_norms + _per_layer(xp, weight_decay, weight_norms) * weight_norms


def clars_factors(lars_denominators: Any, clars_denominators: Any) -> Any:
    r"""The factor by which CLARS shrinks the LARS ratio, per layer.

    .. math::

        c_k = \frac{D^{\mathrm{LARS}}_k}{D^{\mathrm{CLARS}}_k}
            = \frac{\big\|\frac1B \sum_i g_{ik}\big\|}{\frac1B \sum_i \|g_{ik}\|}
            \quad (\lambda = 0)

    By the triangle inequality :math:`c_k \in [0, 1]`; it is 1 only when all
    per-sample gradients of the layer point the same way, and 0 only when the
    mini-batch gradient vanishes. :math:`c_k = 1` where the CLARS denominator
    is 0. Computed from exact statistics it never exceeds 1; a subsample
    estimator of the denominator can push it above 1.

    References: CLARS paper, the rewriting of eq. (5) as LARS times this factor.

    Examples
    --------
    >>> import numpy as np
    >>> clars_factors(np.array([1.0, 2.0]), np.array([4.0, 0.0]))
    array([0.25, 1.  ])
    """
    xp = array_namespace(lars_denominators, clars_denominators)
    positive = clars_denominators > 0
    safe = xp.where(positive, clars_denominators, xp.ones_like(clars_denominators))
    return xp.where(positive, lars_denominators / safe, xp.ones_like(safe))


@dataclass(frozen=True)
class TrustOptions:
    """How an optimizer of the mNAG family turns per-layer norms into rates.

    Attributes
    ----------
    kind : {"none", "lars", "clars"}
        No trust ratio (mGD, mNAG), the LARS ratio, or the CLARS ratio.
    eta, eps, max_ratio, larc_clip, weight_decay_form
        As in :func:`lwrs.lars`.
    """

    kind: Literal["none", "lars", "clars"]
    eta: float = 1.0
    eps: float = 0.0
    max_ratio: float | None = None
    larc_clip: bool = False
    weight_decay_form: WeightDecayForm = "sum_of_norms"


class LayerRates(NamedTuple):
    """What :func:`layer_rates` returns: 1-D arrays with one entry per layer."""

    trust_ratios: Any
    clars_factors: Any
    rates: Any


def layer_rates(
    weight_norms: Any,
    grad_norms: Any,
    *,
    learning_rate: float,
    options: TrustOptions,
    adapt: Sequence[bool],
    weight_decays: Sequence[float],
    direction_norms: Any = None,
    mean_norms: Any = None,
) -> LayerRates:
    r"""The per-layer rates :math:`\gamma_k` of one step, from norms alone.

    .. math::

        \gamma_k = \gamma_t\, r_k, \qquad
        r_k = \frac{\eta \|w_k\|}{D_k + \epsilon},

    .. math::

        D_k = D^{\mathrm{LARS}}_k \ \text{(LARS)}, \quad D^{\mathrm{CLARS}}_k \ \text{(CLARS)}, \quad
        r_k = 1 \ \text{(mGD, mNAG)},

    with :math:`r_k` from :func:`layer_trust_ratios`; with LARC clipping,
    :math:`\gamma_k = \min(\eta\|w_k\|/D_k, \gamma_t)`. The
    CLARS factor :math:`D^{\mathrm{LARS}}_k / D^{\mathrm{CLARS}}_k` is reported
    whenever ``mean_norms`` is given. This is the one place where the core and
    the fast backends turn norms into rates.

    Parameters
    ----------
    weight_norms, grad_norms : 1-D array
        :math:`\|w_k\|` and :math:`\|\bar g_k\|`.
    learning_rate : float or 0-d array
        :math:`\gamma_t`; a 0-d array (a traced schedule) in the norms' dtype.
    options : TrustOptions
    adapt : sequence of bool
        Layers that get a trust ratio.
    weight_decays : sequence of float
        :math:`\lambda_k` per layer (0 for layers without decay).
    direction_norms : 1-D array, optional
        :math:`\|\bar g_k + \lambda_k w_k\|`; needed for ``"norm_of_sum"`` when any :math:`\lambda_k > 0`.
    mean_norms : 1-D array, optional
        The mean per-sample gradient norms; needed for CLARS.

    References: CLARS eq. (3) and (5); apex LARC.

    Examples
    --------
    >>> import numpy as np
    >>> r = layer_rates(np.array([5.0]), np.array([10.0]), learning_rate=2.0,
    ...                 options=TrustOptions("lars", eta=0.1), adapt=[True], weight_decays=[0.0])
    >>> r.trust_ratios, r.rates
    (array([0.05]), array([0.1]))
    """
    xp = array_namespace(weight_norms, grad_norms)
    form = options.weight_decay_form
    if form == "norm_of_sum" and direction_norms is None:
        if any(weight_decays):
            raise ValueError('weight_decay_form="norm_of_sum" needs direction_norms when weight decay is used')
        direction_norms = grad_norms
    lars_den = lars_denominators(weight_norms, grad_norms, weight_decay=list(weight_decays),
                                 weight_decay_form=form, direction_norms=direction_norms)
    factors = xp.ones_like(weight_norms)
    clars_den = None
    if mean_norms is not None:
        clars_den = clars_denominators(weight_norms, mean_norms, weight_decay=list(weight_decays), weight_decay_form=form)
        factors = clars_factors(lars_den, clars_den)
    if options.kind == "none":
        ones = xp.ones_like(weight_norms)
        return LayerRates(ones, factors, learning_rate * ones)
    if options.kind == "clars" and clars_den is None:
        raise ValueError("CLARS rates need mean_norms, the mean per-sample gradient norms")
    eta, max_ratio = options.eta, options.max_ratio
    if options.larc_clip:  # apex LARC: rate = min(eta |w| / D, lr) = lr * min(eta |w| / (lr D), 1)
        max_ratio = 1.0
        if is_array_api_obj(learning_rate):
            positive = learning_rate > 0
            safe = xp.where(positive, learning_rate, xp.ones_like(learning_rate))
            eta = xp.where(positive, options.eta / safe, xp.full_like(learning_rate, options.eta))
        else:
            eta = options.eta / learning_rate if learning_rate > 0 else options.eta

    def ratios(den: Any) -> Any:
        return layer_trust_ratios(weight_norms, den, eta=eta, eps=options.eps, max_ratio=max_ratio, adapt=adapt,
                            grad_norms=grad_norms)

    lars_r = ratios(lars_den)
    used = ratios(clars_den) if options.kind == "clars" else lars_r
    return LayerRates(lars_r, factors, learning_rate * used)
