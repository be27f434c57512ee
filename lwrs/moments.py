r"""LAMB's Adam moments and its update direction, per layer.

.. math::

    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\bar g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\bar g_t^2, \\
    u_t &= \frac{m_t / (1 - \beta_1^{t})}{\sqrt{v_t / (1 - \beta_2^{t})} + \epsilon} + \lambda w_t

with :math:`t` counted from 1. LAMB's trust ratio :math:`\|w_k\| / \|u_k\|`
comes from :func:`lwrs.layer_trust_ratios` with :math:`\eta = 1`. These are
the one implementation of LAMB's math; the torch fast path is tested against
them.

References: You et al. (2019), *Large Batch Optimization for Deep Learning:
Training BERT in 76 minutes*, Algorithm 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace, is_array_api_obj

__all__ = ["lamb_moments", "lamb_directions", "warn_float16"]


def warn_float16(dtypes: Sequence[Any]) -> None:
    r"""Warn (``RuntimeWarning``) when LAMB is given float16 layers: its second moment underflows there.

    :math:`(1 - \beta_2) g^2` is below float16's smallest number for :math:`|g|` under about
    :math:`8\cdot 10^{-3}` (:math:`\beta_2 = 0.999`); :math:`v` then stays 0 and
    :math:`u = \hat m / \epsilon`, a step up to :math:`1/\epsilon` times too large where no trust
    ratio bounds it, and in the wrong direction where one does. bfloat16 has float32's range.

    Examples
    --------
    >>> import warnings, numpy as np
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always"); warn_float16([np.float32, np.float16])
    >>> len(seen), seen[0].category.__name__
    (1, 'RuntimeWarning')
    """
    import warnings

    if any(str(dt).rsplit(".", 1)[-1].strip("'>") == "float16" for dt in dtypes):
        warnings.warn("LAMB with float16 layers: its second moment (1 - beta2) g^2 underflows float16 for |g| below "
                      "about 8e-3, and the step becomes m / eps (far too large, or in another direction); keep "
                      "float32 (or bfloat16) parameters, as mixed precision's master weights are", RuntimeWarning,
                      stacklevel=3)


def lamb_moments(
    grads: Sequence[Any], first: Sequence[Any], second: Sequence[Any], *, beta1: float, beta2: float, xp: Any = None
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    r"""Adam's moving averages after one gradient.

    .. math:: m_t = \beta_1 m_{t-1} + (1 - \beta_1)\bar g_t, \qquad v_t = \beta_2 v_{t-1} + (1 - \beta_2)\bar g_t^2

    References: You et al. (2019), Algorithm 2, lines 6-7.

    Examples
    --------
    >>> import numpy as np
    >>> m, v = lamb_moments([np.array([2.0])], [np.array([0.0])], [np.array([0.0])], beta1=0.9, beta2=0.99)
    >>> m[0], v[0]
    (array([0.2]), array([0.04]))
    """
    if xp is None:
        xp = array_namespace(*grads)
    m = tuple(beta1 * mk + (1.0 - beta1) * g for mk, g in zip(first, grads))
    v = tuple(beta2 * vk + (1.0 - beta2) * (g * g) for vk, g in zip(second, grads))
    return m, v


def lamb_directions(
    first: Sequence[Any],
    second: Sequence[Any],
    params: Sequence[Any],
    *,
    step: Any,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decays: Sequence[float],
    xp: Any = None,
) -> tuple[Any, ...]:
    r"""LAMB's update direction per layer: the bias-corrected Adam step plus decoupled weight decay.

    .. math:: u_k = \frac{m_k / (1 - \beta_1^{t})}{\sqrt{v_k / (1 - \beta_2^{t})} + \epsilon} + \lambda_k w_k

    ``step`` is :math:`t` (counted from 1, i.e. the state's step count plus
    one): an int, or a 0-d floating array of the layers' dtype under tracing.

    References: You et al. (2019), Algorithm 2, lines 8-9.

    Examples
    --------
    >>> import numpy as np
    >>> u = lamb_directions([np.array([0.1])], [np.array([0.01])], [np.array([1.0])], step=1,
    ...                     beta1=0.9, beta2=0.99, eps=0.0, weight_decays=[0.5])
    >>> np.round(u[0], 12)       # m_hat / sqrt(v_hat) = 1 / 1, plus 0.5 * w
    array([1.5])
    """
    if xp is None:
        xp = array_namespace(*params)
    if is_array_api_obj(step):
        c1, c2 = 1.0 - beta1**step, 1.0 - beta2**step
        c1 = [xp.astype(c1, w.dtype) for w in params]
        c2 = [xp.astype(c2, w.dtype) for w in params]
    else:
        c1, c2 = [1.0 - beta1**step] * len(params), [1.0 - beta2**step] * len(params)
    return tuple(
        (mk / a) / (xp.sqrt(vk / b) + eps) + (0.0 if _static_zero(wd) else wd * w)
        for mk, vk, w, wd, a, b in zip(first, second, params, weight_decays, c1, c2)
    )


def _static_zero(value: Any) -> bool:
    """Whether ``value`` is a Python number equal to 0 (a traced array is never: no branch on its value)."""
    return isinstance(value, (int, float)) and value == 0
