r"""Toy problems with known constants, runnable on any array-API backend.

:class:`LayeredQuadratic` is a finite-sum quadratic over :math:`K` layers,

.. math::

    f(w) = \frac12 \sum_{k=1}^{K} (w_k - c_k)^\top A_k (w_k - c_k)
           + \frac{\rho}{2}\Big\|\sum_{k=1}^K (w_k - c_k)\Big\|^2 ,
    \qquad f_{\inf} = 0,

with diagonal :math:`A_k \succ 0` and a coupling :math:`\rho \ge 0` (the
coupling needs layers of equal size). Sample :math:`i` has the gradient

.. math:: g_{ik}(w) = s_{ik}\, \nabla_k f(w) + \xi_{ik},

with curvature scales :math:`s_{ik}` of mean exactly 1 and noise
:math:`\xi_{ik}` of mean exactly 0 and orthogonal to :math:`s_{ik} - 1` over
the dataset. For :math:`\rho = 0` this is the gradient of
:math:`f_i(w) = \sum_k [\frac12 s_{ik} (w_k - c_k)^\top A_k (w_k - c_k) +
\xi_{ik}^\top (w_k - c_k)]`; for :math:`\rho > 0` all layers share one
:math:`s_i`, and it is the gradient of :math:`f_i = s_i f + \xi_i^\top (w -
c)`. Either way CLARS Assumptions 1 and 2 hold with the constants in closed form:

.. math::

    L_k &= \lambda_{\max}(A_k) + \rho, \qquad
    L_g = \max_k L_k \ (\rho = 0), \ \text{or } \max_j \lambda_{\max}\big(\mathrm{diag}_k(A_{k,jj}) + \rho\,\mathbf 1\mathbf 1^\top\big), \\
    \mathbb E_i\|g_{ik} - \nabla_k f\|^2 &= M_k \|\nabla_k f\|^2 + N_k \ \text{exactly}, \qquad
    M_k = \tfrac1n \textstyle\sum_i (s_{ik} - 1)^2, \quad N_k = \tfrac1n \sum_i \|\xi_{ik}\|^2,

and Assumption 2's :math:`M = \max_k N_k`. The data are drawn with Python's
:mod:`random` from a seed, so the problem is the same on every backend and the
core needs no array library to build it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from array_api_compat import device as array_device

from ._validation import check_layers
from .theory import ProblemConstants

__all__ = ["LayeredQuadratic", "sample_indices", "largest_coupled_eigenvalue"]


def _centre_and_orthogonalise(values: list[float], against: list[float] | None) -> list[float]:
    """Shift to mean 0, then remove the component along the mean-zero vector ``against``."""
    mean = sum(values) / len(values)
    out = [v - mean for v in values]
    if against is not None:
        norm_sq = sum(a * a for a in against)
        if norm_sq > 0:
            proj = sum(v * a for v, a in zip(out, against)) / norm_sq
            out = [v - proj * a for v, a in zip(out, against)]
    return out


def largest_coupled_eigenvalue(diagonal: Sequence[float], coupling: float) -> float:
    r"""The largest eigenvalue of :math:`D + \rho\,\mathbf 1 \mathbf 1^\top`, to machine precision.

    For :math:`\rho > 0` it is the root above :math:`\max_j d_j` of the secular
    equation :math:`1 = \rho \sum_j 1/(\lambda - d_j)`, found by bisection on
    :math:`(\max_j d_j,\ \max_j d_j + K\rho]`.

    Examples
    --------
    >>> largest_coupled_eigenvalue([1.0, 1.0], 0.5)     # eigenvalues 1 and 2
    2.0
    """
    if coupling == 0:
        return max(diagonal)
    lo, hi = max(diagonal), max(diagonal) + len(diagonal) * coupling
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if coupling * sum(1.0 / (mid - d) if mid > d else float("inf") for d in diagonal) > 1.0:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class LayeredQuadratic:
    r"""A layered finite-sum quadratic with known Lipschitz and variance constants.

    Build one with :meth:`make`. All arrays are created in the namespace of the
    parameters passed to each method, so one problem runs on NumPy, PyTorch,
    JAX or array-api-strict alike.

    Attributes
    ----------
    curvatures : tuple of tuple of float
        The diagonals of :math:`A_k`.
    centers : tuple of tuple of float
        The minimiser :math:`c_k` of every layer.
    scales : tuple of tuple of float
        :math:`s_{ik}`, one row per sample, one column per layer (mean 1 per layer).
    noises : tuple of tuple of tuple of float
        :math:`\xi_{ik}`, per layer, one row per sample (mean 0 per layer).
    coupling : float
        :math:`\rho \ge 0`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> problem = LayeredQuadratic.make(dims=(3, 2), n=8, seed=0)
    >>> w = problem.initial_params(xp)
    >>> [tuple(g.shape) for g in problem.per_sample_grads(w, list(range(4)))]
    [(4, 3), (4, 2)]
    """

    curvatures: tuple[tuple[float, ...], ...]
    centers: tuple[tuple[float, ...], ...]
    scales: tuple[tuple[float, ...], ...]
    noises: tuple[tuple[tuple[float, ...], ...], ...]
    coupling: float = 0.0
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    @classmethod
    def make(
        cls,
        *,
        dims: Sequence[int] = (32, 32, 16, 8),
        lipschitz: Sequence[float] | None = None,
        scale_spread: Sequence[float] | float | None = None,
        noise: Sequence[float] | None = None,
        condition: float = 10.0,
        coupling: float = 0.0,
        n: int = 2048,
        seed: int = 0,
    ) -> LayeredQuadratic:
        r"""Draw a problem.

        Parameters
        ----------
        dims : sequence of int
            :math:`d_k`, the size of each layer (all equal when ``coupling > 0``).
        lipschitz : sequence of float, optional
            :math:`\lambda_{\max}(A_k)` of each layer. Default: grows by 4x
            per layer from 1.
        scale_spread : sequence of float or float, optional
            Standard deviation of the draws of :math:`s_{ik}`, so
            :math:`M_k \approx` its square. Default: grows towards the top
            layers, as in CLARS Figure 2. A single number when ``coupling > 0``.
        noise : sequence of float, optional
            Per-coordinate standard deviation of the draws of :math:`\xi_{ik}`.
        condition : float
            :math:`\lambda_{\max}(A_k) / \lambda_{\min}(A_k)`, the same for every layer.
        coupling : float
            :math:`\rho \ge 0`; with :math:`\rho > 0`, :math:`L_g > \max_k \lambda_{\max}(A_k)`.
        n : int
            Number of samples in the finite dataset.
        seed : int
            Seed of the generator; the same seed gives the same problem everywhere.

        Examples
        --------
        >>> import array_api_strict as xp
        >>> problem = LayeredQuadratic.make(dims=(2, 2), lipschitz=(1.0, 8.0), n=16, seed=0)
        >>> problem.layer_lipschitz, problem.num_samples
        ((1.0, 8.0), 16)
        >>> w = problem.initial_params(xp)        # c_k + 1: f = 1/2 sum_k trace(A_k)
        >>> round(problem.loss(w), 12) == round(0.5 * sum(sum(c) for c in problem.curvatures), 12)
        True
        >>> problem.loss([xp.asarray(c, dtype=xp.float64) for c in problem.centers])
        0.0
        """
        K = len(dims)
        if K == 0 or any(int(d) <= 0 for d in dims):
            raise ValueError(f"dims must be positive layer sizes, got {tuple(dims)}")
        if n < 2:
            raise ValueError(f"n must be at least 2 samples, got {n}")
        if coupling < 0 or (coupling > 0 and len(set(dims)) != 1):
            raise ValueError(f"coupling must be >= 0, and > 0 only for layers of equal size; got {coupling}, {dims}")
        lipschitz = list(lipschitz) if lipschitz is not None else [4.0**k for k in range(K)]
        if scale_spread is None:
            scale_spread = 1.0 if coupling > 0 else [0.5 + 1.5 * k for k in range(K)]
        if isinstance(scale_spread, (int, float)):
            spread = [float(scale_spread)] * K
        elif coupling > 0:
            raise ValueError("with coupling > 0 all layers share one s_i: give scale_spread as one number")
        else:
            spread = list(scale_spread)
        noise = list(noise) if noise is not None else [0.1] * K
        for name, values in (("lipschitz", lipschitz), ("scale_spread", spread), ("noise", noise)):
            if len(values) != K:
                raise ValueError(f"{name} has {len(values)} entries but dims has {K} layers")
        if any(v <= 0 for v in lipschitz) or condition < 1:
            raise ValueError(f"lipschitz must be positive and condition >= 1, got {lipschitz}, {condition}")
        rng = random.Random(seed)
        scale_cols: list[list[float]] = []
        for k in range(K):
            if coupling > 0 and k > 0:
                scale_cols.append(scale_cols[0])
            else:
                scale_cols.append(_centre_and_orthogonalise([rng.gauss(0.0, spread[k]) for _ in range(n)], None))
        curv, centers, noises = [], [], []
        for k, d in enumerate(dims):
            lo = lipschitz[k] / condition
            curv.append(tuple(lo * condition ** (j / (d - 1)) if d > 1 else lipschitz[k] for j in range(d)))
            centers.append(tuple(rng.gauss(0.0, 1.0) for _ in range(d)))
            cols = [_centre_and_orthogonalise([rng.gauss(0.0, noise[k]) for _ in range(n)], scale_cols[k])
                    for _ in range(d)]
            noises.append(tuple(zip(*cols)))
        scales = tuple(zip(*[[1.0 + z for z in col] for col in scale_cols]))
        return cls(tuple(curv), tuple(centers), scales, tuple(noises), float(coupling))

    # ---- constants -------------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """:math:`n`, the size of the finite dataset."""
        return len(self.scales)

    @property
    def layer_lipschitz(self) -> tuple[float, ...]:
        r""":math:`L_k = \lambda_{\max}(A_k) + \rho` (CLARS Assumption 1)."""
        return tuple(max(c) + self.coupling for c in self.curvatures)

    @property
    def global_lipschitz(self) -> float:
        r""":math:`L_g = \lambda_{\max}(\nabla^2 f)`, computed exactly (see :func:`largest_coupled_eigenvalue`)."""
        if self.coupling == 0:
            return max(self.layer_lipschitz)
        per_coordinate = zip(*self.curvatures)
        return max(largest_coupled_eigenvalue(column, self.coupling) for column in per_coordinate)

    @property
    def variance_factors(self) -> tuple[float, ...]:
        r""":math:`M_k = \frac1n\sum_i (s_{ik} - 1)^2` (CLARS Assumption 2, with equality)."""
        n = self.num_samples
        return tuple(sum((row[k] - 1.0) ** 2 for row in self.scales) / n for k in range(len(self.curvatures)))

    @property
    def noise_levels(self) -> tuple[float, ...]:
        r""":math:`N_k = \frac1n\sum_i \|\xi_{ik}\|^2`, each layer's additive variance."""
        return tuple(sum(sum(x * x for x in row) for row in layer) / self.num_samples for layer in self.noises)

    def constants(self, *, batch_size: int, beta: float, steps: int, initial_gap: float) -> ProblemConstants:
        r"""The :class:`~lwrs.theory.ProblemConstants` of this problem for a run.

        Assumption 2's :math:`M` is :math:`\max_k N_k`. ``initial_gap`` is
        :math:`f(w_0) - f_{\inf} = f(w_0)`, e.g. from :meth:`loss`.

        Examples
        --------
        >>> p = LayeredQuadratic.make(dims=(2, 2), lipschitz=(1.0, 4.0), n=16)
        >>> c = p.constants(batch_size=8, beta=0.9, steps=100, initial_gap=3.0)
        >>> c.lipschitz, c.global_lipschitz
        ((1.0, 4.0), 4.0)
        """
        return ProblemConstants(self.layer_lipschitz, self.global_lipschitz, self.variance_factors,
                                max(self.noise_levels), batch_size, beta, initial_gap, steps)

    # ---- arrays --------------------------------------------------------------------------------------

    def initial_params(self, xp: Any, *, dtype: Any = None, device: Any = None, offset: float = 1.0) -> list[Any]:
        r"""The starting point :math:`w_{0,k} = c_k + \text{offset}\cdot\mathbf 1`."""
        dtype = xp.float64 if dtype is None else dtype
        return [xp.asarray([c + offset for c in ck], dtype=dtype, device=device) for ck in self.centers]

    def _arrays(self, xp: Any, like: Any) -> tuple[list[Any], list[Any], Any, list[Any]]:
        """The problem's data as arrays of ``like``'s library, dtype and device (built once, then cached)."""
        key = (xp.__name__, str(like.dtype), str(array_device(like)))
        if key not in self._cache:
            kw = dict(dtype=like.dtype, device=array_device(like))
            self._cache[key] = (
                [xp.asarray(c, **kw) for c in self.curvatures],
                [xp.asarray(c, **kw) for c in self.centers],
                xp.asarray(self.scales, **kw),
                [xp.asarray(e, **kw) for e in self.noises],
            )
        return self._cache[key]

    def _offsets(self, params: Sequence[Any]) -> tuple[Any, list[Any], list[Any]]:
        xp, _ = check_layers(params)
        if len(params) != len(self.curvatures):
            raise ValueError(f"params has {len(params)} layers but the problem has {len(self.curvatures)}")
        curv, cent, _, _ = self._arrays(xp, params[0])
        return xp, curv, [w - c for w, c in zip(params, cent)]

    def loss(self, params: Sequence[Any]) -> float:
        r"""The objective :math:`f(w) - f_{\inf}`, as a Python float."""
        xp, curv, diff = self._offsets(params)
        total = sum(0.5 * xp.sum(a * d * d) for a, d in zip(curv, diff))
        if self.coupling:
            total = total + 0.5 * self.coupling * xp.sum(sum(diff[1:], diff[0]) ** 2)
        return float(total)

    def full_grads(self, params: Sequence[Any]) -> list[Any]:
        r"""The exact gradient :math:`\nabla_k f(w) = A_k (w_k - c_k) + \rho \sum_l (w_l - c_l)`."""
        _, curv, diff = self._offsets(params)
        grads = [a * d for a, d in zip(curv, diff)]
        if self.coupling:
            shared = self.coupling * sum(diff[1:], diff[0])
            grads = [g + shared for g in grads]
        return grads

    def per_sample_grads(self, params: Sequence[Any], indices: Sequence[int]) -> list[Any]:
        r"""Stacked :math:`g_{ik} = s_{ik} \nabla_k f(w) + \xi_{ik}` for the samples in ``indices``."""
        xp, _ = check_layers(params)
        _, _, scales, noises = self._arrays(xp, params[0])
        idx = xp.asarray([int(i) for i in indices], dtype=xp.int64, device=array_device(params[0]))
        s = xp.take(scales, idx, axis=0)
        return [
            s[:, k:k + 1] * g[None, :] + xp.take(e, idx, axis=0)
            for k, (g, e) in enumerate(zip(self.full_grads(params), noises))
        ]


def sample_indices(rng: random.Random, n: int, batch_size: int, *, replace: bool = False) -> list[int]:
    """A mini-batch of ``batch_size`` sample indices out of ``n``, drawn uniformly.

    ``replace=True`` draws i.i.d. samples, the model of the CLARS theorems.

    Examples
    --------
    >>> import random
    >>> sorted(sample_indices(random.Random(0), 10, 3))
    [0, 6, 9]
    """
    if batch_size < 1 or (not replace and batch_size > n):
        raise ValueError(f"batch_size must lie in [1, {n}], got {batch_size}")
    if replace:
        return rng.choices(range(n), k=batch_size)
    return rng.sample(range(n), batch_size)
