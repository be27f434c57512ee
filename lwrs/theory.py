r"""The convergence theory of the CLARS paper, as functions.

Theorems 1 (mGD) and 2 (mNAG) and Corollaries 1-3 of Huo, Gu & Huang (AAAI
2021), for layer-wise rates :math:`\gamma_k = \gamma / L_k`. Every function
takes a :class:`ProblemConstants` (the constants of Assumptions 1 and 2 plus
the run's :math:`B`, :math:`\beta`, :math:`f(w_0) - f_{\inf}` and :math:`T`)
and is plain Python arithmetic.

The convergence criterion is

.. math::

    \frac1T \sum_{t=0}^{T-1} \sum_{k=1}^K q_k\, \mathbb E \|\nabla_k f(w_t)\|^2,
    \qquad q_k = \frac{1/L_k}{\sum_j 1/L_j} .

Readings chosen where the text has typos:

* Theorem 2: the sum under :math:`T\gamma` runs over :math:`k = 1..K` (the
  text writes :math:`t = 0..K`), and :math:`q_k` divides by
  :math:`\sum_k 1/L_k` (the text writes :math:`1/L_K`).
* Corollary 3: :math:`8(1-\eta)` reads :math:`8(1-\beta)`; its last step-size
  constraint :math:`(1-\beta)/(4\beta^2 L_g)` is read as Theorem 2's
  :math:`(1-\beta)^2/(4\beta^2 L_g)`; and its noise term keeps the
  :math:`1/B` that Theorem 2 gives (eq. 8 omits it).
* Corollary 2's first term :math:`64\Delta/((1-\beta) T \sum_k 1/L_k)` is
  looser than what Theorem 2 gives at :math:`\gamma = (1-\beta)/8`; it is kept
  as published (it remains a valid bound).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ProblemConstants",
    "StepSizeLimits",
    "BoundTerms",
    "convergence_criterion",
    "theorem1_step_limits",
    "theorem2_step_limits",
    "theorem1_bound",
    "theorem2_bound",
    "corollary1",
    "corollary2",
    "corollary3",
    "rates_meet_theorem2",
]


@dataclass(frozen=True)
class ProblemConstants:
    r"""The constants the theorems take.

    Attributes
    ----------
    lipschitz : tuple of float
        :math:`L_k`, the layer-wise Lipschitz constants (Assumption 1).
    global_lipschitz : float
        :math:`L_g`, the global Lipschitz constant.
    variance_factors : tuple of float
        :math:`M_k`, the layer-wise gradient-variance factors (Assumption 2).
    variance_floor : float
        :math:`M`, the additive variance constant (Assumption 2).
    batch_size : int
        :math:`B`.
    beta : float
        Momentum :math:`\beta \in [0, 1)`.
    initial_gap : float
        :math:`\Delta = f(w_0) - f_{\inf}`.
    steps : int
        :math:`T`.

    Examples
    --------
    >>> c = ProblemConstants((1.0, 4.0), 4.0, (2.0, 8.0), 0.5, 8, 0.9, 10.0, 1000)
    >>> c.kappa, c.max_variance_factor
    (4.0, 8.0)
    """

    lipschitz: tuple[float, ...]
    global_lipschitz: float
    variance_factors: tuple[float, ...]
    variance_floor: float
    batch_size: int
    beta: float
    initial_gap: float
    steps: int

    def __post_init__(self) -> None:
        if len(self.lipschitz) == 0 or len(self.lipschitz) != len(self.variance_factors):
            raise ValueError(
                f"lipschitz ({len(self.lipschitz)}) and variance_factors ({len(self.variance_factors)}) "
                "need one entry per layer"
            )
        for k, (lk, mk) in enumerate(zip(self.lipschitz, self.variance_factors)):
            if not lk > 0:
                raise ValueError(f"layer {k}: L_k must be positive, got {lk!r}")
            if not mk >= 0:
                raise ValueError(f"layer {k}: M_k must be >= 0, got {mk!r}")
        if not self.global_lipschitz >= max(self.lipschitz) * (1 - 1e-12):
            raise ValueError(f"L_g = {self.global_lipschitz!r} is below max_k L_k = {max(self.lipschitz)!r}")
        if not self.variance_floor >= 0:
            raise ValueError(f"M must be >= 0, got {self.variance_floor!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"B must be a positive int, got {self.batch_size!r}")
        if not 0 <= self.beta < 1:
            raise ValueError(f"beta must lie in [0, 1), got {self.beta!r}")
        if not self.initial_gap >= 0:
            raise ValueError(f"f(w0) - f_inf must be >= 0, got {self.initial_gap!r}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"T must be a positive int, got {self.steps!r}")

    @property
    def kappa(self) -> float:
        r""":math:`\kappa = \max_k L_g / L_k`."""
        return self.global_lipschitz / min(self.lipschitz)

    @property
    def max_variance_factor(self) -> float:
        r""":math:`M_g = \max_k M_k`."""
        return max(self.variance_factors)

    @property
    def inverse_lipschitz_sum(self) -> float:
        r""":math:`\sum_k 1/L_k`."""
        return sum(1.0 / lk for lk in self.lipschitz)

    @property
    def weights(self) -> tuple[float, ...]:
        r"""The criterion's weights :math:`q_k = (1/L_k) / \sum_j 1/L_j`."""
        total = self.inverse_lipschitz_sum
        return tuple((1.0 / lk) / total for lk in self.lipschitz)

    def with_steps(self, steps: int) -> ProblemConstants:
        """The same constants for another horizon :math:`T`."""
        return ProblemConstants(self.lipschitz, self.global_lipschitz, self.variance_factors,
                                self.variance_floor, self.batch_size, self.beta, self.initial_gap, steps)


@dataclass(frozen=True)
class StepSizeLimits:
    r"""Every upper limit a theorem puts on :math:`\gamma` (with :math:`\gamma_k = \gamma/L_k`).

    Attributes
    ----------
    limits : dict of str to float
        Each condition's name and the largest :math:`\gamma` it allows
        (``inf`` where it does not constrain, e.g. :math:`\beta = 0`).
    """

    limits: dict[str, float]

    @property
    def largest(self) -> float:
        r"""The largest admissible :math:`\gamma`: the minimum of all limits."""
        return min(self.limits.values())

    @property
    def binding(self) -> str:
        """The name of the condition that attains the minimum."""
        return min(self.limits, key=self.limits.get)


@dataclass(frozen=True)
class BoundTerms:
    """A theorem's right-hand side, term by term.

    Attributes
    ----------
    optimization : float
        The term that decays like :math:`1/(T\\gamma)`.
    noise : float
        The term proportional to :math:`M\\gamma/B`.
    """

    optimization: float
    noise: float

    @property
    def total(self) -> float:
        """The bound: the sum of the two terms."""
        return self.optimization + self.noise


def _mean_inverse_lipschitz(c: ProblemConstants) -> float:
    return c.inverse_lipschitz_sum / len(c.lipschitz)


def _over(numerator: float, denominator: float) -> float:
    return math.inf if denominator == 0 else numerator / denominator


def convergence_criterion(layer_grad_sq: Sequence[float], lipschitz: Sequence[float]) -> float:
    r"""One step's term of the criterion: :math:`\sum_k q_k \|\nabla_k f(w_t)\|^2`.

    .. math:: \sum_{k=1}^K \frac{1/L_k}{\sum_j 1/L_j}\, \|\nabla_k f(w_t)\|^2

    References: CLARS Theorems 1 and 2.

    Examples
    --------
    >>> convergence_criterion([4.0, 1.0], [1.0, 3.0])    # q = (3/4, 1/4)
    3.25
    """
    if len(layer_grad_sq) != len(lipschitz):
        raise ValueError(f"{len(layer_grad_sq)} gradient norms for {len(lipschitz)} layers")
    total = sum(1.0 / lk for lk in lipschitz)
    return sum((1.0 / lk) / total * g for g, lk in zip(layer_grad_sq, lipschitz))


def theorem1_step_limits(c: ProblemConstants) -> StepSizeLimits:
    r"""The step-size conditions of Theorem 1 (mGD), as limits on :math:`\gamma`.

    .. math::

        \gamma_k \le \min\Big\{\frac{1}{8L_k}, \frac{B}{8L_kM_k}\Big\}, \qquad
        \frac1K\sum_k \gamma_k \le \min\Big\{\frac{1}{2L_g}, \frac{1}{2L_g}\sqrt{\frac{B}{M_g}}\Big\}

    References: CLARS Theorem 1.

    Examples
    --------
    >>> c = ProblemConstants((1.0, 4.0), 4.0, (2.0, 8.0), 0.5, 8, 0.0, 10.0, 1000)
    >>> lim = theorem1_step_limits(c)
    >>> lim.binding, lim.largest
    ('1/(8 L_k)', 0.125)
    """
    h, B, Mg, Lg = _mean_inverse_lipschitz(c), c.batch_size, c.max_variance_factor, c.global_lipschitz
    return StepSizeLimits({
        "1/(8 L_k)": 1.0 / 8.0,
        "B/(8 L_k M_k)": _over(B, 8.0 * Mg),
        "mean: 1/(2 L_g)": 1.0 / (2.0 * Lg * h),
        "mean: sqrt(B/M_g)/(2 L_g)": _over(math.sqrt(B), 2.0 * Lg * h * math.sqrt(Mg)),
    })


def theorem2_step_limits(c: ProblemConstants) -> StepSizeLimits:
    r"""The step-size conditions of Theorem 2 (mNAG), as limits on :math:`\gamma`.

    .. math::

        \gamma_k &\le \min\Big\{\frac{1-\beta}{8L_k}, \frac{(1-\beta)B}{8L_kM_k}\Big\}, \\
        \frac1K\sum_k \gamma_k &\le \min\Big\{\frac{(1-\beta)^2}{4\beta^2L_g},
            \frac{(1-\beta)^2\sqrt B}{4\beta^2L_g\sqrt{M_g}},
            \frac{(1-\beta)\sqrt B}{4L_g\sqrt{M_g}}, \frac{1-\beta}{4L_g}\Big\}

    The :math:`\beta^2` limits are infinite at :math:`\beta = 0`.

    References: CLARS Theorem 2.

    Examples
    --------
    >>> c = ProblemConstants((1.0, 4.0), 4.0, (2.0, 8.0), 0.5, 8, 0.9, 10.0, 1000)
    >>> lim = theorem2_step_limits(c)
    >>> lim.binding, round(lim.largest, 6)
    ('mean: (1-b)^2/(4 b^2 L_g)', 0.001235)
    """
    h, B, Mg, Lg, b = _mean_inverse_lipschitz(c), c.batch_size, c.max_variance_factor, c.global_lipschitz, c.beta
    one = 1.0 - b
    return StepSizeLimits({
        "(1-b)/(8 L_k)": one / 8.0,
        "(1-b)B/(8 L_k M_k)": _over(one * B, 8.0 * Mg),
        "mean: (1-b)^2/(4 b^2 L_g)": _over(one**2, 4.0 * b * b * Lg * h),
        "mean: (1-b)^2 sqrt(B)/(4 b^2 L_g sqrt(M_g))": _over(one**2 * math.sqrt(B), 4.0 * b * b * Lg * h * math.sqrt(Mg)),
        "mean: (1-b) sqrt(B)/(4 L_g sqrt(M_g))": _over(one * math.sqrt(B), 4.0 * Lg * h * math.sqrt(Mg)),
        "mean: (1-b)/(4 L_g)": one / (4.0 * Lg * h),
    })


def _check_gamma(gamma: float) -> float:
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be finite and positive, got {gamma!r}")
    return float(gamma)


def theorem1_bound(c: ProblemConstants, gamma: float) -> BoundTerms:
    r"""The right-hand side of Theorem 1 (mGD) at :math:`\gamma`.

    .. math:: \frac{8\,(f(w_0) - f_{\inf})}{T\gamma\sum_k 1/L_k} + \frac{(4 + 2\kappa)\,M\gamma}{B}

    Valid when :math:`\gamma \le` :func:`theorem1_step_limits` ``.largest``.

    References: CLARS Theorem 1.

    Examples
    --------
    >>> c = ProblemConstants((1.0, 1.0), 1.0, (0.0, 0.0), 1.0, 1, 0.0, 1.0, 8)
    >>> b = theorem1_bound(c, 0.125)
    >>> b.optimization, b.noise
    (4.0, 0.75)
    """
    gamma = _check_gamma(gamma)
    return BoundTerms(
        8.0 * c.initial_gap / (c.steps * gamma * c.inverse_lipschitz_sum),
        (4.0 + 2.0 * c.kappa) * c.variance_floor * gamma / c.batch_size,
    )


def theorem2_bound(c: ProblemConstants, gamma: float) -> BoundTerms:
    r"""The right-hand side of Theorem 2 (mNAG) at :math:`\gamma`.

    .. math::

        \frac{8(1-\beta)(f(w_0) - f_{\inf})}{T\gamma\sum_{k=1}^K 1/L_k}
        + \frac{M\gamma}{(1-\beta)B}\Big(4 + 2\kappa + \frac{2\kappa}{1-\beta}\Big)

    Valid when :math:`\gamma \le` :func:`theorem2_step_limits` ``.largest``.

    References: CLARS Theorem 2.

    Examples
    --------
    >>> c = ProblemConstants((1.0, 1.0), 1.0, (0.0, 0.0), 1.0, 1, 0.5, 1.0, 8)
    >>> b = theorem2_bound(c, 0.0625)
    >>> b.optimization, b.noise
    (4.0, 1.25)
    """
    gamma = _check_gamma(gamma)
    one = 1.0 - c.beta
    return BoundTerms(
        8.0 * one * c.initial_gap / (c.steps * gamma * c.inverse_lipschitz_sum),
        c.variance_floor * gamma / (one * c.batch_size) * (4.0 + 2.0 * c.kappa + 2.0 * c.kappa / one),
    )


def _corollary_gamma(c: ProblemConstants, cap: float) -> float:
    if c.variance_floor == 0:
        return cap
    return min(cap, math.sqrt(c.batch_size * c.initial_gap / (c.steps * c.variance_floor * c.inverse_lipschitz_sum)))


def _root_term(c: ProblemConstants) -> float:
    return math.sqrt(c.variance_floor * c.initial_gap / (c.steps * c.batch_size * c.inverse_lipschitz_sum))


def corollary1(c: ProblemConstants) -> tuple[float, float]:
    r"""Corollary 1 (mGD): the step size and the :math:`O(1/\sqrt T)` rate.

    .. math::

        \gamma = \min\Big\{\frac18, \sqrt{\frac{B\Delta}{TM\sum_k 1/L_k}}\Big\}, \qquad
        \text{rate} = \frac{64\Delta}{T\sum_k 1/L_k} + (12 + 2\kappa)\sqrt{\frac{M\Delta}{TB\sum_k 1/L_k}}

    References: CLARS Corollary 1.

    Examples
    --------
    >>> c = ProblemConstants((1.0,), 1.0, (0.0,), 1.0, 4, 0.0, 1.0, 4)
    >>> corollary1(c)
    (0.125, 19.5)
    """
    gamma = _corollary_gamma(c, 1.0 / 8.0)
    rate = 64.0 * c.initial_gap / (c.steps * c.inverse_lipschitz_sum) + (12.0 + 2.0 * c.kappa) * _root_term(c)
    return gamma, rate


def corollary2(c: ProblemConstants) -> tuple[float, float]:
    r"""Corollary 2 (mNAG): the step size and the :math:`O(1/\sqrt T)` rate of eq. (7).

    .. math::

        \gamma = \min\Big\{\frac{1-\beta}8, \sqrt{\frac{B\Delta}{TM\sum_k 1/L_k}}\Big\}, \\
        \text{rate} = \frac{64\Delta}{(1-\beta)T\sum_k 1/L_k}
            + \Big(8 + \frac{1}{1-\beta}\big(4 + 2\kappa + \frac{2\kappa}{1-\beta}\big)\Big)
              \sqrt{\frac{M\Delta}{TB\sum_k 1/L_k}}

    References: CLARS Corollary 2, eq. (7).

    Examples
    --------
    >>> c = ProblemConstants((1.0,), 1.0, (0.0,), 1.0, 4, 0.5, 1.0, 4)
    >>> corollary2(c)
    (0.0625, 39.0)
    """
    one = 1.0 - c.beta
    gamma = _corollary_gamma(c, one / 8.0)
    factor = 8.0 + (4.0 + 2.0 * c.kappa + 2.0 * c.kappa / one) / one
    rate = 64.0 * c.initial_gap / (one * c.steps * c.inverse_lipschitz_sum) + factor * _root_term(c)
    return gamma, rate


def corollary3(c: ProblemConstants, gamma_g: float) -> tuple[StepSizeLimits, BoundTerms]:
    r"""Corollary 3: one Lipschitz constant and one variance factor for all layers.

    With :math:`L_k = L_g`, :math:`M_k = M_g` and :math:`M_C = KM`, for a
    global rate :math:`\gamma_g` within the limits,

    .. math::

        \frac1T\sum_t \mathbb E\|\nabla f(w_t)\|^2 \le
        \frac{8(1-\beta)\Delta}{T\gamma_g} + \frac{M_C L_g \gamma_g}{(1-\beta)B}\Big(6 + \frac{2}{1-\beta}\Big).

    The limits are :math:`\gamma_g \le \min\{\frac{1-\beta}{8L_g}, \frac{B(1-\beta)}{8L_gM_g},
    \frac{(1-\beta)\sqrt B}{4L_g\sqrt{M_g}}, \frac{(1-\beta)^2\sqrt B}{4\beta^2L_g\sqrt{M_g}},
    \frac{(1-\beta)^2}{4\beta^2L_g}\}` (the last read as in Theorem 2; see the module notes).

    References: CLARS Corollary 3, eq. (8).

    Examples
    --------
    >>> c = ProblemConstants((2.0, 2.0), 2.0, (1.0, 1.0), 0.5, 4, 0.0, 1.0, 100)
    >>> limits, bound = corollary3(c, 0.05)
    >>> round(limits.largest, 6), round(bound.total, 6)
    (0.0625, 1.8)
    """
    Lg, Mg, b, B = c.global_lipschitz, c.max_variance_factor, c.beta, c.batch_size
    if max(c.lipschitz) != min(c.lipschitz) or max(c.variance_factors) != min(c.variance_factors):
        raise ValueError("corollary3 needs equal L_k and equal M_k across layers")
    one = 1.0 - b
    limits = StepSizeLimits({
        "(1-b)/(8 L_g)": one / (8.0 * Lg),
        "B(1-b)/(8 L_g M_g)": _over(B * one, 8.0 * Lg * Mg),
        "(1-b) sqrt(B)/(4 L_g sqrt(M_g))": _over(one * math.sqrt(B), 4.0 * Lg * math.sqrt(Mg)),
        "(1-b)^2 sqrt(B)/(4 b^2 L_g sqrt(M_g))": _over(one**2 * math.sqrt(B), 4.0 * b * b * Lg * math.sqrt(Mg)),
        "(1-b)^2/(4 b^2 L_g)": _over(one**2, 4.0 * b * b * Lg),
    })
    gamma_g = _check_gamma(gamma_g)
    m_c = len(c.lipschitz) * c.variance_floor
    bound = BoundTerms(
        8.0 * one * c.initial_gap / (c.steps * gamma_g),
        m_c * Lg * gamma_g / (one * B) * (6.0 + 2.0 / one),
    )
    return limits, bound


def rates_meet_theorem2(rates: Sequence[float], c: ProblemConstants, *, rtol: float = 1e-12) -> bool:
    r"""Whether per-layer rates :math:`\gamma_k` meet Theorem 2's conditions (any rates, not only :math:`\gamma/L_k`).

    .. math::

        \gamma_k \le \frac{1-\beta}{8L_k}\min\Big\{1, \frac{B}{M_k}\Big\}\ \forall k, \qquad
        \frac1K\sum_k\gamma_k \le \frac{1}{L_g}\min\Big\{\frac{(1-\beta)^2}{4\beta^2}, \dots, \frac{1-\beta}{4}\Big\}

    With :math:`\beta = 0` these are Theorem 1's per-layer conditions and
    Theorem 2's mean conditions, which are stricter than Theorem 1's
    (:math:`1/(4L_g)` against :math:`1/(2L_g)`).

    References: CLARS Theorem 2.

    Examples
    --------
    >>> c = ProblemConstants((1.0, 4.0), 4.0, (2.0, 8.0), 0.5, 8, 0.0, 10.0, 1000)
    >>> rates_meet_theorem2([0.1, 0.01], c), rates_meet_theorem2([0.2, 0.01], c)
    (True, False)
    """
    if len(rates) != len(c.lipschitz):
        raise ValueError(f"{len(rates)} rates for {len(c.lipschitz)} layers")
    one, B = 1.0 - c.beta, c.batch_size
    for r, lk, mk in zip(rates, c.lipschitz, c.variance_factors):
        if r > (1 + rtol) * min(one / (8.0 * lk), _over(one * B, 8.0 * lk * mk)):
            return False
    limits = theorem2_step_limits(c).limits
    mean_limit = min(v * _mean_inverse_lipschitz(c) for name, v in limits.items() if name.startswith("mean"))
    return sum(rates) / len(rates) <= (1 + rtol) * mean_limit
