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

for the weights, every state array and the step count. Under tracing
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

__all__ = ["all_finite", "first_nonfinite", "select", "skipped_diagnostics", "where_skipped_diagnostics"]


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


def first_nonfinite(checks: Sequence[tuple[str, Any]], *, xp: Any = None) -> str | None:
    r"""Name the first layer whose value is not finite, or ``None`` (eager only: reads values on the host).

    ``checks`` is a sequence of ``(what, per_layer_values)``; the message is
    ``"layer k: <what> is not finite (value v)"``. When every value is finite
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
                    return f"layer {k}: {what} is not finite (value {float(values[k])!r})"
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


def step_after(ok: Any, step: Any, *, xp: Any) -> Any:
    """The step count after a step: ``where(ok, step + 1, step)`` as a 0-d array on ``ok``'s device (private)."""
    if not is_array_api_obj(step):
        step = xp.asarray(step, device=device(ok))
    return xp.where(ok, step + 1, step)
