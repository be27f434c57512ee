r"""The non-finite policy: what a step does when a norm is ``inf`` or ``nan``.

Every optimizer checks the per-layer norms it computes anyway (weights,
gradients, and the mean per-sample norms when given). With
``on_nonfinite="raise"`` an eager step raises :class:`~lwrs.NonFiniteError`
naming the first bad layer (this reads one flag on the host). With
``on_nonfinite="skip"`` the step is skipped:

.. math::

    \text{ok} = \bigwedge_k \operatorname{isfinite}(\|w_k\|) \wedge \operatorname{isfinite}(\|\bar g_k\|),
    \qquad
    x_{t+1} = \begin{cases} x_{t+1}^{\text{new}} & \text{ok} \\ x_t & \text{otherwise} \end{cases}

for the weights, every state array and the step count. The checks cover the
inputs (weights, gradients, statistics), the state (momentum buffer, Adam's
moments) and the step's size: a step whose result would overflow the dtype
(:func:`step_size_check`) counts as non-finite too. Under tracing
(``jax.jit``, ``torch.compile``) or with an array step count, the selection is
``where(ok, new, old)`` on the device: no host synchronisation. These functions
are the policy's one implementation; the fast backends use or are tested
against them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace, device, is_array_api_obj

from .diagnostics import LayerDiagnostics

__all__ = [
    "all_finite",
    "first_nonfinite",
    "select",
    "skipped_diagnostics",
    "where_skipped_diagnostics",
    "momentum_step_bounds",
    "step_size_check",
    "STEP_SIZE",
]

STEP_SIZE = "step size (the update would overflow)"
"""The name of the check that a step's result stays inside its dtype (see :func:`step_size_check`)."""


def all_finite(values: Sequence[Any], *, xp: Any = None) -> Any:
    r"""One 0-d bool array: whether every entry of every array in ``values`` is finite.

    .. math:: \text{ok} = \bigwedge_{a \in \text{values}} \bigwedge_j \operatorname{isfinite}(a_j)

    No host synchronisation: the result stays on the device.

    Examples
    --------
    >>> import numpy as np
    >>> bool(all_finite([np.array([1.0, 2.0]), np.array([np.inf])]))
    False
    """
    if xp is None:
        xp = array_namespace(*values)
    flags = [xp.all(xp.isfinite(v)) for v in values]
    ok = flags[0]
    for f in flags[1:]:
        ok = ok & f
    return ok


def first_nonfinite(checks: Sequence[tuple[str, Any]], *, xp: Any = None, names: Sequence[str] | None = None) -> str | None:
    r"""Name the first layer whose value is not finite, or ``None`` (eager only: reads values on the host).

    ``checks`` is a sequence of ``(what, per_layer_values)``; the message is
    ``"layer k: <what> is not finite (value v)"`` (``"layer k (path): ..."``
    with ``names``, the layers' pytree paths). When every value is finite
    this costs one host synchronisation.

    .. math:: k^\ast = \min\{k : \neg\operatorname{isfinite}(x_k)\}

    Examples
    --------
    >>> import numpy as np
    >>> first_nonfinite([("gradient norm", np.array([1.0, np.nan]))])
    'layer 1: gradient norm is not finite (value nan)'
    """
    if xp is None:
        xp = array_namespace(*[v for _, v in checks])
    flags = [xp.all(xp.isfinite(v)) for _, v in checks]
    if all(bool(f) for f in flags):
        return None
    for (what, values), ok in zip(checks, flags):
        if not bool(ok):
            for k in range(values.shape[0]):
                if not bool(xp.isfinite(values[k])):
                    label = f"layer {k}" if names is None else f"layer {k} ({names[k]})"
                    return f"{label}: {what} is not finite (value {float(values[k])!r})"
    return "a value is not finite"  # pragma: no cover - unreachable: some flag was False


def select(ok: Any, new: Sequence[Any], old: Sequence[Any], *, xp: Any = None) -> tuple[Any, ...]:
    r"""``where(ok, new_k, old_k)`` for every array pair: the skip policy's selection, on the device.

    .. math:: x_k = \begin{cases} x^{\text{new}}_k & \text{ok} \\ x^{\text{old}}_k & \text{otherwise} \end{cases}

    ``old`` may hold Python numbers (e.g. ``0.0`` for a zero increment).

    Examples
    --------
    >>> import numpy as np
    >>> select(np.asarray(False), [np.array([np.nan])], [np.array([1.0])])
    (array([1.]),)
    """
    if xp is None:
        xp = array_namespace(ok)
    out = []
    for n, o in zip(new, old):
        if not is_array_api_obj(o):
            o = xp.full_like(n, o)
        out.append(xp.where(ok, n, o))
    return tuple(out)


def skipped_diagnostics(weight_norms: Any, grad_norms: Any, learning_rate: Any, step: Any) -> LayerDiagnostics:
    r"""The diagnostics of a skipped step: ratios and CLARS factors 1, rates 0, ``skipped=True``.

    .. math:: r_k = 1, \quad c_k = 1, \quad \gamma_k = 0

    Examples
    --------
    >>> import numpy as np
    >>> d = skipped_diagnostics(np.array([1.0]), np.array([np.nan]), 0.1, 3)
    >>> d.rates, d.skipped
    (array([0.]), True)
    """
    xp = array_namespace(weight_norms)
    ones = xp.ones_like(weight_norms)
    return LayerDiagnostics(weight_norms, grad_norms, ones, ones, xp.zeros_like(weight_norms), learning_rate, step,
                            skipped=True)


def where_skipped_diagnostics(ok: Any, diagnostics: LayerDiagnostics) -> LayerDiagnostics:
    r"""Diagnostics that read as :func:`skipped_diagnostics` where ``ok`` is false, on the device.

    .. math:: r_k \leftarrow \text{ok}\ ?\ r_k : 1, \quad c_k \leftarrow \text{ok}\ ?\ c_k : 1, \quad
              \gamma_k \leftarrow \text{ok}\ ?\ \gamma_k : 0, \quad \text{skipped} = \neg\text{ok}

    Examples
    --------
    >>> import numpy as np
    >>> d = skipped_diagnostics(np.array([1.0]), np.array([1.0]), 0.1, 3)._replace(rates=np.array([0.5]))
    >>> where_skipped_diagnostics(np.asarray(True), d).rates
    array([0.5])
    """
    xp = array_namespace(ok)
    ratios, factors, rates = select(ok, [diagnostics.trust_ratios, diagnostics.clars_factors, diagnostics.rates],
                                    [1.0, 1.0, 0.0], xp=xp)
    return diagnostics._replace(trust_ratios=ratios, clars_factors=factors, rates=rates, skipped=~ok)


def momentum_step_bounds(weight_norms: Any, rates: Any, direction_bounds: Any, trace_norms: Any, *, beta: float,
                         nesterov: bool = True) -> Any:
    r"""Per layer, an upper bound on every entry of the new weights and trace of an mNAG step.

    With :math:`s_k = \gamma_k (\|\bar g_k\| + \lambda_k \|w_k\|) \ge \|\gamma_k(\bar g_k + \lambda_k w_k)\|`,
    the triangle inequality on CLARS eq. (4) gives

    .. math::

        \|d_{t,k}\| \le \beta\|d_{t-1,k}\| + s_k,

        \|w_{t+1,k}\| \le \|w_{t,k}\| + s_k + \beta\|d_{t,k}\| \quad \text{(Nesterov)},

        \|w_{t+1,k}\| \le \|w_{t,k}\| + \|d_{t,k}\| \quad \text{(heavy ball)}.

    A step whose bound stays below the dtype's largest number cannot overflow;
    this is checked from norms, without a pass over the new weights.
    ``direction_bounds`` is :math:`\|\bar g_k\| + \lambda_k\|w_k\|`.

    Examples
    --------
    >>> import numpy as np
    >>> momentum_step_bounds(np.array([1.0]), np.array([0.5]), np.array([2.0]), np.array([0.0]), beta=0.5)
    array([2.5])
    """
    step = rates * direction_bounds
    if not beta:  # mGD: no trace term (and no 0 * inf)
        return weight_norms + step
    trace = beta * trace_norms + step
    return weight_norms + step + beta * trace if nesterov else weight_norms + trace


def step_size_check(rates: Any, bounds: Any, dtypes: Sequence[Any], *, xp: Any = None) -> Any:
    r"""The rates where a step fits its layer's dtype, :math:`+\infty` where it would overflow.

    .. math::

        c_k = \begin{cases} \gamma_k & b_k \text{ finite and } b_k \le \max(\text{dtype}_k) \\
        +\infty & \text{otherwise} \end{cases}

    with :math:`b_k` a bound on the new values (:func:`momentum_step_bounds`,
    or :math:`\|w_k\| + \gamma_k\|u_k\|` for LAMB). The non-finite policy
    checks it under the name :data:`STEP_SIZE`, so a step that would overflow
    raises or is skipped like one with a non-finite gradient.

    Examples
    --------
    >>> import numpy as np
    >>> step_size_check(np.array([0.1, 0.1]), np.array([1.0, 1e39]), [np.float32, np.float32])
    array([0.1, inf])
    """
    if xp is None:
        xp = array_namespace(rates)
    limit = xp.asarray([float(xp.finfo(dt).max) for dt in dtypes], dtype=bounds.dtype, device=device(bounds))
    fits = xp.isfinite(bounds) & (bounds <= limit)
    return xp.where(fits, rates, xp.full_like(rates, float("inf")))


def step_after(ok: Any, step: Any, *, xp: Any) -> Any:
    """The step count after a step: ``where(ok, step + 1, step)`` as a 0-d array on ``ok``'s device (private)."""
    if not is_array_api_obj(step):
        step = xp.asarray(step, device=device(ok))
    return xp.where(ok, step + 1, step)
