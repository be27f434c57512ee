r"""The fixed battery of small, seeded problems the conformance kit drives an optimizer through.

Every layer :math:`k` of a problem has a separable quadratic gradient with seeded noise,

.. math:: \bar g_{k,t} = h_k \odot (w_{k,t} - c_k) + \sigma_k\, \xi_{k,t},

so the gradient depends on where the optimizer has moved the weights, and a
trajectory, not just a single step, is compared. Special layers are special
choices of :math:`(h_k, c_k, \sigma_k)`: a *zero-gradient* layer has
:math:`h_k = 0, \sigma_k = 0`; a layer *near the weight-decay equilibrium* has
:math:`h_k = -\lambda, c_k = 0` and small noise, so that :math:`\bar g_k +
\lambda w_k \approx 0` while :math:`\|\bar g_k\| + \lambda\|w_k\|` is not
(the two weight-decay forms of the LARS denominator then differ by orders of
magnitude). The problems are built from Python's :mod:`random` with fixed
seeds, so they are the same in every array library; the arrays are made in
whatever namespace the optimizer under test uses.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from array_api_compat import array_namespace

__all__ = ["Layer", "Problem", "SAMPLES", "battery"]


@dataclass(frozen=True)
class Layer:
    """One parameter tensor of a problem: its name, shape, initial value and gradient law.

    ``init``, ``curvature`` and ``center`` are flat tuples of ``prod(shape)``
    floats; ``noise`` holds one such tuple per step.
    """

    name: str
    shape: tuple[int, ...]
    init: tuple[float, ...]
    curvature: tuple[float, ...]
    center: tuple[float, ...]
    noise: tuple[tuple[float, ...], ...]
    role: str = "layer"


@dataclass(frozen=True)
class Problem:
    """A seeded problem: layers, the per-step learning rates and the other hyperparameters.

    Attributes
    ----------
    name, description : str
    layers : tuple of Layer
    learning_rates : tuple of float
        :math:`\\gamma_t` for every step ``t`` (constant on most problems).
    beta, eta, weight_decay : float
        Momentum, trust coefficient and weight decay :math:`\\lambda` the optimizer is built with.
    """

    name: str
    description: str
    layers: tuple[Layer, ...]
    learning_rates: tuple[float, ...]
    beta: float
    eta: float
    weight_decay: float

    @property
    def steps(self) -> int:
        """Number of steps the problem runs."""
        return len(self.learning_rates)

    @property
    def constant_rate(self) -> bool:
        """Whether :math:`\\gamma_t` is the same at every step."""
        return len(set(self.learning_rates)) == 1

    def learning_rate(self, step: Any) -> float:
        """:math:`\\gamma_t`, as a schedule of the step (an int or a 0-d integer array)."""
        return self.learning_rates[int(step)]

    def for_kind(self, kind: str) -> Problem:
        r"""The problem as posed to an optimizer of ``kind``.

        LAMB's step has norm :math:`\gamma_t \|w_k\|` on adapted layers, so it runs at
        :math:`\gamma_t \eta` (the relative step size LARS takes here) with :math:`\eta = 1`;
        the other kinds take the problem as it is.

        Examples
        --------
        >>> p = battery()[0]
        >>> p.for_kind("lamb").learning_rates[0], p.for_kind("lamb").eta
        (0.05, 1.0)
        """
        if kind != "lamb":
            return self
        return replace(self, learning_rates=tuple(lr * self.eta for lr in self.learning_rates), eta=1.0)

    def initial_params(self, xp: Any, dtype: Any = None) -> list[Any]:
        """The initial weights as arrays of namespace ``xp`` (float64 unless ``dtype`` is given)."""
        dtype = xp.float64 if dtype is None else dtype
        return [xp.reshape(xp.asarray(layer.init, dtype=dtype), layer.shape) for layer in self.layers]

    def gradients(self, step: int, params: Sequence[Any]) -> list[Any]:
        r"""The mini-batch gradients :math:`h_k \odot (w_k - c_k) + \sigma_k \xi_{k,t}` at ``params``.

        The arrays have the namespace, dtype and device of ``params``.

        Examples
        --------
        >>> import numpy as np
        >>> p = battery()[0]
        >>> grads = p.gradients(0, p.initial_params(np))
        >>> [g.shape for g in grads] == [layer.shape for layer in p.layers]
        True
        """
        xp = array_namespace(*params)
        out = []
        for layer, w in zip(self.layers, params):
            def const(values: tuple[float, ...]) -> Any:
                return xp.reshape(xp.asarray(values, dtype=w.dtype, device=getattr(w, "device", None)), layer.shape)

            out.append(const(layer.curvature) * (w - const(layer.center)) + const(layer.noise[step]))
        return out

    def per_sample_gradients(self, step: int, params: Sequence[Any]) -> list[Any]:
        r"""The :data:`SAMPLES` per-sample gradients :math:`g_{ik} = \bar g_k + \delta_{ik}`, stacked: ``(N, *shape)``.

        The offsets :math:`\delta_{ik}` are seeded by the problem's name and the
        step and centred (:math:`\sum_i \delta_{ik} = 0`), so the samples average
        to :meth:`gradients` and, by the triangle inequality, their mean norm is at
        least the norm of the mean; a zero-gradient layer has zero per-sample gradients.

        Examples
        --------
        >>> import numpy as np
        >>> p = battery()[0]
        >>> w = p.initial_params(np)
        >>> g, per_sample = p.gradients(0, w), p.per_sample_gradients(0, w)
        >>> per_sample[0].shape, bool(np.allclose(np.mean(per_sample[0], axis=0), g[0]))
        ((4, 4, 3), True)
        """
        xp = array_namespace(*params)
        rng = random.Random(f"{self.name}:{step}")  # a str seed is hashed the same way in every process
        out = []
        for layer, g in zip(self.layers, self.gradients(step, params)):
            n = math.prod(layer.shape)
            offsets = [_normal(rng, n, scale=0.5) for _ in range(SAMPLES)]
            if layer.role == "zero_gradient":
                offsets = [(0.0,) * n for _ in range(SAMPLES)]
            mean = [sum(o[j] for o in offsets) / SAMPLES for j in range(n)]
            centred = [[o[j] - mean[j] for j in range(n)] for o in offsets]
            delta = xp.reshape(xp.asarray(centred, dtype=g.dtype, device=getattr(g, "device", None)),
                               (SAMPLES, *layer.shape))
            out.append(g[None, ...] + delta)
        return out

    def norm_statistics(self, step: int, params: Sequence[Any]) -> Any:
        r"""The exact CLARS statistics of :meth:`per_sample_gradients`: :func:`lwrs.per_sample_norm_statistics`.

        :math:`S^{(1)}_k = \sum_i \|g_{ik}\|`, :math:`S^{(2)}_k = \sum_i \|g_{ik}\|^2`, count :math:`N`;
        what the drivers hand to a CLARS step (``norm_stats=``).

        Examples
        --------
        >>> import numpy as np
        >>> p = battery()[4]                        # zero_gradient: frozen.weight is layer 2
        >>> s = p.norm_statistics(0, p.initial_params(np))
        >>> s.count, float(s.sum_norms[2])
        (4, 0.0)
        """
        from ..norm_statistics import per_sample_norm_statistics

        return per_sample_norm_statistics(self.per_sample_gradients(step, params))


SAMPLES = 4
"""The number of samples :math:`N` behind each mini-batch gradient (CLARS's statistics)."""


def _normal(rng: random.Random, n: int, scale: float = 1.0, loc: float = 0.0) -> tuple[float, ...]:
    return tuple(loc + scale * rng.gauss(0.0, 1.0) for _ in range(n))


def _layer(rng: random.Random, name: str, shape: tuple[int, ...], steps: int, *, role: str = "layer",
           weight_decay: float = 0.0, noise: float = 0.3, curvature: float = 1.0) -> Layer:
    n = math.prod(shape)
    zeros = (0.0,) * n
    if role == "zero_gradient":
        return Layer(name, shape, _normal(rng, n), zeros, zeros, (zeros,) * steps, role)
    if role == "equilibrium":  # g = -wd * w + small noise: g + wd * w is almost 0
        return Layer(name, shape, _normal(rng, n, loc=1.0), (-weight_decay,) * n, zeros,
                     tuple(_normal(rng, n, scale=1e-3) for _ in range(steps)), role)
    init = zeros if role == "zero_init" else _normal(rng, n)
    h = tuple(curvature * rng.uniform(0.5, 1.5) for _ in range(n))
    center = _normal(rng, n, scale=2.0)
    return Layer(name, shape, init, h, center, tuple(_normal(rng, n, scale=noise) for _ in range(steps)), role)


_MLP = (("fc1.weight", (4, 3)), ("fc1.bias", (4,)), ("fc2.weight", (2, 4)), ("fc2.bias", (2,)))


def battery(steps: int = 20, seed: int = 0) -> tuple[Problem, ...]:
    """The fixed battery: seven float64 problems of ``steps`` steps each.

    ================  ======================================================================
    problem           what it separates
    ================  ======================================================================
    mlp               two weight matrices and two biases (1-D exclusion from ratio and decay)
    no_weight_decay   the same without weight decay (adaptation only when decay is set)
    varying_lr        a learning rate that changes every step (lr inside or outside the buffer)
    zero_init         a zero-initialised weight and bias (ratio 1 at :math:`\\|w_k\\| = 0`)
    zero_gradient     a layer whose gradient is exactly 0 (ratio 1 or :math:`\\eta/\\lambda`)
    near_equilibrium  weight decay almost cancelling the gradient (the two decay forms)
    large_lr          :math:`\\gamma = 1.5 > 1` with a zero-initialised layer (trust clip)
    ================  ======================================================================

    Examples
    --------
    >>> [p.name for p in battery()]
    ['mlp', 'no_weight_decay', 'varying_lr', 'zero_init', 'zero_gradient', 'near_equilibrium', 'large_lr']
    """
    def mlp(rng: random.Random, roles: dict[str, str] | None = None, curvature: float = 1.0) -> tuple[Layer, ...]:
        roles = roles or {}
        return tuple(_layer(rng, name, shape, steps, role=roles.get(name, "layer"), curvature=curvature)
                     for name, shape in _MLP)

    def seeded(k: int) -> random.Random:
        return random.Random(1000 * seed + k)

    const = (0.5,) * steps
    ramp = tuple(0.05 + 0.6 * ((7 * t) % 11) / 10 for t in range(steps))  # 0.05 ... 0.65, every step different
    problems = [
        Problem("mlp", "two weight matrices and two biases, weight decay 0.01", mlp(seeded(1)), const,
                0.9, 0.1, 0.01),
        Problem("no_weight_decay", "the same layers without weight decay", mlp(seeded(2)), const, 0.9, 0.1, 0.0),
        Problem("varying_lr", "a learning rate that changes every step", mlp(seeded(3)), ramp, 0.9, 0.1, 0.01),
        Problem("zero_init", "fc1.weight and fc2.bias start at zero",
                mlp(seeded(4), {"fc1.weight": "zero_init", "fc2.bias": "zero_init"}), const, 0.9, 0.1, 0.01),
        Problem("zero_gradient", "frozen.weight has an exactly zero gradient, weight decay 0.04",
                (_layer(seeded(5), "fc1.weight", (4, 3), steps), _layer(seeded(6), "fc1.bias", (4,), steps),
                 _layer(seeded(7), "frozen.weight", (3, 3), steps, role="zero_gradient")), const, 0.9, 0.1, 0.04),
        Problem("near_equilibrium", "decayed.weight's gradient almost cancels its weight decay 0.1, lr 0.05",
                (_layer(seeded(8), "fc1.weight", (4, 3), steps),
                 _layer(seeded(9), "decayed.weight", (4, 4), steps, role="equilibrium", weight_decay=0.1)),
                (0.05,) * steps, 0.9, 0.1, 0.1),
        Problem("large_lr", "learning rate 1.5 with a zero-initialised fc1.weight, eta 0.02",
                mlp(seeded(10), {"fc1.weight": "zero_init"}, curvature=1 / 3), (1.5,) * steps, 0.8, 0.02, 0.01),
    ]
    return tuple(problems)
