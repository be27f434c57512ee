r"""Exact per-sample gradient-norm statistics for CLARS, with JAX.

CLARS (eq. 5) divides by the mean per-sample gradient norm
:math:`\frac1B\sum_i\|g_{ik}\|` of every layer. :func:`grad_and_norm_statistics`
computes it together with the mini-batch gradient, in one pass of
``jax.vmap(jax.grad(loss))`` over the batch. With ``chunk_size`` the batch is
processed ``chunk_size`` samples at a time inside a ``lax.scan``, so at most
``chunk_size`` per-sample gradients exist at once. Statistics are sums (the
core's :class:`lwrs.NormStatistics` convention), so data-parallel replicas
combine theirs with :func:`psum_statistics`.
"""

from __future__ import annotations

import operator

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lwrs.masks import weight_decay_default
from lwrs.norm_statistics import NormStatistics
from lwrs.rates import statistics_dtype

from ._tree import flatten_params, resolve_mask

__all__ = ["grad_and_norm_statistics", "psum_statistics"]


def grad_and_norm_statistics(
    loss_fn: Callable[..., Any],
    params: Any,
    batch: Any,
    *args: Any,
    chunk_size: int | None = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
) -> tuple[Any, Any, NormStatistics]:
    r"""Mean loss, mean gradient and exact per-sample norm statistics of a batch.

    .. math::

        \bar g_k = \frac1B \sum_{i=1}^B g_{ik}, \qquad
        S^{(1)}_k = \sum_{i=1}^B \|g_{ik} + \lambda_k w_k\|, \qquad
        S^{(2)}_k = \sum_{i=1}^B \|g_{ik} + \lambda_k w_k\|^2, \qquad N = B,

    with :math:`g_{ik} = \nabla_k f_i(w)` the gradient of sample :math:`i`'s
    own loss ``loss_fn(params, example, *args)`` and :math:`\lambda_k` the
    weight decay of the layers in ``weight_decay_mask`` (0 by default: the
    statistics for ``weight_decay_form="sum_of_norms"``; pass the optimizer's
    weight decay and mask for ``"norm_of_sum"``). Layer :math:`k` is leaf
    :math:`k` of ``params``, as in the optimizers.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(params, example, *args) -> scalar``, the loss of ONE example;
        ``example`` is ``batch`` without its leading axis.
    params : pytree
    batch : pytree of arrays
        Every leaf has the batch size :math:`B` as its leading axis.
    chunk_size : int, optional
        Samples per vectorised chunk (memory: ``chunk_size`` per-sample
        gradients). ``None``: the whole batch at once.
    weight_decay, weight_decay_mask
        As in the optimizers.

    Returns
    -------
    (loss, grads, stats)
        The mean loss, the mean gradient (a pytree like ``params``) and a
        :class:`lwrs.NormStatistics` with one entry per layer.

    References: Huo, Gu & Huang (2021), AAAI, eq. (5) and Algorithm 1, line 4.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.array([1.0, 0.0])}
    >>> batch = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    >>> loss, grads, stats = grad_and_norm_statistics(lambda p, x: jnp.dot(p["w"], x), params, batch)
    >>> print(grads["w"], stats.sum_norms, stats.count)           # |g_1| = 5, |g_2| = 0
    [1.5 2. ] [5.] 2
    """
    layers = flatten_params(params)
    decay = resolve_mask("weight_decay_mask", weight_decay_mask, layers, weight_decay_default)
    dtype = statistics_dtype(jnp, [w.dtype for w in layers.leaves])
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"every leaf of batch needs the same leading (batch) axis, got sizes {sorted(sizes)}")
    size = sizes.pop()
    if size == 0:
        raise ValueError("the batch holds no samples")
    if chunk_size is not None:
        given = chunk_size
        try:  # any integer (a NumPy one too), not a bool
            chunk_size = None if isinstance(given, bool) else operator.index(given)
        except TypeError:
            chunk_size = None
        if chunk_size is None or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {given!r}")
    # a number 0 adds nothing; an array (injected by optax.inject_hyperparams, traced under jit) is always added
    no_decay = isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool) and weight_decay == 0

    def one(example):
        loss, grad = jax.value_and_grad(loss_fn)(params, example, *args)
        leaves = layers.treedef.flatten_up_to(grad)
        decayed = [g + weight_decay * w if d and not no_decay else g for g, w, d in zip(leaves, layers.leaves, decay)]
        norms = jnp.stack([jnp.linalg.vector_norm(g.astype(dtype)) for g in decayed])
        return loss, leaves, norms

    def sums(examples):
        losses, grads, norms = jax.vmap(one)(examples)
        return (jnp.sum(losses), [jnp.sum(g, axis=0) for g in grads], jnp.sum(norms, axis=0),
                jnp.sum(norms * norms, axis=0))

    if chunk_size is None or chunk_size >= size:
        total = sums(batch)
    else:
        full = size // chunk_size * chunk_size
        chunks = jax.tree.map(lambda x: x[:full].reshape((full // chunk_size, chunk_size) + x.shape[1:]), batch)

        def body(carry, examples):
            return jax.tree.map(jnp.add, carry, sums(examples)), None

        zero = (jnp.zeros((), dtype), [jnp.zeros_like(w) for w in layers.leaves],
                jnp.zeros((len(layers.leaves),), dtype), jnp.zeros((len(layers.leaves),), dtype))
        total, _ = jax.lax.scan(body, zero, chunks)
        if full < size:
            total = jax.tree.map(jnp.add, total, sums(jax.tree.map(lambda x: x[full:], batch)))
    loss_sum, grad_sums, s1, s2 = total
    grads = layers.treedef.unflatten([g / size for g in grad_sums])
    return loss_sum / size, grads, NormStatistics(s1, s2, size)


def psum_statistics(stats: NormStatistics, axis_name: Any) -> NormStatistics:
    r"""Sum :class:`lwrs.NormStatistics` over the devices of a mapped axis.

    .. math:: S^{(1)}_k = \sum_r S^{(1)}_{k,r}, \quad S^{(2)}_k = \sum_r S^{(2)}_{k,r}, \quad N = \sum_r N_r

    The statistics' analogue of ``jax.lax.pmean`` on the gradients: inside
    ``jax.shard_map`` or ``jax.pmap``, the summed statistics of the replicas'
    local batches are those of the global batch (the merge rule of
    :func:`lwrs.merge_statistics`).

    References: Huo, Gu & Huang (2021), AAAI, eq. (5).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, lwrs
    >>> stats = lwrs.NormStatistics(jnp.ones((2, 1)), jnp.ones((2, 1)), jnp.array([3, 3]))
    >>> total = jax.vmap(lambda s: psum_statistics(s, "i"), axis_name="i")(stats)
    >>> print(total.sum_norms[0], total.count[0])
    [2.] 6
    """
    return NormStatistics(
        jax.lax.psum(stats.sum_norms, axis_name),
        jax.lax.psum(stats.sum_squared_norms, axis_name),
        jax.lax.psum(stats.count, axis_name),
    )
