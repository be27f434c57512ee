r"""Per-sample gradient-norm statistics: the CLARS denominator and the M_k estimator.

CLARS needs, for every layer :math:`k`, the mean per-sample gradient norm
:math:`\frac1B \sum_i \|g_{ik}\|`. lwrs passes it around as a
:class:`NormStatistics` of sums, so that statistics of micro-batches or of
data-parallel ranks add up exactly like gradients do:

.. math::

    S^{(1)}_k = \sum_{i} \|g_{ik}\|, \qquad
    S^{(2)}_k = \sum_{i} \|g_{ik}\|^2, \qquad N = \text{number of samples}.

Here :math:`g_{ik} = \nabla_k f_i(w)` is the gradient of sample :math:`i`'s own
loss, so :math:`\bar g_k = \frac1N \sum_i g_{ik}` is the mini-batch gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from array_api_compat import array_namespace, device

from ._validation import check_layers, flatten_layers, is_traced, layer_label, library_name, same_device
from .rates import _layer_norms, _norm, statistics_dtype

__all__ = [
    "NormStatistics",
    "per_sample_norm_statistics",
    "subsample_norm_statistics",
    "minibatch_gradients",
    "merge_statistics",
    "gradient_variance_ratio",
]


class NormStatistics(NamedTuple):
    r"""Sums of per-sample gradient norms, one entry per layer.

    Attributes
    ----------
    sum_norms : 1-D array
        :math:`S^{(1)}_k = \sum_i \|g_{ik}\|`.
    sum_squared_norms : 1-D array
        :math:`S^{(2)}_k = \sum_i \|g_{ik}\|^2`.
    count : int or 0-d array
        :math:`N`, the number of samples summed over (whoever produced the
        statistics: the core, a torch recorder, a data-parallel sum).

    Examples
    --------
    >>> import numpy as np
    >>> s = NormStatistics(np.array([6.0]), np.array([20.0]), 3)
    >>> s.mean_norms()
    array([2.])
    """

    sum_norms: Any
    sum_squared_norms: Any
    count: int

    def mean_norms(self) -> Any:
        r"""The CLARS denominator :math:`\frac1N \sum_i \|g_{ik}\|` of every layer (eq. 5)."""
        return self.sum_norms / self.count

    def mean_squared_norms(self) -> Any:
        r""":math:`\frac1N \sum_i \|g_{ik}\|^2` of every layer."""
        return self.sum_squared_norms / self.count


def _sample_norms(xp: Any, per_sample: Any, dtype: Any) -> Any:
    """Norm of every sample's slice of one layer's stacked per-sample gradients."""
    flat = xp.reshape(xp.astype(per_sample, dtype), (per_sample.shape[0], -1))
    return _norm(xp, flat, axis=1)


def _leaves(per_sample_grads: Any) -> list[Any]:
    """The layers of a pytree of per-sample gradients, in the optimizers' layer order (dict keys sorted)."""
    return flatten_layers("per_sample_grads", per_sample_grads)[0]


def _check_per_sample(per_sample_grads: Sequence[Any]) -> tuple[Any, int]:
    xp, _ = check_layers(per_sample_grads)
    counts = {g.shape[0] if g.ndim > 0 else None for g in per_sample_grads}
    if None in counts:
        raise ValueError("per-sample gradients need a leading sample axis; a layer is 0-d")
    if len(counts) != 1:
        sizes = [int(g.shape[0]) for g in per_sample_grads]
        raise ValueError(f"per-sample gradients have different sample counts per layer: {sizes}")
    n = counts.pop()
    if n == 0:
        raise ValueError("per-sample gradients hold no samples")
    return xp, int(n)


def per_sample_norm_statistics(per_sample_grads: Sequence[Any]) -> NormStatistics:
    r"""Exact :class:`NormStatistics` from stacked per-sample gradients.

    .. math::

        S^{(1)}_k = \sum_{i=1}^{B} \|g_{ik}\|, \quad
        S^{(2)}_k = \sum_{i=1}^{B} \|g_{ik}\|^2, \quad N = B.

    Layer ``k`` is an array of shape ``(B, *shape_k)`` whose slice ``i`` is
    :math:`g_{ik}`; the layers come as a list, or as the pytree of the params
    (a dict, a NamedTuple, ...), whose layer order the optimizers use. Applied to stacked *mini-batch* gradients (see
    :func:`minibatch_gradients`) it gives the official CLARS code's estimator.

    References: CLARS eq. (5) and Algorithm 1, line 4.

    Examples
    --------
    >>> import numpy as np
    >>> g = [np.array([[3.0, 4.0], [0.0, 1.0]])]      # 2 samples, 1 layer of 2 weights
    >>> s = per_sample_norm_statistics(g)
    >>> s.sum_norms, s.sum_squared_norms, s.count
    (array([6.]), array([26.]), 2)
    """
    per_sample_grads = _leaves(per_sample_grads)
    xp, n = _check_per_sample(per_sample_grads)
    dtype = statistics_dtype(xp, [g.dtype for g in per_sample_grads])
    norms = [_sample_norms(xp, g, dtype) for g in per_sample_grads]
    return NormStatistics(
        xp.stack([xp.sum(a) for a in norms]),
        xp.stack([xp.sum(a * a) for a in norms]),
        n,
    )


def subsample_norm_statistics(per_sample_grads: Sequence[Any], indices: Sequence[int]) -> NormStatistics:
    r"""The paper's cheap estimator: statistics of a subsample :math:`J \subset I_t`.

    .. math::

        \frac1B\sum_{i \in I_t}\|g_{ik}\| \;\approx\; \frac{1}{|J|}\sum_{j \in J}\|g_{jk}\|

    The CLARS experiments use :math:`|J| = 512`. The estimate of the mean norm
    is unbiased, but the CLARS factor built from it can exceed 1.

    References: CLARS paper, "Comparison with Related Methods".

    Examples
    --------
    >>> import numpy as np
    >>> g = [np.array([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]])]
    >>> subsample_norm_statistics(g, [0, 2]).mean_norms()
    array([3.5])
    """
    per_sample_grads = _leaves(per_sample_grads)
    xp, n = _check_per_sample(per_sample_grads)
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("indices is empty: the subsample needs at least one sample")
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ValueError(f"indices {bad[:5]} are outside the batch of {n} samples")
    where = xp.asarray(idx, dtype=xp.int64, device=device(per_sample_grads[0]))
    return per_sample_norm_statistics([xp.take(g, where, axis=0) for g in per_sample_grads])


def minibatch_gradients(per_sample_grads: Sequence[Any], batch_size: int) -> tuple[Any, ...]:
    r"""Average consecutive groups of per-sample gradients into mini-batch gradients.

    .. math:: G_{mk} = \frac{1}{b}\sum_{i=mb}^{(m+1)b-1} g_{ik}, \qquad m = 0, \dots, B/b - 1

    Feeding the result to :func:`per_sample_norm_statistics` reproduces the
    official CLARS code's denominator: the mean, over 64 mini-batches of
    :math:`b = 8` samples, of :math:`\|G_{mk}\|`.

    Examples
    --------
    >>> import numpy as np
    >>> minibatch_gradients([np.array([[1.0], [3.0], [5.0], [7.0]])], 2)[0]
    array([[2.],
           [6.]])
    """
    per_sample_grads = _leaves(per_sample_grads)
    xp, n = _check_per_sample(per_sample_grads)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if n % batch_size:
        raise ValueError(f"{n} samples do not split into mini-batches of {batch_size}")
    groups = n // batch_size
    return tuple(
        xp.mean(xp.reshape(g, (groups, batch_size, *g.shape[1:])), axis=1) for g in per_sample_grads
    )


def merge_statistics(*parts: NormStatistics) -> NormStatistics:
    r"""Add statistics of disjoint sample sets (micro-batches, data-parallel ranks).

    .. math::

        S^{(1)}_k = \sum_p S^{(1)}_{k,p}, \quad S^{(2)}_k = \sum_p S^{(2)}_{k,p},
        \quad N = \sum_p N_p

    Examples
    --------
    >>> import numpy as np
    >>> a = NormStatistics(np.array([1.0]), np.array([1.0]), 1)
    >>> merge_statistics(a, a).count
    2
    """
    if not parts:
        raise ValueError("merge_statistics needs at least one NormStatistics")
    for i, p in enumerate(parts):
        if not isinstance(p, NormStatistics):
            raise TypeError(f"merge_statistics: part {i} is a {type(p).__name__}, not a lwrs.NormStatistics")
    libraries = [library_name(p.sum_norms) for p in parts]
    if len(set(libraries)) > 1:
        mix = ", ".join(f"part {i}: {lib}" for i, lib in enumerate(libraries))
        raise TypeError(
            f"merge_statistics cannot mix array libraries ({mix}); convert every part to one library first"
        )
    total = parts[0]
    for p in parts[1:]:
        if p.sum_norms.shape != total.sum_norms.shape:
            raise ValueError(
                f"cannot merge statistics of {p.sum_norms.shape[0]} and {total.sum_norms.shape[0]} layers"
            )
        total = NormStatistics(
            total.sum_norms + p.sum_norms,
            total.sum_squared_norms + p.sum_squared_norms,
            total.count + p.count,
        )
    return total


def gradient_variance_ratio(per_sample_grads: Sequence[Any]) -> Any:
    r"""Second moment of the per-sample gradients over the squared mean gradient, per layer.

    .. math::

        \rho_k = \frac{\frac1n \sum_i \|g_{ik}\|^2}{\big\|\frac1n \sum_i g_{ik}\big\|^2}
        = 1 + \frac{\frac1n\sum_i \|g_{ik} - \bar g_k\|^2}{\|\bar g_k\|^2}

    This is what CLARS Figure 2 plots. On a problem that meets Assumption 2
    with equality, :math:`\rho_k = 1 + M_k + M / \|\nabla_k f\|^2`, so a large
    :math:`\rho_k` flags a layer with a large gradient variance factor
    :math:`M_k`. The paper's experiments section writes the inverse ratio.
    :math:`\rho_k = \infty` where the mean gradient vanishes but the samples'
    do not, and 1 where all vanish.

    References: CLARS Assumption 2 and Figure 2.

    Examples
    --------
    >>> import numpy as np
    >>> gradient_variance_ratio([np.array([[1.0, 0.0], [0.0, 1.0]])])
    array([2.])
    """
    per_sample_grads = _leaves(per_sample_grads)
    xp, n = _check_per_sample(per_sample_grads)
    stats = per_sample_norm_statistics(per_sample_grads)
    means = [xp.mean(g, axis=0) for g in per_sample_grads]
    mean_sq = _layer_norms(xp, means) ** 2
    second = xp.astype(stats.mean_squared_norms(), mean_sq.dtype)
    positive = mean_sq > 0
    safe = xp.where(positive, mean_sq, xp.ones_like(mean_sq))
    empty = xp.where(second > 0, xp.full_like(second, float("inf")), xp.ones_like(second))
    return xp.where(positive, second / safe, empty)


def mean_norms_checked(xp: Any, stats: NormStatistics, dtype: Any, names: Sequence[str] | None = None) -> Any:
    r"""The mean per-sample norms :math:`S^{(1)}_k / N` of ``stats`` in ``dtype``, impossible statistics refused.

    A negative :math:`S^{(1)}_k` or :math:`S^{(2)}_k` (a sum of norms) raises ``ValueError`` naming the layer
    where the values can be read; traced (under ``jax.jit``), its mean becomes NaN, so that the non-finite policy
    takes it (it used to fall through to the ratio-1 rule: a far larger step).

    Examples
    --------
    >>> import numpy as np
    >>> mean_norms_checked(np, NormStatistics(np.array([4.0]), np.array([8.0]), 2), np.float64)
    array([2.])
    """
    s1, s2 = stats.sum_norms, stats.sum_squared_norms
    negative = (s1 < 0) | (s2 < 0)
    if not (is_traced(s1) or is_traced(s2)) and bool(xp.any(negative)):
        for field, values in (("sum_norms", s1), ("sum_squared_norms", s2)):
            bad = [k for k in range(values.shape[0]) if bool(values[k] < 0)]
            if bad:
                raise ValueError(f"{layer_label(bad[0], names)}: norm_stats.{field} is {float(values[bad[0]])!r}; "
                                 "a sum of norms cannot be negative")
    mean = xp.astype(xp.asarray(stats.mean_norms()), dtype)
    return xp.where(negative, xp.full_like(mean, float("nan")), mean)


def check_statistics(stats: Any, layers: int, xp: Any, dev: Any) -> NormStatistics:
    """Check that ``stats`` is a :class:`NormStatistics` matching ``layers`` layers (private)."""
    if not isinstance(stats, NormStatistics):
        raise TypeError(f"norm_stats must be a lwrs.NormStatistics, got {type(stats).__name__}")
    for name in ("sum_norms", "sum_squared_norms"):
        a = getattr(stats, name)
        if array_namespace(a) is not xp:
            raise TypeError(f"norm_stats.{name} comes from a different array library than params")
        if not same_device(device(a), dev):
            raise ValueError(f"norm_stats.{name} is on device {device(a)!r}, params on {dev!r}")
        if tuple(a.shape) != (layers,):
            raise ValueError(f"norm_stats.{name} has shape {tuple(a.shape)}, expected ({layers},)")
    if is_traced(stats.count):  # a traced count cannot be read; the finiteness policy covers mean_norms
        return stats
    count = float(stats.count)
    if not count > 0:
        raise ValueError(f"norm_stats.count must be positive, got {stats.count!r}")
    return stats
