r"""Per-layer diagnostics returned by every optimizer step.

They are by-products of the step: the norms and ratios the step computed
anyway, so reading them costs no extra pass over the weights or gradients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["LayerDiagnostics"]


class LayerDiagnostics(NamedTuple):
    r"""What one optimizer step saw and did, per layer.

    Every array field is 1-D with one entry per layer, in the parameters'
    array library and device, in the :func:`~lwrs.rates.statistics_dtype`.

    Attributes
    ----------
    weight_norms : array
        :math:`\|w_k\|` before the step.
    grad_norms : array
        :math:`\|\bar g_k\|`, the mini-batch gradient (without weight decay).
    trust_ratios : array
        The LARS ratio :math:`\eta\|w_k\|/D^{\mathrm{LARS}}_k` (LAMB's
        :math:`\|w_k\|/\|u_k\|` for ``lamb``; 1 for ``mgd`` and ``mnag``).
    clars_factors : array
        :math:`D^{\mathrm{LARS}}_k / D^{\mathrm{CLARS}}_k \in [0, 1]` when
        per-sample statistics were given, else 1. Reported for every layer,
        applied only by ``clars`` and only to adapted layers.
    rates : array
        The effective per-layer rate :math:`\gamma_k` that the update used.
    learning_rate : float or 0-d array
        The global rate :math:`\gamma_t` of the schedule at this step (a 0-d
        array when the step count is an array, e.g. under ``jax.jit``).
    step : int or 0-d array
        The step count :math:`t` before this step.
    skipped : bool or 0-d bool array
        ``True`` when the step was skipped because of a non-finite input
        (``on_nonfinite="skip"``); the parameters and state are then unchanged.
        A 0-d array when the skip was decided on the device (array step count
        or traced values).

    Examples
    --------
    >>> import numpy as np, lwrs
    >>> opt = lwrs.lars(0.1)
    >>> params = [np.ones((2, 2))]
    >>> _, _, diag = opt.step(params, [np.ones((2, 2))], opt.init(params))
    >>> diag.trust_ratios
    array([0.001])
    """

    weight_norms: Any
    grad_norms: Any
    trust_ratios: Any
    clars_factors: Any
    rates: Any
    learning_rate: float
    step: int
    skipped: bool = False

    def as_records(self) -> list[dict[str, float]]:
        """One plain ``dict`` of Python floats per layer, for logging or JSON.

        This copies the arrays to the host (one synchronisation).

        Examples
        --------
        >>> import numpy as np, lwrs
        >>> opt = lwrs.mnag(0.1)
        >>> _, _, diag = opt.step([np.ones(2)], [np.ones(2)], opt.init([np.ones(2)]))
        >>> diag.as_records()[0]["rate"]
        0.1
        """
        fields = {
            "weight_norm": self.weight_norms,
            "grad_norm": self.grad_norms,
            "trust_ratio": self.trust_ratios,
            "clars_factor": self.clars_factors,
            "rate": self.rates,
        }
        count = self.weight_norms.shape[0]
        return [{name: float(values[k]) for name, values in fields.items()} for k in range(count)]
