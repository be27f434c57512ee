r"""Toy problems with known constants, runnable on any array-API backend.

:class:`LayeredQuadratic` is the block-diagonal finite-sum quadratic of the
notes on the CLARS theorems,

.. math::

    f_i(w) = \sum_{k=1}^{K} \Big[ \tfrac12\, s_{ik}\,(w_k - c_k)^\top A_k (w_k - c_k)
             + \xi_{ik}^\top (w_k - c_k) \Big], \qquad f = \frac1n \sum_i f_i ,

with diagonal :math:`A_k \succ 0`, per-sample curvature scales :math:`s_{ik}`
of mean exactly 1 and per-sample noise :math:`\xi_{ik}` of mean exactly 0.
Then :math:`f(w) = \frac12\sum_k (w_k - c_k)^\top A_k (w_k - c_k)`,
:math:`f_{\inf} = 0`, :math:`L_k = \lambda_{\max}(A_k)` and
:math:`L_g = \max_k L_k`. A large spread of :math:`s_{ik}` gives layer
:math:`k` a large gradient-variance factor :math:`M_k` (CLARS Assumption 2).

The data are drawn with Python's :mod:`random` from a seed, so the problem is
the same on every backend and the core needs no array library to build it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from array_api_compat import device as array_device

from ._validation import check_layers

__all__ = ["LayeredQuadratic", "sample_indices"]


def _recentred(values: list[float], mean: float) -> list[float]:
    shift = mean - sum(values) / len(values)
    return [v + shift for v in values]


@dataclass(frozen=True)
class LayeredQuadratic:
    r"""A layered finite-sum quadratic with per-layer curvature and gradient noise.

    Build one with :meth:`make`; all arrays are created in the namespace
    passed to each method, so one problem runs on NumPy, PyTorch, JAX or
    array-api-strict alike.

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
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    @classmethod
    def make(
        cls,
        *,
        dims: Sequence[int] = (32, 32, 16, 8),
        lipschitz: Sequence[float] | None = None,
        scale_spread: Sequence[float] | None = None,
        noise: Sequence[float] | None = None,
        condition: float = 10.0,
        n: int = 2048,
        seed: int = 0,
    ) -> LayeredQuadratic:
        r"""Draw a problem.

        Parameters
        ----------
        dims : sequence of int
            :math:`d_k`, the size of each layer.
        lipschitz : sequence of float, optional
            :math:`L_k`, the largest curvature of each layer. Default: grows
            by 4x per layer from 1.
        scale_spread : sequence of float, optional
            Standard deviation of :math:`s_{ik}`, so :math:`M_k \approx` its
            square. Default: grows towards the top layers, as in CLARS Figure 2.
        noise : sequence of float, optional
            Per-coordinate standard deviation of :math:`\xi_{ik}`.
        condition : float
            :math:`\lambda_{\max}(A_k) / \lambda_{\min}(A_k)`, the same for every layer.
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
        lipschitz = list(lipschitz) if lipschitz is not None else [4.0**k for k in range(K)]
        spread = list(scale_spread) if scale_spread is not None else [0.5 + 1.5 * k for k in range(K)]
        noise = list(noise) if noise is not None else [0.1] * K
        for name, values in (("lipschitz", lipschitz), ("scale_spread", spread), ("noise", noise)):
            if len(values) != K:
                raise ValueError(f"{name} has {len(values)} entries but dims has {K} layers")
        if any(v <= 0 for v in lipschitz) or condition < 1:
            raise ValueError(f"lipschitz must be positive and condition >= 1, got {lipschitz}, {condition}")
        rng = random.Random(seed)
        curv, centers, noises = [], [], []
        for k, d in enumerate(dims):
            lo = lipschitz[k] / condition
            diag = [lo * (condition ** (j / (d - 1))) if d > 1 else lipschitz[k] for j in range(d)]
            curv.append(tuple(diag))
            centers.append(tuple(rng.gauss(0.0, 1.0) for _ in range(d)))
            cols = [_recentred([rng.gauss(0.0, noise[k]) for _ in range(n)], 0.0) for _ in range(d)]
            noises.append(tuple(zip(*cols)))
        scale_cols = [_recentred([1.0 + rng.gauss(0.0, spread[k]) for _ in range(n)], 1.0) for k in range(K)]
        return cls(tuple(curv), tuple(centers), tuple(zip(*scale_cols)), tuple(noises))

    @property
    def num_samples(self) -> int:
        """:math:`n`, the size of the finite dataset."""
        return len(self.scales)

    @property
    def layer_lipschitz(self) -> tuple[float, ...]:
        r""":math:`L_k = \lambda_{\max}(A_k)` (CLARS Assumption 1)."""
        return tuple(max(c) for c in self.curvatures)

    def initial_params(self, xp: Any, *, dtype: Any = None, device: Any = None, offset: float = 1.0) -> list[Any]:
        r"""The starting point :math:`w_{0,k} = c_k + \text{offset}\cdot\mathbf 1`."""
        dtype = xp.float64 if dtype is None else dtype
        return [xp.asarray([c + offset for c in ck], dtype=dtype, device=device) for ck in self.centers]

    def _arrays(self, xp: Any, like: Any) -> tuple[list[Any], list[Any], Any, list[Any]]:
        """The problem's data as arrays of ``like``'s library, dtype and device (built once, then cached)."""
        key = (xp.__name__, str(like.dtype), str(array_device(like)))
        if key not in self._cache:
            self._cache[key] = self._build_arrays(xp, like)
        return self._cache[key]

    def _build_arrays(self, xp: Any, like: Any) -> tuple[list[Any], list[Any], Any, list[Any]]:
        kw = dict(dtype=like.dtype, device=array_device(like))
        curv = [xp.asarray(c, **kw) for c in self.curvatures]
        cent = [xp.asarray(c, **kw) for c in self.centers]
        scales = xp.asarray(self.scales, **kw)
        noises = [xp.asarray(e, **kw) for e in self.noises]
        return curv, cent, scales, noises

    def loss(self, params: Sequence[Any]) -> float:
        r"""The full objective :math:`f(w) - f_{\inf} = \frac12\sum_k (w_k - c_k)^\top A_k (w_k - c_k)`."""
        xp, _ = check_layers(params)
        curv, cent, _, _ = self._arrays(xp, params[0])
        return float(sum(0.5 * xp.sum(a * (w - c) ** 2) for a, w, c in zip(curv, params, cent)))

    def full_grads(self, params: Sequence[Any]) -> list[Any]:
        r"""The exact gradient :math:`\nabla_k f(w) = A_k (w_k - c_k)`."""
        xp, _ = check_layers(params)
        curv, cent, _, _ = self._arrays(xp, params[0])
        return [a * (w - c) for a, w, c in zip(curv, params, cent)]

    def per_sample_grads(self, params: Sequence[Any], indices: Sequence[int]) -> list[Any]:
        r"""Stacked :math:`g_{ik} = s_{ik} A_k (w_k - c_k) + \xi_{ik}` for the samples in ``indices``."""
        xp, _ = check_layers(params)
        curv, cent, scales, noises = self._arrays(xp, params[0])
        idx = xp.asarray([int(i) for i in indices], dtype=xp.int64, device=array_device(params[0]))
        s = xp.take(scales, idx, axis=0)
        return [
            s[:, k:k + 1] * (a * (w - c))[None, :] + xp.take(e, idx, axis=0)
            for k, (a, w, c, e) in enumerate(zip(curv, params, cent, noises))
        ]


def sample_indices(rng: random.Random, n: int, batch_size: int) -> list[int]:
    """A mini-batch of ``batch_size`` distinct sample indices out of ``n``, drawn uniformly.

    Examples
    --------
    >>> import random
    >>> sorted(sample_indices(random.Random(0), 10, 3))
    [0, 6, 9]
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must lie in [1, {n}], got {batch_size}")
    return rng.sample(range(n), batch_size)

