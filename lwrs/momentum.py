r"""Mini-batch Nesterov momentum (mNAG) and gradient descent (mGD) with per-layer rates.

The paper's form (Huo, Gu & Huang, AAAI 2021, eq. 2 and 4) keeps two sequences,

.. math::

    v_{t+1} &= w_t - \sum_k \gamma_k U_k \bar g_k, \\
    w_{t+1} &= v_{t+1} + \beta\,(v_{t+1} - v_t), \qquad v_0 = w_0 .

lwrs stores the equivalent *trace of learning-rate-scaled steps*
:math:`d_t = v_{t+1} - v_t` instead of :math:`v`, which avoids subtracting two
nearly equal weight vectors in low precision:

.. math::

    d_t &= \beta\, d_{t-1} - \gamma_{t,k}\, \bar g_{t,k}, \qquad d_{-1} = 0, \\
    w_{t+1} &= w_t - \gamma_{t,k}\, \bar g_{t,k} + \beta\, d_t .

The learning rate sits *inside* the trace (the TensorFlow / optax order). With a
constant rate this is exactly ``torch.optim.SGD(momentum=beta, nesterov=True)``;
with a rate that changes every step (LARS, CLARS, TVLARS) it is not, because
PyTorch multiplies a trace of raw gradients by the current rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace, is_array_api_obj

from ._validation import check_hyperparameter, check_layers

__all__ = ["zeros_like_layers", "mnag_increments", "momentum_step", "velocity_from_trace", "block_microstep"]


def zeros_like_layers(params: Sequence[Any]) -> tuple[Any, ...]:
    r"""One zero array per layer, with each layer's shape, dtype and device.

    This is the initial trace :math:`d_{-1} = 0`, i.e. :math:`v_0 = w_0`.

    .. math:: d_{-1,k} = 0 \in \mathbb{R}^{d_k}

    References: CLARS eq. (2), initial condition :math:`v_0 = w_0`.

    Examples
    --------
    >>> import numpy as np
    >>> zeros_like_layers([np.ones((2, 2)), np.ones(3)])[1]
    array([0., 0., 0.])
    """
    xp, _ = check_layers(params)
    return tuple(xp.zeros_like(w) for w in params)


def _rate_for_layer(xp: Any, rates: Any, k: int, dtype: Any) -> Any:
    """Layer ``k``'s rate as a value that keeps the layer's dtype."""
    r = rates[k]
    if is_array_api_obj(r):
        return xp.astype(r, dtype)
    return float(r)


def _check_rates(rates: Any, count: int) -> None:
    n = rates.shape[0] if is_array_api_obj(rates) else len(rates)
    if is_array_api_obj(rates) and rates.ndim != 1:
        raise ValueError(f"rates must be a 1-D array with one entry per layer, got shape {tuple(rates.shape)}")
    if n != count:
        raise ValueError(f"rates has {n} entries but params has {count} layers")


def mnag_increments(
    directions: Sequence[Any],
    trace: Sequence[Any],
    rates: Any,
    *,
    beta: float,
    nesterov: bool = True,
    xp: Any = None,
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    r"""The mNAG increments :math:`\Delta w_k = w_{t+1,k} - w_{t,k}` and the new trace, per layer.

    .. math::

        d_{t,k} &= \beta\, d_{t-1,k} - \gamma_k\, \bar g_k, \\
        \Delta w_k &= -\gamma_k\, \bar g_k + \beta\, d_{t,k} \quad\text{(Nesterov)}, \qquad
        \Delta w_k = d_{t,k} \quad \text{(heavy ball)}.

    CLARS eq. (4) with per-layer rates :math:`\gamma_k` and
    :math:`d_t = v_{t+1} - v_t`. The increment is computed directly (not as
    a difference of weights), so ``w + increment`` is exactly the new weight
    that :func:`momentum_step` returns, in every precision. This is the one
    place the update is written; the optimizers and the fast backends use or
    are tested against it. No input checks (see :func:`momentum_step`).

    Parameters
    ----------
    directions, trace : sequence of arrays
        :math:`\bar g_k` (plus weight decay) and :math:`d_{t-1,k}`.
    rates : sequence of float or 1-D array
        :math:`\gamma_k`.
    beta : float
        Momentum :math:`\beta \in [0, 1)`.
    nesterov : bool
        Nesterov (mNAG) or heavy ball.
    xp : namespace, optional
        The array namespace; inferred from ``directions`` when not given.

    References
    ----------
    Huo, Gu & Huang (2021), AAAI, eq. (2) and (4).

    Examples
    --------
    >>> import numpy as np
    >>> inc, trace = mnag_increments([np.array([1.0])], [np.array([0.0])], [0.1], beta=0.9)
    >>> inc[0], trace[0]      # -(1 + beta) * rate * g, and -rate * g
    (array([-0.19]), array([-0.1]))
    """
    if xp is None:
        xp = array_namespace(*directions)
    increments, new_trace = [], []
    for k, (g, d) in enumerate(zip(directions, trace)):
        step = _rate_for_layer(xp, rates, k, g.dtype) * g
        d_new = beta * d - step
        increments.append(beta * d_new - step if nesterov else d_new)
        new_trace.append(d_new)
    return tuple(increments), tuple(new_trace)


def apply_momentum(
    xp: Any,
    params: Sequence[Any],
    directions: Sequence[Any],
    trace: Sequence[Any],
    rates: Any,
    beta: float,
    nesterov: bool,
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """:func:`momentum_step` without input checks, for callers that checked already."""
    increments, new_trace = mnag_increments(directions, trace, rates, beta=beta, nesterov=nesterov, xp=xp)
    return tuple(w + inc for w, inc in zip(params, increments)), new_trace


def momentum_step(
    params: Sequence[Any],
    directions: Sequence[Any],
    trace: Sequence[Any],
    rates: Any,
    *,
    beta: float,
    nesterov: bool = True,
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    r"""One mNAG step with per-layer rates (mGD when ``beta == 0``).

    .. math::

        d_{t,k} &= \beta\, d_{t-1,k} - \gamma_k\, \bar g_k, \\
        w_{t+1,k} &= w_{t,k} - \gamma_k\, \bar g_k + \beta\, d_{t,k}
            \quad\text{(Nesterov)}, \qquad
        w_{t+1,k} = w_{t,k} + d_{t,k} \quad\text{(heavy ball)}.

    This is CLARS eq. (4) with :math:`d_t = v_{t+1} - v_t`; the heavy-ball form
    (``nesterov=False``) is offered for comparison only.

    Parameters
    ----------
    params, directions, trace : sequence of arrays
        Per-layer weights :math:`w_k`, descent directions :math:`\bar g_k`
        (the mini-batch gradient, plus weight decay if any) and the trace
        :math:`d_{t-1,k}`. Same library, device, shapes and dtypes.
    rates : sequence of float or 1-D array
        The per-layer rates :math:`\gamma_k`, one per layer.
    beta : float
        Momentum :math:`\beta \in [0, 1)`.
    nesterov : bool
        Nesterov (the paper's mNAG) or heavy-ball momentum.

    Returns
    -------
    (new_params, new_trace) : tuple of tuples of arrays
        New arrays; the inputs are not modified.

    References
    ----------
    Huo, Gu & Huang (2021), *Large Batch Optimization for Deep Learning Using
    New Complete Layer-Wise Adaptive Rate Scaling*, AAAI, eq. (2) and (4).

    Examples
    --------
    >>> import numpy as np
    >>> w, g = [np.array([1.0, 2.0])], [np.array([0.5, -0.5])]
    >>> w1, d1 = momentum_step(w, g, zeros_like_layers(w), [0.1], beta=0.9)
    >>> w1[0]   # first step moves by (1 + beta) * rate * g
    array([0.905, 2.095])
    """
    xp, _ = check_layers(params, directions=directions, trace=trace)
    _check_rates(rates, len(params))
    beta = check_hyperparameter("beta", beta, low=0.0, high=1.0, high_open=True)
    return apply_momentum(xp, params, directions, trace, rates, beta, nesterov)


def velocity_from_trace(params: Sequence[Any], trace: Sequence[Any], *, beta: float) -> tuple[Any, ...]:
    r"""Recover the paper's momentum vector :math:`v_t` from the trace.

    .. math:: v_t = w_t - \beta\, d_{t-1}

    which follows from :math:`w_t = v_t + \beta (v_t - v_{t-1})` and
    :math:`d_{t-1} = v_t - v_{t-1}` (CLARS eq. 4).

    Examples
    --------
    >>> import numpy as np
    >>> velocity_from_trace([np.array([1.0])], [np.array([0.2])], beta=0.5)[0]
    array([0.9])
    """
    check_layers(params, trace=trace)
    beta = check_hyperparameter("beta", beta, low=0.0, high=1.0, high_open=True)
    return tuple(w - beta * d for w, d in zip(params, trace))


def block_microstep(
    params: Sequence[Any],
    velocity: Sequence[Any],
    directions: Sequence[Any],
    rates: Any,
    *,
    beta: float,
    block: int,
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    r"""One micro-step of CLARS eq. (6), restricted to one block (layer).

    .. math::

        v_{t:s+1,k} &= w_{t:s,k} - \gamma_k\, \bar g_k(w_t), \\
        w_{t:s+1,k} &= v_{t:s+1,k} + \beta\,(v_{t:s+1,k} - v_{t:s,k}),

    for :math:`k = k(s)` = ``block``; every other block of :math:`v` and
    :math:`w` is left as it is. The gradient is the stale one computed at
    :math:`w_t`. Applying the micro-step for blocks ``0 .. K-1`` gives exactly
    one step of eq. (4), for any :math:`\beta` and any :math:`\gamma_k`.

    Read literally with full vectors, eq. (6) rewrites *every* block of
    :math:`v` at every micro-step, and the K micro-steps then do not compose to
    eq. (4) when :math:`\beta \ne 0`. The block-restricted reading is the one
    under which the paper's claim holds, so it is the one implemented.

    Parameters
    ----------
    params, velocity, directions : sequence of arrays
        :math:`w_{t:s}`, :math:`v_{t:s}` and the stale gradients :math:`\bar g_k(w_t)`.
    rates : sequence of float or 1-D array
        Per-layer rates :math:`\gamma_k`.
    beta : float
        Momentum in ``[0, 1)``.
    block : int
        The layer :math:`k(s)` (0-based) that this micro-step updates.

    Returns
    -------
    (new_params, new_velocity) : tuple of tuples of arrays

    References
    ----------
    Huo, Gu & Huang (2021), AAAI, eq. (6) ("fine-grained micro-steps").

    Examples
    --------
    >>> import numpy as np
    >>> w = [np.array([1.0]), np.array([2.0])]
    >>> g = [np.array([1.0]), np.array([1.0])]
    >>> w1, v1 = block_microstep(w, w, g, [0.1, 0.1], beta=0.0, block=0)
    >>> w1[0], w1[1]     # only block 0 moved
    (array([0.9]), array([2.]))
    """
    xp, _ = check_layers(params, velocity=velocity, directions=directions)
    _check_rates(rates, len(params))
    beta = check_hyperparameter("beta", beta, low=0.0, high=1.0, high_open=True)
    if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < len(params):
        raise ValueError(f"block must be a layer index in [0, {len(params) - 1}], got {block!r}")
    w, v, g = params[block], velocity[block], directions[block]
    v_new = w - _rate_for_layer(xp, rates, block, w.dtype) * g
    w_new = v_new + beta * (v_new - v)
    new_params = tuple(w_new if k == block else p for k, p in enumerate(params))
    new_velocity = tuple(v_new if k == block else p for k, p in enumerate(velocity))
    return new_params, new_velocity
